"""The training engine: overfitting works, resume is exact, interruptions lose nothing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from coopseg.config import ConfigError
from coopseg.data import FashionScenes, build_fashionscenes, eval_transform
from coopseg.engine.checkpoint import load_model
from coopseg.engine.distributed import init_distributed
from coopseg.engine.evaluate import evaluate
from coopseg.engine.train import Trainer, TrainingError, train

from .conftest import tiny_cooperative


def test_tiny_overfit_reaches_high_miou(tmp_path, make_config) -> None:
    root = build_fashionscenes(tmp_path / "eight", size=64, train=8, val=8, seed=3)
    cfg = make_config(
        model={"dropout": 0.0, "aspp_channels": 64, "decoder_channels": 64},
        data={
            "root": str(root),
            "train_scenes": 8,
            "val_scenes": 8,
            "batch_size": 8,
            "crop_size": [64, 64],
            "scale_range": [1.0, 1.0],
            "hflip": False,
        },
        train={
            "iterations": 120,
            "optimizer": "adamw",
            "lr": 0.003,
            "amp": "bf16",
            "val_interval": 0,
            "checkpoint_interval": 0,
            "log_interval": 50,
        },
    )
    result = train(cfg, show_progress=False)
    model, _, _ = load_model(result.run_dir / "checkpoints" / "final.safetensors")
    seen = FashionScenes(root, "train", eval_transform(cfg.data.mean, cfg.data.std))
    metrics = evaluate(model, seen, 11, dist=init_distributed("cpu"), batch_size=8)
    assert metrics.miou > 0.85, metrics.iou


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cooperative", [False, True], ids=["single", "cross-pair"])
def test_resume_equals_uninterrupted_run(make_config, cooperative) -> None:
    model = {"model": tiny_cooperative("cross")} if cooperative else {}
    straight = Trainer(make_config(name="straight", **model), show_progress=False)
    straight.train()

    cfg = make_config(name="resumed", train={"iterations": 6, "max_time_s": 1e-9}, **model)
    first = Trainer(cfg, show_progress=False)
    first_result = first.train()  # stops after one iteration (time budget), checkpointed
    assert first_result.iteration == 1
    resumed = Trainer(make_config(name="resumed", **model), resume=True, show_progress=False)
    assert resumed.iteration == 1
    result = resumed.train()
    assert result.iteration == 6

    a, b = _weights(straight.model), _weights(resumed.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert (
        straight.optimizer.state_dict()["state"].keys()
        == resumed.optimizer.state_dict()["state"].keys()
    )
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_interrupted_run_keeps_a_checkpoint(make_config, monkeypatch) -> None:
    cfg = make_config(name="interrupted", train={"iterations": 6, "checkpoint_interval": 0})
    trainer = Trainer(cfg, show_progress=False)
    real_step = trainer.step

    def step_then_interrupt(images, masks):
        values = real_step(images, masks)
        if trainer.iteration == 2:
            raise KeyboardInterrupt
        return values

    monkeypatch.setattr(trainer, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    state = torch.load(cfg.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 2
    leftovers = [p.name for p in (cfg.run_dir / "checkpoints").iterdir() if p.suffix == ".tmp"]
    assert leftovers == []
    with pytest.raises(TrainingError, match="pass --resume"):
        Trainer(cfg, show_progress=False)
    assert Trainer(cfg, resume=True, show_progress=False).train().iteration == 6


def test_run_folder_logs_and_best_checkpoint(make_config) -> None:
    cfg = make_config(name="logged")
    result = train(cfg, show_progress=False)
    run = result.run_dir
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "start" and records[0]["weights"] == {"backbone": "random"}
    assert (run / "config.yaml").read_text().startswith("# weights backbone: random\n")
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "img_per_s"} <= set(records[1])
    vals = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [3, 6]
    assert any((run / "tb").iterdir())
    _, saved_cfg, info = load_model(run / "checkpoints" / "best.safetensors")
    assert saved_cfg.model == cfg.model
    assert info["class_names"][0] == "background" and len(info["palette"]) == 11
    assert math.isclose(info["miou"], result.best_miou)
    assert info["iteration"] == result.best_iteration


def test_class_count_mismatch_is_named(make_config) -> None:
    cfg = make_config(model={"num_classes": 21})
    with pytest.raises(
        ConfigError, match=r"model.num_classes is 21 but data set 'fashionscenes' has 11"
    ):
        Trainer(cfg, show_progress=False)


def test_diverging_loss_stops_with_advice(make_config) -> None:
    cfg = make_config(name="diverge", train={"lr": 1e30, "iterations": 6})
    with pytest.raises(TrainingError, match="lower train.lr"):
        train(cfg, show_progress=False)


def test_bf16_autocast_on_cpu_trains(make_config) -> None:
    cfg = make_config(name="amp", train={"amp": "bf16", "iterations": 2, "val_interval": 0})
    trainer = Trainer(cfg, show_progress=False)
    assert trainer.amp_dtype == torch.bfloat16
    before = _weights(trainer.model)
    trainer.train()
    after = _weights(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ConfigError, match="fp16 autocast needs CUDA"):
        Trainer(make_config(name="fp16", train={"amp": "fp16"}), show_progress=False)


def test_amp_auto_is_full_precision_for_cpu_inference() -> None:
    """Training's ``auto`` probes bf16 on CPUs that compute it (tests/test_precision.py);
    evaluation's ``auto`` on a CPU is full precision."""
    from coopseg.engine import inference

    assert inference.cpu_has_fast_bf16("processor : 0\nflags : fpu avx512f avx512_bf16 sse\n")
    assert inference.cpu_has_fast_bf16("flags : fpu amx_bf16 amx_tile\n")
    assert not inference.cpu_has_fast_bf16("flags : fpu avx512f avx2\n")
    cpu = torch.device("cpu")
    assert inference.amp_dtype("auto", cpu) is None
    assert inference.amp_dtype("bf16", cpu) is torch.bfloat16  # asked for by name: honoured


def test_init_from_starts_training_from_a_checkpoint(make_config) -> None:
    first = make_config(name="source", train={"iterations": 2, "val_interval": 0})
    train(first, show_progress=False)
    final = first.run_dir / "checkpoints" / "final.safetensors"
    second = make_config(name="init", train={"init_from": str(final)})
    trainer = Trainer(second, show_progress=False)
    source, _, _ = load_model(final)
    for key, value in source.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    assert set(trainer.weight_sources.values()) == {f"init_from:{final}"}
