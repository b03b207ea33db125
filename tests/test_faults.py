"""Training through faults: resume auto, a corrupt or half-replaced newest checkpoint, a
full disk, time-based checkpoints, and extending a finished run."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from coopseg.engine import checkpoint as ckpt_module
from coopseg.engine.checkpoint import CheckpointError, load_training_state
from coopseg.engine.train import Trainer, TrainingError

from .conftest import assert_same_state, trained_weights


@pytest.fixture(scope="module")
def straight(tiny_scenes, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted 6-iteration run every faulty run must end equal to."""
    from .conftest import tiny_config

    cfg = tiny_config(tiny_scenes, tmp_path_factory.mktemp("straight"), name="straight")
    trainer = Trainer(cfg, show_progress=False)
    trainer.train()
    return trained_weights(trainer)


def test_resume_auto_starts_fresh_then_continues(make_config, straight) -> None:
    cfg = make_config(name="auto", train={"resume": "auto", "max_time_s": 1e-9})
    first = Trainer(cfg, show_progress=False)
    assert first.iteration == 0 and "starting a new run" in first.resume_note
    assert first.train().iteration == 1  # "pre-empted" after one iteration
    second = Trainer(make_config(name="auto", train={"resume": "auto"}), show_progress=False)
    assert second.iteration == 1 and "resuming from" in second.resume_note
    second.train()
    assert_same_state(trained_weights(second), straight)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        Trainer(make_config(name="none-yet"), resume=True, show_progress=False)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(make_config, straight) -> None:
    cfg = make_config(name="corrupt", train={"iterations": 6, "max_time_s": 1e-9})
    Trainer(cfg, show_progress=False).train()  # iteration 1 -> last.pt
    cfg2 = make_config(name="corrupt", train={"iterations": 6, "checkpoint_interval": 1})
    trainer = Trainer(cfg2, resume=True, show_progress=False)
    real_step = trainer.step

    def stop_at_three(images, masks):
        values = real_step(images, masks)
        if trainer.iteration == 3:
            trainer.save_checkpoint()
            raise KeyboardInterrupt
        return values

    trainer.step = stop_at_three
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    ckpts = cfg.run_dir / "checkpoints"
    assert load_training_state(ckpts / "last.prev.pt")["iteration"] == 3
    data = (ckpts / "last.pt").read_bytes()
    (ckpts / "last.pt").write_bytes(data[: len(data) // 2])  # truncated mid-write

    resumed = Trainer(make_config(name="corrupt"), resume="auto", show_progress=False)
    assert resumed.iteration == 3
    assert "last.prev.pt" in resumed.resume_note and "skipped" in resumed.resume_note
    assert "last.pt: unreadable" in resumed.resume_note
    resumed.train()
    assert_same_state(trained_weights(resumed), straight)


def test_crash_between_the_two_renames_leaves_a_checkpoint(make_config, monkeypatch) -> None:
    cfg = make_config(name="renames", train={"iterations": 6, "max_time_s": 1e-9})
    trainer = Trainer(cfg, show_progress=False)
    trainer.train()  # last.pt at iteration 1
    calls = []
    real_replace = os.replace

    def die_on_second(src, dst):  # last.pt -> last.prev.pt happens, the new one never lands
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.undo()
    ckpts = cfg.run_dir / "checkpoints"
    assert not (ckpts / "last.pt").exists()
    assert [p for p in ckpts.iterdir() if p.suffix == ".tmp"] == []
    resumed = Trainer(cfg, resume="auto", show_progress=False)
    assert resumed.iteration == 1 and "last.prev.pt" in resumed.resume_note


def test_disk_full_names_the_path_and_keeps_the_previous(make_config, monkeypatch) -> None:
    cfg = make_config(name="full", train={"iterations": 6, "max_time_s": 1e-9})
    trainer = Trainer(cfg, show_progress=False)
    trainer.train()
    last = cfg.run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_module.torch, "save", no_space)
    with pytest.raises(CheckpointError, match=r"cannot write .*last\.pt: no space left"):
        trainer.save_checkpoint()
    assert last.read_bytes() == before
    assert [p.name for p in last.parent.iterdir() if p.suffix == ".tmp"] == []


def test_checkpoint_by_time(make_config, monkeypatch) -> None:
    saved = []
    monkeypatch.setattr(
        "coopseg.engine.loop.save_training_state", lambda path, state: saved.append(state)
    )
    cfg = make_config(
        name="by-time",
        train={"iterations": 4, "checkpoint_interval": 0, "checkpoint_interval_s": 1e-9},
    )
    Trainer(cfg, show_progress=False).train()
    assert [s["iteration"] for s in saved] == [1, 2, 3, 4]


def test_extending_a_finished_run_continues_the_schedule(make_config) -> None:
    cfg = make_config(name="extend", train={"iterations": 4, "val_interval": 0})
    Trainer(cfg, show_progress=False).train()
    longer = make_config(name="extend", train={"iterations": 8, "val_interval": 0})
    trainer = Trainer(longer, resume=True, show_progress=False)
    base = longer.train.lr
    expected = base * (1 - 4 / 8) ** longer.train.poly_power
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert "train.iterations 4 -> 8" in trainer.schedule_note
    before = trained_weights(trainer)
    trainer.train()
    assert trainer.iteration == 8
    moved = any(not torch.equal(before[k], v) for k, v in trained_weights(trainer).items())
    assert moved  # not at lr 0
    shorter = make_config(name="extend", train={"iterations": 5})
    with pytest.raises(TrainingError, match="below the checkpoint's iteration 8"):
        Trainer(shorter, resume=True, show_progress=False)
