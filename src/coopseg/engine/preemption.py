"""Stopping a run on a signal without losing it: pre-emption (SIGTERM, SIGUSR1) and Ctrl-C.

A scheduler pre-empts a job with SIGTERM (SLURM, Kubernetes; torchrun forwards it to
its workers) and kills it after a grace period; SLURM's ``--signal=USR1@90`` sends
SIGUSR1 ahead of the deadline. While the training loop runs, :class:`StopSignals`
turns SIGTERM, SIGUSR1 and SIGINT into a request: the current step (and a validation
or checkpoint due at it) finishes, every rank agrees to stop after the same iteration
(:meth:`StopSignals.agreed`, one all-reduce per iteration under DDP), rank 0 writes
``last.pt`` and the loop raises :class:`RunInterrupted`. ``coopseg train`` then exits
with :data:`RESUMABLE_EXIT` (75, ``EX_TEMPFAIL``: "try again") after SIGTERM or
SIGUSR1, 130 after Ctrl-C; the same command with ``--resume auto`` continues.

A second Ctrl-C (a second or more after the first) stops at once, as Python does.
DataLoader workers ignore the three signals (:func:`ignore_stop_signals`): a signal
sent to the whole process group must not kill the workers under the step that is
being finished; the main process shuts them down as it exits.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

import torch

from .distributed import DistInfo, all_reduce_sum

RESUMABLE_EXIT = 75  # sysexits.h EX_TEMPFAIL: stopped, checkpoint written, run it again
INTERRUPT_EXIT = 130  # Ctrl-C, as a shell reports SIGINT
PREEMPTION = ("SIGTERM", "SIGUSR1")
HANDLED = ("SIGINT", *PREEMPTION)
REPEAT_S = 1.0  # a Ctrl-C this soon after the first is the same one (torchrun forwards it)


class RunInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after writing ``last.pt``; resumable.

    A ``KeyboardInterrupt`` (so code that lets Ctrl-C through lets this through too)
    carrying the signal's name, the iteration the checkpoint holds and the process exit
    status that says so (:data:`RESUMABLE_EXIT` for pre-emption, 130 for Ctrl-C).
    """

    def __init__(self, signal_name: str, iteration: int, checkpoint: str) -> None:
        self.signal_name = signal_name
        self.iteration = iteration
        self.checkpoint = checkpoint
        self.exit_status = RESUMABLE_EXIT if signal_name in PREEMPTION else INTERRUPT_EXIT
        super().__init__(
            f"stopped by {signal_name} at iteration {iteration}; {checkpoint} written; "
            f"exit status {self.exit_status}; continue with --resume auto"
        )


class StopSignals:
    """Records SIGTERM, SIGUSR1 and SIGINT between :meth:`install` and :meth:`restore`
    (or as a context manager); outside the main thread it installs nothing."""

    def __init__(self) -> None:
        self.received: list[str] = []  # the signals' names, each once, in arrival order
        self._first_sigint = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            now = time.monotonic()
            if self._first_sigint and now - self._first_sigint > REPEAT_S:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self._first_sigint = self._first_sigint or now
        if name not in self.received:
            self.received.append(name)

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in HANDLED:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """The handlers from before :meth:`install`; after a pre-emption stop, SIGTERM
        and SIGUSR1 stay recorded instead (the process is on its way out: a signal
        repeated now, e.g. torchrun stopping the other workers, must not turn the
        resumable exit into a kill; the scheduler's SIGKILL still ends it)."""
        keep = PREEMPTION if set(self.received) & set(PREEMPTION) else ()
        for sig, previous in self._previous.items():
            if signal.Signals(sig).name not in keep:
                signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def agreed(self, dist: DistInfo) -> str | None:
        """The signal every rank stops on, the same on each (None: go on): what any rank
        received (one all-reduce under DDP), pre-emption before Ctrl-C."""
        got = set(self.received)
        if dist.distributed:
            flags = torch.tensor([float(n in got) for n in HANDLED], device=dist.device)
            flags = all_reduce_sum(flags).tolist()
            got = {name for name, flag in zip(HANDLED, flags, strict=True) if flag > 0}
        for name in (*PREEMPTION, "SIGINT"):
            if name in got:
                return name
        return None


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the main process decides when to stop."""
    for name in HANDLED:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
