"""The command line: eval tables and JSON, predict on any image size, profile JSON, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from coopseg.cli import main
from coopseg.engine.train import train

from .conftest import tiny_config


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_scenes, tmp_path_factory):
    cfg = tiny_config(
        tiny_scenes,
        tmp_path_factory.mktemp("cli"),
        name="cli",
        train={"iterations": 2, "val_interval": 0},
    )
    result = train(cfg, show_progress=False)
    return result.run_dir / "checkpoints" / "best.safetensors"


def test_eval_prints_table_and_writes_json(trained_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(trained_checkpoint), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Ankle boot" in printed and "mIoU" in printed
    report = json.loads(out.read_text())
    ious = [c["iou"] for c in report["classes"].values() if c["iou"] is not None]
    assert report["miou"] == pytest.approx(sum(ious) / len(ious))
    assert report["pixels"] > 0 and next(iter(report["classes"])) == "background"


def test_multiscale_flip_eval_option(trained_checkpoint, tmp_path) -> None:
    out = tmp_path / "ms.json"
    args = ["eval", "--checkpoint", str(trained_checkpoint), "--json", str(out)]
    assert main([*args, "--scales", "0.5", "1.0", "--flip"]) == 0
    report = json.loads(out.read_text())
    assert report["scales"] == [0.5, 1.0] and report["flip"] is True


def test_predict_writes_palette_masks_and_overlays_for_any_size(
    trained_checkpoint, tmp_path
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (37, 91), "b.jpg": (64, 64)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    out = tmp_path / "pred"
    assert (
        main(["predict", str(folder), "--checkpoint", str(trained_checkpoint), "--out", str(out)])
        == 0
    )
    mask = Image.open(out / "a_mask.png")
    assert mask.mode == "P" and mask.size == (91, 37)
    assert np.asarray(mask).max() < 11
    assert Image.open(out / "b_overlay.png").size == (64, 64)


def test_predict_names_a_corrupt_image(trained_checkpoint, tmp_path, capsys) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    code = main(
        ["predict", str(bad), "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert "broken.png: cannot read image" in capsys.readouterr().err


def test_eval_names_a_missing_checkpoint(tmp_path, capsys) -> None:
    assert main(["eval", "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert "none.safetensors does not exist" in capsys.readouterr().err


def test_profile_json_counts_parameters_and_macs(capsys) -> None:
    code = main(
        [
            "profile",
            "--arch",
            "deeplabv3plus",
            "--backbone",
            "resnet18",
            "--num-classes",
            "21",
            "--input-size",
            "64",
            "96",
            "--json",
            "--no-latency",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    from coopseg import create_model

    model = create_model("deeplabv3plus", backbone="resnet18", num_classes=21)
    assert result["params"] == sum(p.numel() for p in model.parameters())
    # MACs grow with the pixel count (every layer is a convolution over the map).
    code = main(
        [
            "profile",
            "--backbone",
            "resnet18",
            "--num-classes",
            "21",
            "--input-size",
            "128",
            "192",
            "--json",
            "--no-latency",
        ]
    )
    doubled = json.loads(capsys.readouterr().out)
    assert doubled["gmacs"] == pytest.approx(4 * result["gmacs"], rel=0.02)
