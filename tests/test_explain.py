"""``coopseg explain``: attention read through hooks equals what the modules compute, and
the files hold the maps, the members' disagreement and who is right."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from coopseg.cli import main
from coopseg.config import model_kwargs
from coopseg.data import FashionScenes, build_dataset
from coopseg.engine.checkpoint import load_model, save_weights
from coopseg.engine.train import dataset_info
from coopseg.explain import choose_queries, pam_rows, record_attention, to_cell
from coopseg.models import create_model

from .conftest import tiny_config

TINY_DANET = {"arch": "danet", "backbone": "resnet18", "head_channels": 16}
TINY_DFDAM = {"arch": "dfdam", "backbone": "resnet18", "channels": 16, "attention_channels": 8}
# A cooperative ensemble of one DANet and one DF-DAM: every attention kind, two members.
TINY_ENSEMBLE = {
    "arch": "cooperative",
    "preset": "ensemble",
    "num_classes": 11,
    "members": [{**TINY_DANET, "name": "pos"}, {**TINY_DFDAM, "name": "dual"}],
}


def save_untrained_run(root: Path, out_dir: Path, name: str, model: dict[str, Any]) -> Path:
    """A run folder holding config.yaml and an untrained best.safetensors (no training:
    the pictures and tables only need a model that runs); returns the checkpoint."""
    cfg = tiny_config(root, out_dir, name=name, model=model)
    arch, kwargs = model_kwargs(cfg.model)
    torch.manual_seed(0)
    net = create_model(arch, **kwargs)
    val = build_dataset(cfg.data, "val")
    ckpt = cfg.run_dir / "checkpoints" / "best.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.yaml").write_text(cfg.to_yaml())
    save_weights(ckpt, net, cfg, {**dataset_info(val), "iteration": 0})
    return ckpt


@pytest.fixture(scope="module")
def ensemble_checkpoint(tiny_scenes, tmp_path_factory) -> Path:
    return save_untrained_run(
        tiny_scenes, tmp_path_factory.mktemp("explain"), "ensemble", TINY_ENSEMBLE
    )


@pytest.fixture(scope="module")
def scene_files(tiny_scenes, tmp_path_factory) -> tuple[Path, Path]:
    """Val scene 1 as an RGB PNG and its mask as a grey PNG (values are class ids)."""
    folder = tmp_path_factory.mktemp("scene")
    image, mask = FashionScenes(tiny_scenes, "val").load(1)
    Image.fromarray(image).save(folder / "scene.png")
    Image.fromarray(mask.astype(np.uint8)).save(folder / "mask.png")
    return folder / "scene.png", folder / "mask.png"


@pytest.mark.parametrize("impl", ["dense", "sdpa"])
def test_pam_row_is_the_attention_the_module_applied(impl) -> None:
    """A recomputed row sums to 1 and, applied to the module's values, gives exactly the
    module's own output at that position (gamma set to 1), whichever kernel ran."""
    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY_DANET.items() if k != "arch"}
    model = create_model("danet", num_classes=5, pam_impl=impl, **kwargs)
    model.eval()
    pam = model.position.attention
    with torch.no_grad():
        pam.gamma.fill_(1.0)
    seen = {}
    handle = pam.register_forward_hook(lambda m, a, o: seen.update(x=a[0], out=o))
    with record_attention(model) as maps, torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    handle.remove()
    module, features = maps.pam["model"]
    assert module is pam and torch.equal(features, seen["x"])
    cells = [(0, 0), (3, 5), (7, 11)]
    rows = pam_rows(module, features, cells)  # [1, 3, 8, 12]
    assert rows.shape == (1, 3, 8, 12)
    torch.testing.assert_close(rows.sum((2, 3)), torch.ones(1, 3))
    with torch.no_grad():
        v = pam.value(features).flatten(2)  # [1, C, N]
    for i, (fy, fx) in enumerate(cells):
        by_hand = v[0] @ rows[0, i].flatten()  # sum_j a_ij v_j
        module_out = seen["out"][0, :, fy, fx] - features[0, :, fy, fx]
        torch.testing.assert_close(by_hand, module_out, rtol=1e-4, atol=1e-5)


def test_choose_queries_lands_inside_the_largest_regions() -> None:
    labels = np.zeros((64, 64), dtype=np.uint8)
    labels[8:40, 8:30] = 3
    labels[20:60, 40:60] = 5
    labels[0:4, 0:4] = 255  # ignored pixels never make a query
    points = choose_queries(labels, (16, 16), count=3)
    assert sorted(labels[y, x] for y, x in points) == [0, 3, 5]
    for y, x in points:  # deep inside: the cells around are the same class
        assert (labels[y - 4 : y + 5, x - 4 : x + 5] == labels[y, x]).all(), (y, x)
    assert to_cell((63, 0), (64, 64), (16, 16)) == (15, 0)


