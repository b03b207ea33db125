"""Hub-format model folders: save_pretrained / from_pretrained for every architecture,
repo ids from a local Hugging Face cache (offline), export --format hub from a run, the
folder accepted by predict / eval / export, folders of other libraries refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import coopseg
from coopseg.cli import main
from coopseg.config import config_from_dict, model_kwargs
from coopseg.engine.checkpoint import CheckpointError, load_model, save_weights
from coopseg.models import create_model

from .conftest import TINY_MEMBER, tiny_config, tiny_cooperative

SECTIONS = {
    "deeplabv3plus": {**TINY_MEMBER, "num_classes": 3},
    "danet": {"arch": "danet", "backbone": "resnet18", "head_channels": 16, "num_classes": 3},
    "dfdam": {
        "arch": "dfdam",
        "backbone": "resnet18",
        "channels": 16,
        "attention_channels": 8,
        "num_classes": 3,
    },
    "fcn8s": {"arch": "fcn8s", "backbone": "resnet18", "head_channels": 16, "num_classes": 3},
    "unet": {"arch": "unet", "base_channels": 4, "num_classes": 3},
    "jointseg": {
        "arch": "jointseg",
        "num_classes": 3,
        "num_cls_classes": 5,
        "widths": [4, 8, 8, 16],
        "cls_width": 8,
        "cls_blocks": 1,
    },
    "cooperative": tiny_cooperative("cross"),
}


def _build(section: dict) -> torch.nn.Module:
    arch, kwargs = model_kwargs(config_from_dict({"model": section}).model)
    torch.manual_seed(0)
    return create_model(arch, **kwargs).eval()


@pytest.mark.parametrize("arch", list(SECTIONS))
def test_save_pretrained_round_trip_gives_the_same_logits(arch, tmp_path) -> None:
    model = _build(SECTIONS[arch])
    folder = model.save_pretrained(tmp_path / arch)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["library_name"] == "coopseg" and meta["model"]["arch"] == arch
    assert meta["mean"] == [0.485, 0.456, 0.406] and len(meta["palette"]) == len(
        meta["class_names"]
    )
    loaded = coopseg.from_pretrained(folder)
    assert type(loaded) is type(model) and not loaded.training
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x)["out"], loaded(x)["out"])


def _hf_cache(tmp_path: Path, folder: Path, repo: str, monkeypatch) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<rev>/}."""
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf-cache"
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / rev)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # read at import: set them too
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    return cache


def test_from_pretrained_by_repo_id_from_the_local_cache_offline(tmp_path, monkeypatch) -> None:
    model = _build(SECTIONS["unet"])
    folder = model.save_pretrained(tmp_path / "unet", info={"class_names": ["bg", "a", "b"]})
    _hf_cache(tmp_path, folder, "someone/tiny-unet", monkeypatch)
    loaded = coopseg.from_pretrained("someone/tiny-unet")
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(model(x)["out"], loaded(x)["out"])
    _, _, info = load_model("someone/tiny-unet")
    assert info["class_names"] == ["bg", "a", "b"]
    with pytest.raises(CheckpointError, match=r"someone/absent: not in the local Hugging Face"):
        coopseg.from_pretrained("someone/absent")


