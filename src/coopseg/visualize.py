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


def display_rgb(image: np.ndarray, bands: Sequence[int] | None = None) -> np.ndarray:
    """uint8 ``[H, W, 3]`` to look at: an RGB uint8 image as it is; an N-band float image
    as the three ``bands`` (default the first three; fewer than three: the first, grey),
    each stretched between its 2nd and 98th percentile (remote-sensing practice: raw
    reflectances are dark)."""
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and bands is None:
        return image
    picked = list(bands) if bands is not None else list(range(min(3, image.shape[2])))
    while len(picked) < 3:
        picked.append(picked[0])
    out = np.empty((*image.shape[:2], 3), dtype=np.uint8)
    for i, band in enumerate(picked):
        values = image[..., band].astype(np.float32)
        low, high = np.percentile(values, [2, 98])
        scaled = (values - low) / max(float(high - low), 1e-12)
        out[..., i] = np.clip(scaled * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


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


# --- pictures for `coopseg report` / `coopseg explain` -------------------------------

ERROR_COLOUR = (230, 30, 30)
DISAGREE_COLOUR = (255, 0, 200)
NONE_RIGHT_COLOUR = (230, 30, 30)
SEVERAL_RIGHT_COLOUR = (255, 215, 0)
# One colour per cooperative member (tab10 without its red, kept for errors).
MEMBER_COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
)


def member_colour(index: int) -> tuple[int, int, int]:
    """The colour member ``index`` has in every report and explain picture."""
    return MEMBER_COLOURS[index % len(MEMBER_COLOURS)]


def dimmed(image: np.ndarray, level: float = 0.45) -> np.ndarray:
    """A grey, darkened copy of an RGB image: a backdrop that lets marked pixels stand out."""
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = (grey * level).round().clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def error_map(
    image: np.ndarray, target: np.ndarray, pred: np.ndarray, ignore_index: int = 255
) -> np.ndarray:
    """Wrong pixels in red over the dimmed image; ignored pixels white (not counted)."""
    out = dimmed(image)
    valid = target != ignore_index
    out[valid & (pred != target)] = ERROR_COLOUR
    out[~valid] = IGNORE_COLOUR
    return out


def disagreement_map(
    image: np.ndarray,
    preds: Sequence[np.ndarray],
    target: np.ndarray | None = None,
    ignore_index: int = 255,
) -> np.ndarray:
    """Where members' predictions differ, over the dimmed image.

    Without ``target`` every such pixel is magenta. With it, a pixel only one member
    gets right takes that member's colour (:func:`member_colour`), one several (not
    all) get right is yellow and one none gets right is red, so the picture says which
    member to trust where. Ignored pixels are white.
    """
    stack = np.stack(preds)
    out = dimmed(image)
    disagree = (stack != stack[0]).any(0)
    if target is None:
        out[disagree] = DISAGREE_COLOUR
        return out
    right = stack == target[None]
    count = right.sum(0)
    out[disagree & (count == 0)] = NONE_RIGHT_COLOUR
    out[disagree & (count > 1)] = SEVERAL_RIGHT_COLOUR
    for i in range(len(preds)):
        out[disagree & (count == 1) & right[i]] = member_colour(i)
    out[target == ignore_index] = IGNORE_COLOUR
    return out


def colormap(values: np.ndarray, cmap: str = "inferno", vmin: float = 0.0, vmax: float = 1.0):
    """Floats ``[H, W]`` -> RGB uint8 through a matplotlib colour map (clipped to the range)."""
    from matplotlib import colormaps

    span = vmax - vmin if vmax > vmin else 1.0
    scaled = np.clip((np.asarray(values, dtype=np.float64) - vmin) / span, 0.0, 1.0)
    return (colormaps[cmap](scaled)[..., :3] * 255).round().astype(np.uint8)


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``(height, width)`` (feature map -> image)."""
    values = np.asarray(values, dtype=np.float32)
    if values.shape == tuple(size):
        return values
    img = Image.fromarray(values).resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def heat_overlay(
    image: np.ndarray,
    heat: np.ndarray,
    *,
    cmap: str = "inferno",
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.6,
) -> np.ndarray:
    """A float map (any size: resized bilinearly) drawn over the dimmed image.

    ``vmin``/``vmax`` default to the map's own range, so a nearly flat attention map
    still shows its structure; pass 0 and 1 for probabilities and sigmoid weights.
    """
    heat = resize_map(heat, image.shape[:2])
    lo = float(heat.min()) if vmin is None else vmin
    hi = float(heat.max()) if vmax is None else vmax
    return overlay(dimmed(image, 0.8), colormap(heat, cmap, lo, hi), alpha)


def mark_points(
    image: np.ndarray,
    points: Sequence[tuple[int, int]],
    colour: tuple[int, int, int] = (0, 255, 255),
    radius: int | None = None,
) -> np.ndarray:
    """Crosshairs at ``(y, x)`` pixels (the query pixels of an attention map)."""
    from PIL import ImageDraw

    img = Image.fromarray(image.copy())
    draw = ImageDraw.Draw(img)
    r = radius or max(3, min(image.shape[:2]) // 20)
    width = max(1, r // 3)
    for y, x in points:
        draw.line([(x - r, y), (x + r, y)], fill=colour, width=width)
        draw.line([(x, y - r), (x, y + r)], fill=colour, width=width)
        draw.ellipse([(x - r, y - r), (x + r, y + r)], outline=(0, 0, 0), width=1)
    return np.asarray(img)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement, so small scenes stay crisp in a page or a file."""
    if factor <= 1:
        return image
    return image.repeat(factor, axis=0).repeat(factor, axis=1)