def test_explain_writes_attention_and_who_is_right(ensemble_checkpoint, scene_files, tmp_path):
    image, mask = scene_files
    out = tmp_path / "explain"
    argv = ["explain", str(ensemble_checkpoint), str(image), "--out", str(out)]
    argv += ["--mask", str(mask), "--query", "20", "30", "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads((out / "explain.json").read_text())
    for name in summary["files"]:  # every listed file exists; every PNG decodes
        assert (out / name).is_file(), name
        if name.endswith(".png"):
            with Image.open(out / name) as img:
                img.load()
                assert img.width > 0
    expected = ["input", "mask", "pam_pos_q0", "dafm_dual", "beta_dual", "disagreement"]
    expected += ["who_is_right", "confidence_pos", "confidence_dual", "errors_fused"]
    expected += [f"prediction_{o}" for o in ("fused", "pos", "dual")]
    assert {f"{n}.png" for n in expected} <= set(summary["files"])
    assert summary["attention"]["pam"]["pos"]["queries"][0]["pixel"] == [20, 30]
    assert summary["attention"]["pam"]["pos"]["queries"][0]["cell"] == [2, 3]  # stride 8

    arrays = np.load(out / "attention.npz")
    rows = arrays["pam/pos"]
    assert rows.shape == (1, 8, 8)
    np.testing.assert_allclose(rows.sum((1, 2)), 1.0, rtol=1e-5)

    # The DAFM weights and β equal the modules' outputs on the same input, by hand.
    model, cfg, _ = load_model(ensemble_checkpoint)
    rgb = np.array(Image.open(image).convert("RGB"))
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255 - mean) / std
    dual = model.members["dual"]
    seen = {}
    hooks = [
        dual.dafm.register_forward_hook(lambda m, a, o: seen.update(high=a[1])),
        dual.pam.register_forward_hook(lambda m, a, o: seen.update(pam_in=a)),
    ]
    with torch.no_grad():
        model(x)
        alpha_high = torch.sigmoid(dual.dafm.weight_high[1](seen["high"].mean((2, 3), True)))
        beta = dual.pam.confidence(torch.cat(seen["pam_in"], 1))
    for h in hooks:
        h.remove()
    np.testing.assert_allclose(arrays["alpha_high/dual"], alpha_high.flatten(), atol=1e-5)
    np.testing.assert_allclose(arrays["beta/dual"], beta[0, 0], atol=1e-5)
    assert arrays["alpha_low/dual"].shape == (16,) and arrays["beta/dual"].shape == (16, 16)

    # Who is right where the members disagree, counted by hand from the saved maps.
    target = np.asarray(Image.open(mask))
    pos, dual_pred = arrays["prediction/pos"], arrays["prediction/dual"]
    disagree = (pos != dual_pred) & (target != 255)
    counts = summary["cooperative"]["who_is_right"]
    assert counts["disagree"] == int(disagree.sum())
    assert counts["pos"] == int((disagree & (pos == target)).sum())
    assert counts["dual"] == int((disagree & (dual_pred == target)).sum())
    assert counts["none"] == int((disagree & (pos != target) & (dual_pred != target)).sum())
    assert counts["pos"] + counts["dual"] + counts["several"] + counts["none"] == counts["disagree"]


def test_explain_without_mask_shows_disagreement_and_confidence(
    ensemble_checkpoint, scene_files, tmp_path
) -> None:
    image, _ = scene_files
    out = tmp_path / "nomask"
    assert main(["explain", str(ensemble_checkpoint), str(image), "--out", str(out)]) == 0
    summary = json.loads((out / "explain.json").read_text())
    assert "who_is_right" not in summary["cooperative"]
    assert {"disagreement.png", "confidence_pos.png", "confidence_dual.png"} <= set(
        summary["files"]
    )
    arrays = np.load(out / "attention.npz")
    disagree = arrays["prediction/pos"] != arrays["prediction/dual"]
    assert summary["cooperative"]["disagreement_fraction"] == pytest.approx(disagree.mean())
    conf = arrays["confidence/pos"]
    assert conf.shape == (64, 64) and (conf >= 1 / 11 - 1e-6).all() and (conf <= 1).all()
    # No mask: queries come from the prediction, one inside each of the largest regions.
    assert 1 <= len(summary["attention"]["pam"]["pos"]["queries"]) <= 3


def test_explain_refuses_a_mask_of_another_size(ensemble_checkpoint, scene_files, tmp_path, capsys):
    image, _ = scene_files
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(small)
    argv = ["explain", str(ensemble_checkpoint), str(image), "--out", str(tmp_path / "x")]
    assert main([*argv, "--mask", str(small)]) == 2
    assert "small.png: mask is 10x12 but the image is 64x64" in capsys.readouterr().err
