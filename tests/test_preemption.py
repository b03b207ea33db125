"""Pre-emption: SIGTERM, SIGUSR1 and Ctrl-C finish the step, write last.pt and exit with a
status that says "resumable" (75; 130 for Ctrl-C), on every rank alike; ``--resume auto``
then ends equal to a run never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from coopseg.cli import main
from coopseg.engine.checkpoint import load_training_state
from coopseg.engine.preemption import RESUMABLE_EXIT, RunInterrupted, StopSignals
from coopseg.engine.train import Trainer

from .conftest import assert_same_state, trained_weights


def _signal_at(trainer: Trainer, iteration: int, sig: signal.Signals) -> None:
    """Deliver ``sig`` to this process in the middle of step ``iteration``."""
    real_step = trainer.step

    def step(images, masks):
        if trainer.iteration == iteration - 1:
            os.kill(os.getpid(), sig)  # handled while the step's Python code runs on
        return real_step(images, masks)

    trainer.step = step


TRAIN = {"iterations": 4, "val_interval": 2, "checkpoint_interval": 0}
UNET = {"arch": "unet", "base_channels": 4, "num_classes": 11}  # seconds, not minutes


@pytest.fixture(scope="module")
def straight(tiny_scenes, tmp_path_factory) -> Trainer:
    """The uninterrupted run every stopped one must end equal to."""
    from .conftest import tiny_config

    cfg = tiny_config(tiny_scenes, tmp_path_factory.mktemp("straight"), name="straight",
                      model=UNET, train=TRAIN)  # fmt: skip
    trainer = Trainer(cfg, show_progress=False)
    trainer.train()
    return trainer


def _stopped(trainer: Trainer) -> RunInterrupted:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        with pytest.raises(RunInterrupted) as info:
            trainer.train()
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]  # the caller's again
    finally:
        for s, handler in before.items():  # pre-empted: SIGTERM/SIGUSR1 stay recorded
            signal.signal(s, handler)
    return info.value


def test_sigusr1_finishes_the_step_saves_and_resumes_equal(make_config, straight) -> None:
    cfg = make_config(name="usr1", model=UNET, train=TRAIN)
    trainer = Trainer(cfg, show_progress=False)
    _signal_at(trainer, 2, signal.SIGUSR1)
    err = _stopped(trainer)
    assert (err.signal_name, err.iteration, err.exit_status) == ("SIGUSR1", 2, RESUMABLE_EXIT)
    ckpts = cfg.run_dir / "checkpoints"
    assert load_training_state(ckpts / "last.pt")["iteration"] == 2  # the step finished
    assert not (ckpts / "final.safetensors").exists()
    resumed = Trainer(
        make_config(name="usr1", model=UNET, train=TRAIN), resume="auto", show_progress=False
    )
    assert resumed.iteration == 2
    resumed.train()
    assert_same_state(trained_weights(resumed), trained_weights(straight))
    assert resumed.history == straight.history  # validated at 2 before stopping, as in one go


def test_ctrl_c_finishes_the_step_too_and_exits_130(make_config) -> None:
    cfg = make_config(name="ctrl-c", model=UNET, train=TRAIN)
    trainer = Trainer(cfg, show_progress=False)
    _signal_at(trainer, 1, signal.SIGINT)
    err = _stopped(trainer)
    assert (err.signal_name, err.iteration, err.exit_status) == ("SIGINT", 1, 130)
    assert isinstance(err, KeyboardInterrupt)  # what lets Ctrl-C through lets this through
    assert load_training_state(cfg.run_dir / "checkpoints" / "last.pt")["iteration"] == 1


def test_pre_emption_wins_over_ctrl_c_and_nothing_means_go_on() -> None:
    from coopseg.engine.distributed import DistInfo

    one = DistInfo(0, 1, 0, torch.device("cpu"))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopSignals()
        assert stop.agreed(one) is None
        with stop:
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.agreed(one) == "SIGINT"
        assert {s: signal.getsignal(s) for s in before} == before  # restored
        later = StopSignals()
        with later:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGUSR1)  # second, and pre-emption: it counts
        assert later.agreed(one) == "SIGUSR1"
        # on its way out: a repeated SIGTERM is recorded, not a kill
        os.kill(os.getpid(), signal.SIGTERM)
        assert later.received == ["SIGINT", "SIGUSR1", "SIGTERM"]
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


AGREE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from coopseg.engine.distributed import init_distributed
    from coopseg.engine.preemption import StopSignals

    dist = init_distributed("cpu")
    with StopSignals() as stop:
        first = stop.agreed(dist)  # nothing yet, on either rank
        if dist.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is pre-empted
        second = stop.agreed(dist)
    print(f"rank {dist.rank}: {first} {second}", flush=True)
    torch.distributed.destroy_process_group()
    """
)