@pytest.mark.parametrize(
    ("config", "library"),
    [
        (
            {"architectures": ["SegformerForSemanticSegmentation"], "model_type": "x"},
            "transformers",
        ),
        ({"_model_class": "Unet", "encoder_name": "resnet34"}, "segmentation_models_pytorch"),
    ],
)
def test_a_folder_for_another_library_is_refused_in_one_line(
    config, library, tmp_path, capsys
) -> None:
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"not a coopseg model .*written for {library}"):
        coopseg.from_pretrained(folder)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    argv = ["predict", str(image), "--checkpoint", str(folder), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a coopseg model" in err


def _fake_run(tiny_scenes: Path, tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A run folder as training leaves it: config, best.safetensors, log, eval.json."""
    cfg = tiny_config(
        tiny_scenes,
        tmp_path / "runs",
        model={"arch": "unet", "base_channels": 4, "num_classes": 11},
    )
    model = _build(cfg.model)
    run = cfg.run_dir
    (run / "checkpoints").mkdir(parents=True)
    best = run / "checkpoints" / "best.safetensors"
    names = [f"c{i}" for i in range(11)]
    info = {"class_names": names, "palette": [[i, i, i] for i in range(11)], "miou": 0.25}
    save_weights(best, model, cfg, {**info, "iteration": 6})
    (run / "log.jsonl").write_text(
        json.dumps({"kind": "start", "step": 0, "time": 0, "weights": {"encoder": "random"}})
    )
    classes = {n: {"iou": 0.5 if i == 3 else None} for i, n in enumerate(names)}
    metrics = {"checkpoint": str(best), "miou": 0.3125, "pixel_acc": 0.9, "mean_acc": 0.4}
    metrics.update(classes=classes, matrix=[[0] * 11] * 11)
    (run / "checkpoints" / "eval.json").write_text(json.dumps(metrics))
    return run, model


def test_export_hub_from_a_run_then_predict_and_eval_take_the_folder(
    tiny_scenes, tmp_path, capsys
) -> None:
    run, _ = _fake_run(tiny_scenes, tmp_path)
    out = tmp_path / "hub"
    assert main(["export", str(run), "--format", "hub", "--out", str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["class_names"][3] == "c3" and meta["config"]["data"]["root"] == str(tiny_scenes)
    card = (out / "README.md").read_text()
    assert "library_name: coopseg" in card and "license: mit" in card
    assert "value: 31.25" in card and "**mIoU 31.25 %**" in card  # model-index + table
    assert "| c3 | 50.00 |" in card and "| c4 | — |" in card
    assert "coopseg train training_config.yaml" in card and (out / "training_config.yaml").is_file()
    assert "random initialisation" in card
    # predict with the folder = predict with the run's checkpoint
    image = tmp_path / "img.png"
    pixels = np.random.default_rng(0).integers(0, 255, (20, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    for name, ckpt in (("folder", out), ("file", run / "checkpoints" / "best.safetensors")):
        argv = ["predict", str(image), "--checkpoint", str(ckpt), "--masks-only"]
        assert main([*argv, "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "folder" / "img.png").read_bytes() == (
        tmp_path / "file" / "img.png"
    ).read_bytes()
    # eval with the folder: its own training config, eval.json inside the folder
    assert main(["eval", "--checkpoint", str(out)]) == 0
    assert json.loads((out / "eval.json").read_text())["dataset"] == "fashionscenes"
    # the onnx-only options are refused for the hub format
    argv = ["export", str(run), "--format", "hub", "--out", str(out), "--dynamic"]
    assert main(argv) == 2
    assert "--dynamic applies to --format onnx" in capsys.readouterr().err


def test_onnx_export_takes_a_model_folder_or_a_run(tiny_scenes, tmp_path, monkeypatch) -> None:
    """The CLI hands export_model the folder's model (the ONNX path itself: test_export)."""
    import coopseg.engine.export as export

    seen = []

    def fake_export(model, out, cfg, info, **kwargs):
        seen.append((model, cfg, info))
        return SimpleNamespace(summary=lambda: "exported")

    monkeypatch.setattr(export, "export_model", fake_export)
    run, model = _fake_run(tiny_scenes, tmp_path)
    folder = tmp_path / "hub"
    assert main(["export", str(run), "--format", "hub", "--out", str(folder)]) == 0
    for source in (folder, run):
        seen.clear()
        assert main(["export", str(source), "--out", str(tmp_path / "m.onnx")]) == 0
        exported, cfg, info = seen[0]
        assert cfg.model == {"arch": "unet", "base_channels": 4, "num_classes": 11}
        assert info["class_names"][3] == "c3"
        for (k, a), (_, b) in zip(
            model.state_dict().items(), exported.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), k
