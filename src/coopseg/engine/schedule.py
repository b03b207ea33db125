"""Learning-rate schedules: poly decay over a number of iterations, or over a time budget.

``train.schedule: iterations`` (the default, the papers' recipe) decays the lr over
``train.iterations`` steps. ``train.schedule: time`` decays it over ``train.time_budget_s``
seconds of *training* (the time spent in training steps; validation, checkpoints and the
precise-BN pass do not count), so a run finishes its decay inside its budget on any
machine and a faster machine simply trains more iterations. Such a run is not
bit-reproducible across machines (nor between two runs on one): how many steps it takes
and at which lr each one runs depend on the measured step times.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..config import TrainConfig
from .distributed import DistInfo, broadcast_from_main

LrFactor = Callable[[int], float]


def poly_lambda(iterations: int, power: float, warmup: int = 0) -> LrFactor:
    """lr factor at an iteration: linear warm-up over ``warmup`` steps, then poly decay."""

    def factor(it: int) -> float:
        decay = max(0.0, 1.0 - it / iterations) ** power
        return decay * min(1.0, (it + 1) / warmup) if warmup > 0 else decay

    return factor


class TrainingClock:
    """Seconds spent in training steps, summed over the run (and restored on resume).

    ``clock`` is injectable so tests drive it by hand. Under DDP every rank adopts rank
    0's count after each step (:meth:`stop` with ``sync``), so all ranks run each step at
    the same lr and stop at the same iteration.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.elapsed_s = 0.0
        self._started: float | None = None

    def start(self) -> None:
        self._started = self.clock()

    def stop(self, dist: DistInfo | None = None, sync: bool = False) -> float:
        """End the step started by :meth:`start`; returns the run's training seconds."""
        if self._started is not None:
            self.elapsed_s += self.clock() - self._started
            self._started = None
        if sync and dist is not None and dist.distributed:
            self.elapsed_s = broadcast_from_main(self.elapsed_s, dist)
        return self.elapsed_s


def time_poly_lambda(
    clock: TrainingClock, budget_s: float, power: float, warmup_s: float = 0.0
) -> LrFactor:
    """lr factor by the fraction of ``budget_s`` spent (the iteration argument, which
    LambdaLR passes, is ignored): linear warm-up over ``warmup_s`` seconds, poly decay."""

    def factor(_: int) -> float:
        spent = clock.elapsed_s
        decay = max(0.0, 1.0 - spent / budget_s) ** power
        return decay * min(1.0, spent / warmup_s) if warmup_s > 0 else decay

    return factor


def lr_factor(t: TrainConfig, clock: TrainingClock) -> LrFactor:
    """The lr factor ``train.schedule`` asks for."""
    if t.schedule == "time":
        return time_poly_lambda(clock, t.time_budget_s, t.poly_power, t.warmup_s)
    return poly_lambda(t.iterations, t.poly_power, t.warmup_iterations)


def build_scheduler(
    optimizer: torch.optim.Optimizer, t: TrainConfig, clock: TrainingClock
) -> torch.optim.lr_scheduler.LambdaLR:
    """One LambdaLR per optimizer, stepped once per iteration by the trainers."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t, clock))


def schedule_done(t: TrainConfig, iteration: int, clock: TrainingClock) -> bool:
    """Has the schedule run its course (the loop's stopping rule, besides max_time_s)?"""
    if t.schedule == "time":
        return clock.elapsed_s >= t.time_budget_s
    return iteration >= t.iterations


def describe_schedule(t: TrainConfig) -> dict[str, float | int | str]:
    """What a run records about its schedule (log.jsonl's start record)."""
    if t.schedule == "time":
        return {"schedule": "time", "time_budget_s": t.time_budget_s, "warmup_s": t.warmup_s}
    return {"schedule": "iterations", "iterations": t.iterations}
