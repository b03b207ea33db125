"""Phone photos: a JPEG stored sideways with an EXIF orientation tag is read, predicted,
explained, trained on and checked as every viewer shows it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from coopseg.cli import main
from coopseg.config import config_from_dict, model_kwargs
from coopseg.data.files import read_rgb, upright_size
from coopseg.data.folder import FolderDataset
from coopseg.engine.checkpoint import save_weights
from coopseg.models import create_model

H, W = 48, 80  # the displayed image: landscape, 16-pixel blocks (JPEG-friendly)
# orientation -> how the camera stored the displayed image (the inverse of the viewer's turn)
STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def displayed() -> np.ndarray:
    """Blocks of distinct colours, so any turn or flip shows."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (H // 16, W // 16, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((16, 16, 1), dtype=np.uint8))


def phone_jpeg(path: Path, orientation: int) -> Path:
    """``displayed()`` stored as a camera does: turned, with the tag that turns it back."""
    img = Image.fromarray(displayed())
    if STORED[orientation] is not None:
        img = img.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95, exif=exif)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_tag_is_read_as_displayed(tmp_path, orientation) -> None:
    path = phone_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    rgb = read_rgb(path)
    with Image.open(path) as img:
        assert np.array_equal(rgb, np.asarray(ImageOps.exif_transpose(img).convert("RGB")))
    assert rgb.shape == (H, W, 3) and upright_size(path) == (W, H)
    block_means = rgb.reshape(H // 16, 16, W // 16, 16, 3).mean((1, 3))
    expected = displayed()[::16, ::16].astype(float)
    assert np.abs(block_means - expected).max() < 8  # JPEG's loss only, never a turn


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from .conftest import TINY_MEMBER

    cfg = config_from_dict({"model": {**TINY_MEMBER, "num_classes": 3}})
    arch, kwargs = model_kwargs(cfg.model)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("exif") / "w.safetensors"
    palette = [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
    save_weights(path, create_model(arch, **kwargs), cfg, {"palette": palette})
    return path


def test_predict_sees_and_writes_the_displayed_orientation(checkpoint, tmp_path) -> None:
    photo = phone_jpeg(tmp_path / "in" / "photo.jpg", 6)  # stored 48 wide x 80 high
    with Image.open(photo) as img:
        assert img.size == (H, W)
    upright = tmp_path / "in2" / "photo.png"  # the same pixels, turned by hand
    upright.parent.mkdir()
    Image.fromarray(read_rgb(photo)).save(upright)
    for source, out in ((photo, tmp_path / "a"), (upright, tmp_path / "b")):
        argv = ["predict", str(source), "--checkpoint", str(checkpoint), "--out", str(out)]
        assert main(argv) == 0
    for name in ("photo_mask.png", "photo_overlay.png"):
        with Image.open(tmp_path / "a" / name) as got, Image.open(tmp_path / "b" / name) as ref:
            assert got.size == (W, H)
            assert np.array_equal(np.asarray(got), np.asarray(ref))  # the model saw it upright


def test_explain_works_on_the_displayed_orientation(checkpoint, tmp_path) -> None:
    photo = phone_jpeg(tmp_path / "photo.jpg", 8)
    mask = tmp_path / "mask.png"  # a mask drawn on the photo as shown
    Image.fromarray(np.zeros((H, W), dtype=np.uint8), "L").save(mask)
    assert main(["explain", str(checkpoint), str(photo), "--out", str(tmp_path / "x"),
                 "--mask", str(mask), "--device", "cpu"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "x" / "explain.json").read_text())
    assert summary["image_size"] == [H, W]
    with Image.open(tmp_path / "x" / "input.png") as shown:
        assert shown.size[0] / shown.size[1] == W / H


def _folder_of_phone_photos(root: Path, orientations=(6, 3, 1)) -> Path:
    root.mkdir(parents=True)
    (root / "classes.yaml").write_text("[background, thing]\n")
    (root / "splits").mkdir()
    for i, orientation in enumerate(orientations):
        phone_jpeg(root / "images" / f"p{i}.jpg", orientation)
        label = np.zeros((H, W), dtype=np.uint8)
        label[:16, :16] = 1  # the top-left block as shown
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(label, "L").save(root / "masks" / f"p{i}.png")
    stems = "\n".join(f"p{i}" for i in range(len(orientations)))
    (root / "splits" / "train.txt").write_text(stems)
    (root / "splits" / "val.txt").write_text(stems)
    return root


def test_folder_data_and_data_check_use_the_displayed_orientation(tmp_path, capsys) -> None:
    root = _folder_of_phone_photos(tmp_path / "phone")
    data = FolderDataset(root, "train")
    for i in range(len(data)):
        image, mask = data[i]  # the mask (drawn as shown) fits: no size mismatch
        assert tuple(image.shape) == (3, H, W) and tuple(mask.shape) == (H, W)
        assert np.array_equal(data.load(i)[0], read_rgb(data.images[i]))
    assert main(["data", "check", str(root), "--dataset", "folder", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["splits"][0]["sizes"] == {f"{W}x{H}": 3}
