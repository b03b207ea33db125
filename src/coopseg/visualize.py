"""Colour masks, overlays and the image | ground truth | prediction grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_COLOUR = (255, 255, 255)


def colorize(
    mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255
) -> np.ndarray:
    """Class-index mask ``[H, W]`` -> RGB uint8 ``[H, W, 3]`` (ignored pixels white)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    lut[ignore_index] = IGNORE_COLOUR
    return lut[mask.astype(np.uint8)]


def palette_image(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """An indexed ('P' mode) PNG: pixel values are class ids, the viewer shows colours."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    flat[255] = IGNORE_COLOUR
    img.putpalette(flat.flatten().tolist())
    return img


def overlay(image: np.ndarray, mask_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    blended = (1 - alpha) * image.astype(np.float32) + alpha * mask_rgb.astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8)


def save_grid(
    path: Path,
    images: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    palette: Sequence[Sequence[int]],
    scale: int = 2,
) -> Path:
    """One row per sample: image | ground truth | prediction, upscaled ``scale`` times."""
    rows = []
    for image, target, pred in zip(images, targets, predictions, strict=True):
        row = np.concatenate([image, colorize(target, palette), colorize(pred, palette)], axis=1)
        rows.append(row)
    grid = np.concatenate(rows, axis=0)
    out = Image.fromarray(grid)
    if scale > 1:
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path