def test_every_rank_agrees_to_stop_when_one_is_signalled(tmp_path) -> None:
    """Two gloo ranks: the rank that received nothing stops on the other's SIGTERM."""
    import socket

    (tmp_path / "agree.py").write_text(AGREE)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2"}  # fmt: skip
    ranks = [
        subprocess.Popen(
            [sys.executable, "agree.py"],
            cwd=tmp_path,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [proc.communicate(timeout=120)[0] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [0, 0], outs
    assert outs[0].strip().endswith("rank 0: None SIGTERM"), outs
    assert outs[1].strip().endswith("rank 1: None SIGTERM"), outs


RUNNER = textwrap.dedent(
    """
    import os, sys, time
    from coopseg.cli import main
    from coopseg.engine.train import Trainer

    real_step = Trainer.step

    def step(self, images, masks):  # slow enough to be caught mid-run
        time.sleep(0.3)
        return real_step(self, images, masks)

    Trainer.step = step
    sys.exit(main(sys.argv[1:]))
    """
)


def _logged_iteration(log: Path) -> int:
    if not log.exists():
        return 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line]
    return max(steps, default=0)


def test_sigterm_mid_run_exits_75_and_resume_ends_equal(
    tmp_path, make_config, straight, capsys
) -> None:
    """A real ``coopseg train`` process sent SIGTERM mid-run. While it runs, a second
    writer on its run folder is refused in one line naming it (the run lock)."""
    (tmp_path / "runner.py").write_text(RUNNER)
    cfg = make_config(name="cut", model=UNET, train={**TRAIN, "log_interval": 1})
    config = tmp_path / "cut.yaml"
    config.write_text(cfg.to_yaml())
    threads = str(torch.get_num_threads())  # the reference's: the same sums, bit for bit
    cut = subprocess.Popen(
        [sys.executable, "runner.py", "train", str(config)],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": threads},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while _logged_iteration(cfg.run_dir / "log.jsonl") < 1:
            assert cut.poll() is None and time.monotonic() < deadline, cut.communicate()
            time.sleep(0.05)
        assert main(["train", str(config), "--resume", "auto"]) == 2  # a second writer
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("coopseg: error: ")
        assert f"{cfg.run_dir} is being trained by pid {cut.pid} on host" in err
        cut.send_signal(signal.SIGTERM)
        out, err = cut.communicate(timeout=120)
    finally:
        if cut.poll() is None:
            cut.kill()
    assert cut.returncode == RESUMABLE_EXIT, out + err
    assert "stopped by SIGTERM" in out and "--resume auto" in out
    saved = load_training_state(cfg.run_dir / "checkpoints" / "last.pt")["iteration"]
    assert 1 <= saved < 4 and _logged_iteration(cfg.run_dir / "log.jsonl") == saved
    assert not (cfg.run_dir / "checkpoints" / "final.safetensors").exists()
    resumed = Trainer(cfg, resume="auto", show_progress=False)
    assert resumed.iteration == saved
    resumed.train()
    assert_same_state(trained_weights(resumed), trained_weights(straight))
