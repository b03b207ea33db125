"""``coopseg predict``: colour masks and overlays for image files of any size."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..data.base import DataError
from ..visualize import colorize, overlay, palette_image
from .checkpoint import load_model
from .distributed import resolve_device
from .evaluate import SlideWindow, predict_probs

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(
                    f"{item}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    return files


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from err


@torch.no_grad()
def predict_files(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    device: str = "auto",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    slide: SlideWindow | None = None,
) -> list[Path]:
    """Write ``<stem>_mask.png`` (indexed, palette) and ``<stem>_overlay.png`` per image.

    ``slide`` keeps memory bounded on large photos (windows of a fixed size).
    """
    dev = resolve_device(device)
    model, cfg, info = load_model(checkpoint, dev)
    palette = info.get("palette") or [[0, 0, 0]]
    mean = torch.tensor(cfg.data.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std, device=dev).view(1, 3, 1, 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in collect_images(inputs):
        rgb = read_rgb(path)
        x = torch.from_numpy(rgb).to(dev).permute(2, 0, 1)[None].float().div(255)
        probs = predict_probs(model, (x - mean) / std, scales, flip, slide=slide)
        pred = probs.argmax(1)[0].cpu().numpy()
        mask_path = out / f"{path.stem}_mask.png"
        palette_image(pred, palette).save(mask_path)
        overlay_path = out / f"{path.stem}_overlay.png"
        Image.fromarray(overlay(rgb, colorize(pred, palette))).save(overlay_path)
        written += [mask_path, overlay_path]
    return written
