"""N-band images: models with ``in_chans`` (pretrained first convs adapted), the folder
data set reading 4-band .npy / .tif, per-band mean/std, data check's band counts,
training end to end, predict and export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coopseg.cli import main
from coopseg.config import ConfigError, config_from_dict
from coopseg.data import build_dataset
from coopseg.data.files import read_image
from coopseg.models.backbones import create_backbone

MEAN, STD = [0.4, 0.4, 0.4, 0.3], [0.2, 0.2, 0.2, 0.1]


def _four_band_folder(root: Path, n: int = 6, size: int = 24) -> Path:
    """uint16 4-band images (3 .npy, the rest .tif, band-first), the 4th band carries the
    object so a model must read it; masks: 0 background, 1 object."""
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text("[background, object]\n")
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[4 + i : 14 + i, 6:18] = 1
        image = rng.integers(0, 20000, (size, size, 4)).astype(np.uint16)
        image[..., 3] = np.where(mask == 1, 60000, 1000)
        if i < 3:
            np.save(root / "images" / f"s{i}.npy", image)
        else:
            planar = np.moveaxis(image, -1, 0)
            tifffile.imwrite(root / "images" / f"s{i}.tif", planar, photometric="minisblack")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    return root


def test_read_image_scales_bands_and_reads_planar_tiff(tmp_path) -> None:
    root = _four_band_folder(tmp_path / "d")
    npy = read_image(root / "images" / "s0.npy", 4)
    tif = read_image(root / "images" / "s3.tif", 4)
    raw = np.load(root / "images" / "s0.npy")
    assert npy.dtype == np.float32 and npy.shape == (24, 24, 4) and tif.shape == (24, 24, 4)
    np.testing.assert_allclose(npy, raw / 65535.0, rtol=1e-6)
    assert tif[10, 10, 3] == pytest.approx(60000 / 65535)  # the object's band survives
    assert tif[2, 10, 3] == pytest.approx(1000 / 65535)
    with pytest.raises(ValueError, match="uint16 pixels; 3-band images are read as 8-bit"):
        read_image(_rgb16(tmp_path), 3)


def _rgb16(tmp_path: Path) -> Path:
    path = tmp_path / "rgb16.npy"
    np.save(path, np.zeros((4, 4, 3), np.uint16))
    return path


def test_in_chans_adapts_the_pretrained_first_conv_like_timm(tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    imagenet = timm.create_model("resnet18", pretrained=False).state_dict()  # 3-band weights
    save_file(imagenet, tmp_path / "resnet18.safetensors")
    b4 = create_backbone("resnet18", pretrained=str(tmp_path / "resnet18.safetensors"), in_chans=4)
    w3, w4 = imagenet["conv1.weight"], b4.state_dict()["conv1.weight"]
    assert w4.shape == (64, 4, 7, 7)
    # timm's adapt_input_conv: RGB filters repeated cyclically, scaled by 3 / 4
    torch.testing.assert_close(w4[:, :3], w3 * 0.75)
    torch.testing.assert_close(w4[:, 3], w3[:, 0] * 0.75)
    assert torch.equal(b4.state_dict()["layer1.0.conv1.weight"], imagenet["layer1.0.conv1.weight"])


def test_band_counts_are_checked_when_the_config_loads() -> None:
    model = {"arch": "unet", "base_channels": 4, "num_classes": 2, "in_chans": 4}
    data = {"dataset": "folder", "mean": MEAN, "std": STD}
    config_from_dict({"model": model, "data": data})
    with pytest.raises(ConfigError, match=r"data.mean: expected 4 values, one per band"):
        config_from_dict({"model": model, "data": {"dataset": "folder"}})
    with pytest.raises(ConfigError, match=r"data.std: expected 4 values.* got \[0.2, 0.2, 0.2\]"):
        config_from_dict({"model": model, "data": {**data, "std": STD[:3]}})
    with pytest.raises(ConfigError, match=r"folder data set only"):
        config_from_dict({"model": model, "data": {"mean": MEAN, "std": STD}})
    with pytest.raises(ConfigError, match=r"data.rgb_bands: expected 3 band indices in \[0, 4\)"):
        config_from_dict({"model": model, "data": {**data, "rgb_bands": [0, 1, 4]}})


def test_data_check_reports_band_counts_that_disagree(tmp_path, capsys) -> None:
    root = _four_band_folder(tmp_path / "d")
    np.save(root / "images" / "s1.npy", np.zeros((24, 24, 3), np.uint16))  # one 3-band image
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("".join(f"s{i}\n" for i in range(6)))
    argv = ["data", "check", str(root), "--dataset", "folder", "--split", "train", "--json"]
    assert main(argv) == 1
    report = json.loads(capsys.readouterr().out)["splits"][0]
    assert report["bands"] == {"3": 1, "4": 5}
    (error,) = report["errors"]
    assert "s1.npy" in error["message"] and "3 bands, most images: 4" in error["message"]
    assert main([*argv, "--bands", "3"]) == 1
    errors = json.loads(capsys.readouterr().out)["splits"][0]["errors"]
    assert len(errors) == 5 and "4 bands, --bands: 3" in errors[0]["message"]


@pytest.fixture(scope="module")
def four_band_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A 4-band folder data set, trained 3 iterations by ``coopseg train``: (data root,
    best checkpoint, predictions of two images)."""
    tmp = tmp_path_factory.mktemp("bands")
    root = _four_band_folder(tmp / "d")
    cfg = {
        "name": "bands",
        "out_dir": str(tmp / "runs"),
        "device": "cpu",
        "model": {"arch": "unet", "base_channels": 4, "num_classes": 2, "in_chans": 4},
        "data": {
            "dataset": "folder",
            "root": str(root),
            "val_ratio": 0.34,
            "mean": MEAN,
            "std": STD,
            "rgb_bands": [3, 1, 0],
            "crop_size": [16, 16],
            "batch_size": 2,
            "val_batch_size": 2,
        },
        "train": {"iterations": 3, "val_interval": 3, "checkpoint_interval": 0, "lr": 0.05},
    }
    train = build_dataset(config_from_dict(cfg).data, "train")
    image, mask = train[0]
    assert image.shape == (4, 16, 16) and mask.shape == (16, 16)  # cropped, all 4 bands
    config = tmp / "bands.yaml"
    config.write_text(json.dumps(cfg))
    assert main(["train", str(config)]) == 0
    best = tmp / "runs" / "bands" / "checkpoints" / "best.safetensors"
    out = tmp / "pred"
    inputs = [str(root / "images" / "s0.npy"), str(root / "images" / "s4.tif")]
    assert main(["predict", *inputs, "--checkpoint", str(best), "--out", str(out)]) == 0
    return root, best, out


def test_four_band_folder_trains_predicts_and_exports(four_band_run, tmp_path) -> None:
    _, best, out = four_band_run
    overlay = np.asarray(Image.open(out / "s0_overlay.png"))
    mask_png = np.asarray(Image.open(out / "s0_mask.png"))
    assert overlay.shape == (24, 24, 3) and mask_png.shape == (24, 24)
    assert (out / "s4_mask.png").is_file()  # the planar .tif too
    assert main(["export", str(best), "--format", "hub", "--out", str(tmp_path / "hub")]) == 0
    hub = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert hub["model"]["in_chans"] == 4 and hub["mean"] == MEAN


@pytest.mark.slow
def test_four_band_onnx_export_predicts_the_same_masks(four_band_run, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    root, best, out = four_band_run
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(best), "--out", str(onnx_path), "--input-size", "24", "24"]) == 0
    argv = ["predict", str(root / "images" / "s0.npy"), "--model", str(onnx_path)]
    assert main([*argv, "--out", str(tmp_path / "ort")]) == 0
    assert (tmp_path / "ort" / "s0_mask.png").read_bytes() == (out / "s0_mask.png").read_bytes()
