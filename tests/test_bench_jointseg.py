"""``coopseg bench jointseg``: row configs, the classifier-encoder hand-over, the cache,
paired statistics and the report. Training is faked except in one tiny real run."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from coopseg.bench import jointseg as bench
from coopseg.bench import runner
from coopseg.config import Config
from coopseg.models.jointseg import ResidualInception

TINY = {
    "iterations": 2,
    "scene_size": 32,
    "train_scenes": 16,
    "val_scenes": 4,
    "cls_scenes_ratio": 2,
    "batch_size": 2,
    "lr": 0.002,
    "pretrained_lr": 0.001,
    "widths": [4, 8, 8, 16],
    "blocks": 1,
    "cls_lr_ratio": 30.0,
    "cls_batch_ratio": 2,
    "val_interval": 1,
    "rows": ["jointseg", "classifier"],
}


def test_rows_share_data_budget_and_the_papers_optimizer() -> None:
    configs = {row: bench.bench_config(row, 2) for row in bench.ROWS}
    base = configs["jointseg"]
    assert (base.train.optimizer, base.train.nesterov, base.train.momentum) == ("sgd", True, 0.9)
    assert base.train.amp == "none"  # fp32 on CPUs
    assert base.data.batch_size >= 4  # BN over a sane batch
    assert base.joint.cls_lr_ratio == 30.0
    assert base.joint.binary_normal == [0] and base.joint.cls_label_noise == 0
    assert base.joint.cls_label == "area" and base.joint.cls_data == "separate"
    assert base.joint.cls_scenes >= 4 * base.data.train_scenes
    assert base.joint.cls_scene_seed != base.data.scene_seed
    assert base.train.val_interval and base.train.iterations // base.train.val_interval >= 4
    # no encoder level smaller than 4x4: stem stride 2, then one halving per further level
    assert base.data.scene_size // 2 ** len(base.model["widths"]) >= 4
    for row, cfg in configs.items():
        assert cfg.name == f"{row}-seed2" and cfg.seed == 2
        assert cfg.train.iterations == base.train.iterations, row
        assert cfg.data.crop_size == base.data.crop_size and cfg.data.vflip, row
        pretrained = bench.ROWS[row].encoder != "random"
        lr = bench.MODES["quick"]["pretrained_lr" if pretrained else "lr"]
        assert cfg.train.lr == lr, row  # the fine-tuning lr for a pretrained encoder
        assert replace(cfg.train, lr=base.train.lr) == base.train, row
        assert cfg.data == base.data, row
        if row != "jointseg-paper":
            assert cfg.joint == replace(base.joint, cls_label_noise=cfg.joint.cls_label_noise), row
    paper = configs["jointseg-paper"]
    assert (paper.joint.cls_lr_ratio, paper.joint.cls_batch_ratio) == (30.0, 32)
    assert configs["jointseg-noise80"].joint.cls_label_noise == 0.8
    for arch in ("fcn8s", "unet"):
        model = configs[f"{arch}-imagenet"].model
        assert model["arch"] == arch and model["pretrained"] is True
        assert model["backbone"] == "tf_efficientnet_lite0"
        assert configs[arch].model["arch"] == "jointseg"  # the JointSeg encoder, random init
    with pytest.raises(ValueError, match="unknown bench setting 'frozen_stages'"):
        bench.bench_config("jointseg", 0, settings={"frozen_stages": 2})
    with pytest.raises(ValueError, match="unknown jointseg bench row 'segnet'"):
        bench.bench_config("segnet", 0)
    assert bench.row_spec("timm-vgg19") == bench.Row("cls", "timm vgg19 (random init)", "vgg19")


def test_every_row_starts_its_jointseg_encoder_from_the_same_init(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.MODES, "tiny", TINY)
    encoders = {}
    for row in ("jointseg", "classifier", "fcn8s", "unet"):
        cfg = bench.bench_config(row, 3, "tiny", tmp_path)
        model = bench._model_for(bench.row_spec(row), cfg)
        encoders[row] = model.encoder if row in ("jointseg", "classifier") else model.backbone
    ref = encoders["jointseg"].state_dict()
    for row, encoder in encoders.items():
        state = encoder.state_dict()
        assert state.keys() == ref.keys(), row
        for key, value in ref.items():
            assert torch.equal(state[key], value), (row, key)
    # the init is He fan-out (std sqrt(2 / fan_out)), not PyTorch's ~2.5x smaller default
    convs = [m for m in encoders["fcn8s"].modules() if isinstance(m, torch.nn.Conv2d)]
    conv = max(convs, key=lambda m: m.weight.numel())
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert float(conv.weight.detach().std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.2)
    other = bench._model_for(
        bench.row_spec("unet"), bench.bench_config("unet", 4, "tiny", tmp_path)
    )
    assert not torch.equal(other.backbone.stem[0].weight, encoders["unet"].stem[0].weight)


def test_fcn_on_the_bench_encoder_fuses_its_three_deepest_maps() -> None:
    widths = [4, 8, 8, 16]
    model = bench.baseline_segmenter("fcn8s", widths, blocks=1).eval()
    assert [model.tap_info[k].stride for k in ("head", "score16", "score8")] == [16, 8, 4]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))["out"].shape == (1, 11, 64, 64)
    with pytest.raises(ValueError, match="strides: expected three strides"):
        from coopseg.models import create_model

        create_model("fcn8s", backbone="resnet18", strides=[8, 16, 16])


def test_scores_keep_the_final_and_the_best_pass() -> None:
    history = [
        {"iteration": 2, "miou": 0.10, "cls_top1": 0.5, "cls_top2": 0.7, "cls_binary": 0.6},
        {"iteration": 4, "miou": 0.30, "cls_top1": 0.4, "cls_top2": 0.8, "cls_binary": 0.6},
        {"iteration": 6, "miou": 0.20, "cls_top1": 0.45, "cls_top2": 0.9, "cls_binary": 0.7},
    ]
    got = runner.scores_from_history(history, bench.SCORE_KEYS)
    assert got["seg"] == pytest.approx({"final": 20.0, "best": 30.0, "best_iteration": 4})
    assert got["cls_top1"] == pytest.approx({"final": 45.0, "best": 50.0, "best_iteration": 2})
    assert got["cls_top2"] == pytest.approx({"final": 90.0, "best": 90.0, "best_iteration": 6})
    assert got["cls_binary"] == pytest.approx({"final": 70.0, "best": 70.0, "best_iteration": 6})
    one = runner.scores_from_history([{"iteration": 2, "miou": 0.25}], bench.SCORE_KEYS)
    assert one == {"seg": {"final": 25.0, "best": 25.0, "best_iteration": 2}}


def test_classifier_pretrained_rows_start_from_the_classifier_encoder(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.MODES, "tiny", TINY)
    cfg = bench.bench_config("unet-classifier", 0, "tiny", tmp_path)
    with pytest.raises(FileNotFoundError, match="classifier row of seed 0 must run before"):
        bench._model_for(bench.row_spec("unet-classifier"), cfg)
    torch.manual_seed(5)
    encoder = bench.baseline_segmenter("fcn8s", TINY["widths"], blocks=1).backbone
    path = bench.classifier_encoder_file(cfg)
    path.parent.mkdir(parents=True)
    save_file(dict(encoder.state_dict()), str(path))
    model = bench._model_for(bench.row_spec("unet-classifier"), cfg)
    for key, value in encoder.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert all(isinstance(stage.conv, ResidualInception) for stage in model.decoder)
    fresh = bench._model_for(bench.row_spec("unet"), cfg)
    weight = "stem.conv.weight" if "stem.conv.weight" in encoder.state_dict() else None
    key = weight or next(k for k in encoder.state_dict() if k.endswith("weight"))
    assert not torch.equal(fresh.backbone.state_dict()[key], encoder.state_dict()[key])


def fake_work(calls: list[str], values: dict[str, float]) -> Any:
    def work(cfg: Config, keep_checkpoints: bool) -> dict[str, Any]:
        calls.append(cfg.name)
        spec = bench.row_spec(bench.row_of(cfg))
        result: dict[str, Any] = {"params_m": 1.0, "gmacs": 0.1, "iterations": 2}
        result |= {"train_s": 10.0, "total_s": 11.0, "step_s": 5.0, "threads": 1}
        value = values[bench.row_of(cfg)] + cfg.seed
        if spec.segments:
            result["miou"] = value / 100
        if spec.classifies:
            result |= {"top1": value / 100, "top2": 0.9, "binary": 0.8}
        runner.save_result(cfg, result)
        return result

    return work


def test_report_pairs_seeds_flags_the_plateau_and_reuses_moved_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.MODES, "tiny", TINY)
    rows = ["jointseg", "unet", "fcn8s", "classifier", "fcn8s-classifier"]
    values = {"jointseg": 30.0, "unet": 20.0, "fcn8s": 10.0, "classifier": 50.0}
    values["fcn8s-classifier"] = 22.0
    calls: list[str] = []
    out = tmp_path / "a"
    report = bench.run_jointseg_bench("tiny", (0, 1, 2), out, rows, work=fake_work(calls, values))
    # the classifier-encoder row runs after every classifier run
    assert max(calls.index(f"classifier-seed{s}") for s in range(3)) < min(
        calls.index(f"fcn8s-classifier-seed{s}") for s in range(3)
    )
    table = report["table"]
    assert table["jointseg"]["miou"]["mean"] == pytest.approx(31.0)  # 30, 31, 32
    assert table["fcn8s"]["plateau"] is True and table["fcn8s"]["plateau_seeds"] == [0, 1, 2]
    assert table["unet"]["plateau"] is False
    diffs = {d["label"]: d for d in report["comparisons"]}
    assert diffs["jointseg − unet"]["diffs"] == pytest.approx([10.0, 10.0, 10.0])
    assert diffs["jointseg − unet"]["distinguishable"] is True
    assert diffs["jointseg − classifier (top1)"]["mean"] == pytest.approx(-20.0)
    assert "jointseg − jointseg-paper" not in diffs  # a row that did not run
    text = (out / "jointseg.md").read_text()
    assert "| U-Net | 21.0 ± 1.0 | — | — |" in text
    assert "| FCN-8s | 11.0 ± 1.0 | — | 23.0 ± 1.0 |" in text
    assert "Still on the background plateau (< 15 % mIoU in some seed): fcn8s." in text
    assert "jointseg − unet: +10.0 ± 0.0 points over 3 seeds" in text
    assert (out / "jointseg.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "jointseg.json").read_text())["rows"]["unet"]["arch"] == "unet"

    # a moved bench folder is still a cache: nothing trains again
    moved = tmp_path / "b"
    shutil.copytree(out, moved)
    calls.clear()
    again = bench.run_jointseg_bench("tiny", (0, 1, 2), moved, rows, work=fake_work(calls, values))
    assert calls == [] and again["table"] == table
    with pytest.raises(ValueError, match="add 'classifier'"):
        bench.run_jointseg_bench("tiny", (0,), tmp_path / "c", ["unet-classifier"])


@pytest.mark.slow
def test_a_tiny_real_bench_trains_every_kind_of_row(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COOPSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(bench.MODES, "tiny", TINY)
    rows = ["jointseg", "classifier", "timm-test_resnet", "fcn8s-classifier", "unet-imagenet"]
    report = bench.run_jointseg_bench("tiny", (0,), tmp_path / "out", rows)
    table = report["table"]
    assert set(table) == set(rows)
    assert {"miou", "top1", "top2", "binary"} <= set(table["jointseg"])
    assert "miou" not in table["classifier"] and "top1" in table["classifier"]
    assert "top1" not in table["unet-imagenet"]
    assert (tmp_path / "out" / "runs" / "classifier-seed0" / bench.ENCODER_FILE).is_file()
    assert table["unet-imagenet"]["params_m"] > table["fcn8s-classifier"]["params_m"]
    for row, run in report["runs"].items():
        assert run[0]["iterations"] == TINY["iterations"]
        assert run[0]["val_iterations"] == [1, 2], row  # val_interval 1: a pass per iteration
        names = {"seg"} if "miou" in table[row] else set()
        names |= {"cls_top1", "cls_top2", "cls_binary"} if "top1" in table[row] else set()
        assert set(run[0]["scores"]) == names, row
        for score in run[0]["scores"].values():
            assert 0 <= score["final"] <= score["best"] <= 100, row
    text = (tmp_path / "out" / "jointseg.md").read_text()
    assert "timm test_resnet (random init)" in text and "binary: 0 normal" in text
    built = [p.name for p in (tmp_path / "cache" / "fashionscenes").iterdir()]
    assert "s32-n32-1-seed1-v1" in built, built  # the classifier's own 2x larger set
