"""FashionScenes: the small built-in segmentation data set that needs no download.

Scenes are procedural canvases with one to four tinted Fashion-MNIST objects pasted on
top of each other, so a model has to separate objects from textured backgrounds and
from each other, and labels are exact by construction. Everything is derived from a
seed, built once in a few seconds and cached as ``.npz`` files.

Labels follow the VOC convention: 0 is background, 1..10 are the Fashion-MNIST classes
(fashion label + 1), and 255 marks the thin, half-transparent border band of each object
(opacity between 0.2 and 0.8) where the true class is ambiguous, which the loss and
metrics ignore.
"""

from __future__ import annotations

import json
import math
import os
import time
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from ..config import ConfigError
from ..fileio import atomic_write
from .base import IGNORE_INDEX, DataError, SegmentationDataset, Transform
from .fashion_mnist import DEFAULT_SOURCE, FASHION_CLASSES, check_source, load_fashion_mnist

GENERATOR_VERSION = 1

CLASS_NAMES: tuple[str, ...] = ("background", *FASHION_CLASSES)
NUM_CLASSES = len(CLASS_NAMES)


def _voc_palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map, so masks look familiar next to VOC ones."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


PALETTE: np.ndarray = _voc_palette(NUM_CLASSES)

# Scene recipe. Changing any of these changes the scenes: bump GENERATOR_VERSION.
MIN_OBJECTS, MAX_OBJECTS = 1, 4
SCALE_RANGE = (0.8, 2.2)  # times 28 px on a 128 px canvas; grows with larger canvases
SILHOUETTE_LEVEL = 10  # source pixels >= this (of 255) belong to the object's silhouette
ON_LEVEL = 0.8  # object opacity above which a pixel is labelled with the object's class
EDGE_LEVEL = 0.2  # opacity in (EDGE_LEVEL, ON_LEVEL]: border band, labelled IGNORE_INDEX
MIN_VISIBLE = 0.5  # each object keeps at least this fraction of its "on" pixels visible
PLACEMENT_TRIES = 8
MIN_TINT_DISTANCE = 0.35  # RGB distance (in [0, 1] units) between tint and background

SPLITS = {"train": 0, "val": 1}  # split -> seed stream; val is built from the test split
SOURCE_SPLIT = {"train": "train", "val": "test"}
ARRAY_KEYS = ("images", "masks", "objects", "count", "dominant", "present")


class Scene(NamedTuple):
    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray  # uint8 [H, W], values in 0..10 or 255
    objects: tuple[int, ...]  # class ids (1..10) in drawing order, all visible


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A cheap random backdrop (gradient, blotches, stripes or checker), float32 [H, W, 3]."""
    yy, xx = _grid(size)
    c0, c1 = rng.uniform(0.0, 1.0, (2, 3)).astype(np.float32)
    kind = int(rng.integers(4))
    if kind == 0:  # smooth linear gradient
        theta = rng.uniform(0.0, 2.0 * math.pi)
        t = xx * math.cos(theta) + yy * math.sin(theta)
        t -= t.min()
        t /= max(float(t.max()), 1e-6)
        return c0 + (c1 - c0) * t[..., None]
    if kind == 1:  # low-frequency colour noise: a tiny random image upsampled smoothly
        cells = int(rng.integers(2, 7))
        small = (rng.uniform(0.0, 1.0, (cells, cells, 3)) * 255.0).astype(np.uint8)
        big = Image.fromarray(small, "RGB").resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(big, dtype=np.float32) / 255.0
    scale = size / 128.0
    if kind == 2:  # soft stripes at a random angle
        theta = rng.uniform(0.0, math.pi)
        period = rng.uniform(6.0, 24.0) * scale
        phase = rng.uniform(0.0, 2.0 * math.pi)
        u = xx * math.cos(theta) + yy * math.sin(theta)
        t = np.clip(1.5 * np.sin(u * (2.0 * math.pi / period) + phase) + 0.5, 0.0, 1.0)
        return c0 + (c1 - c0) * t[..., None]
    cell = max(2, round(float(rng.uniform(6.0, 24.0)) * scale))  # checkerboard
    oy, ox = rng.integers(0, cell, 2)
    t = (((yy + oy) // cell + (xx + ox) // cell) % 2).astype(np.float32)
    return c0 + (c1 - c0) * t[..., None]


def _resize(src: np.ndarray, side: int) -> np.ndarray:
    img = Image.fromarray(src).resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _pick_tint(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour that stands out from the background it is pasted on."""
    mean = under.reshape(-1, 3).mean(axis=0)
    best, best_dist = None, -1.0
    for _ in range(4):
        tint = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        dist = float(np.linalg.norm(tint - mean))
        if dist >= MIN_TINT_DISTANCE:
            return tint
        if dist > best_dist:
            best, best_dist = tint, dist
    assert best is not None
    return best


def render_scene(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    size: int = 128,
    num_objects: int | None = None,
) -> Scene:
    """Compose one scene from Fashion-MNIST ``images``/``labels`` (labels 0..9).

    An object's opacity comes from its silhouette (source pixels >= ``SILHOUETTE_LEVEL``),
    and brightness only shades its tint: labelling by brightness (say > 0.5 of max) would
    mark the dark interior of about a quarter of Fashion-MNIST items as ignore. Labels use
    the same opacity the image is blended with, so the mask matches what is drawn.

    Objects are drawn in order, later ones on top, but a placement that would hide more
    than half of an earlier object is retried (and the object dropped if no place works),
    so every object listed in ``Scene.objects`` is visible: ``count`` stays meaningful.
    """
    if num_objects is None:
        num_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    canvas = _background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    owner = np.full((size, size), -1, dtype=np.int16)  # which object an "on" pixel shows
    total: list[int] = []  # "on" pixels of each placed object when drawn
    visible: list[int] = []  # of those, how many are still visible
    objects: list[int] = []
    grow = max(1.0, size / 128.0)
    for _ in range(num_objects):
        idx = int(rng.integers(len(images)))
        src = images[idx]
        side = round(28 * grow * rng.uniform(*SCALE_RANGE))
        side = int(min(max(side, 4), size))
        silhouette = (src >= SILHOUETTE_LEVEL).astype(np.uint8) * 255
        if not silhouette.any():  # a blank source image has nothing to paste
            continue
        opacity = _resize(silhouette, side) / 255.0
        shade = _resize(src, side)
        shade /= max(float(shade.max()), 1.0)
        on = opacity > ON_LEVEL
        band = (opacity > EDGE_LEVEL) & ~on
        if not on.any():  # a speck that vanishes when resized would be an invisible object
            continue
        covers = on | band
        for _try in range(PLACEMENT_TRIES):
            y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
            hit = owner[y0 : y0 + side, x0 : x0 + side][covers]
            lost = np.bincount(hit[hit >= 0].astype(np.intp), minlength=len(total))
            remaining = np.asarray(visible, dtype=np.int64) - lost
            if np.all(remaining >= MIN_VISIBLE * np.asarray(total, dtype=np.int64)):
                break
        else:
            continue
        for k, lo in enumerate(lost):
            visible[k] -= int(lo)
        cls = int(labels[idx]) + 1
        region = canvas[y0 : y0 + side, x0 : x0 + side]
        tint = _pick_tint(rng, region)
        colour = tint * (0.3 + 0.7 * shade)[..., None]
        region += opacity[..., None] * (colour - region)
        mask_region = mask[y0 : y0 + side, x0 : x0 + side]
        mask_region[band] = IGNORE_INDEX
        mask_region[on] = cls
        owner_region = owner[y0 : y0 + side, x0 : x0 + side]
        owner_region[band] = -1
        owner_region[on] = len(total)
        n_on = int(on.sum())
        total.append(n_on)
        visible.append(n_on)
        objects.append(cls)
    image = np.clip(canvas * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    return Scene(image, mask, tuple(objects))


def scene_labels(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """``dominant`` class (most labelled pixels, 0 if none), multi-hot of classes seen, and
    the pixel histogram over label values 0..255.

    The multi-hot includes background (index 0) when background pixels are present.
    """
    hist = np.bincount(mask.ravel(), minlength=256)
    objects = hist[1:NUM_CLASSES]
    dominant = int(objects.argmax()) + 1 if objects.sum() > 0 else 0
    present = (hist[:NUM_CLASSES] > 0).astype(np.uint8)
    return dominant, present, hist


def build_split(
    images: np.ndarray, labels: np.ndarray, n: int, size: int, seed: int, split: str
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All arrays of one split and its label histogram [256].

    Scene ``i`` depends only on (seed, split, i), not on ``n``, so a larger build extends a
    smaller one instead of reshuffling it.
    """
    pixels = np.zeros(256, dtype=np.int64)
    out = {
        "images": np.zeros((n, size, size, 3), dtype=np.uint8),
        "masks": np.zeros((n, size, size), dtype=np.uint8),
        "objects": np.zeros((n, MAX_OBJECTS), dtype=np.uint8),  # class ids, 0-padded
        "count": np.zeros(n, dtype=np.uint8),
        "dominant": np.zeros(n, dtype=np.uint8),
        "present": np.zeros((n, NUM_CLASSES), dtype=np.uint8),
    }
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS[split], i])
        scene = render_scene(rng, images, labels, size)
        out["images"][i] = scene.image
        out["masks"][i] = scene.mask
        out["objects"][i, : len(scene.objects)] = scene.objects
        out["count"][i] = len(scene.objects)
        out["dominant"][i], out["present"][i], hist = scene_labels(scene.mask)
        pixels += hist
    return out, pixels


def default_root(size: int = 128, train: int = 2000, val: int = 250, seed: int = 0) -> Path:
    """Cache folder used when no ``root`` is given (``$COOPSEG_CACHE`` overrides the base)."""
    base = Path(os.environ.get("COOPSEG_CACHE", "~/.cache/coopseg")).expanduser()
    name = f"s{size}-n{train}-{val}-seed{seed}-v{GENERATOR_VERSION}"
    return base / "fashionscenes" / name


def _corrupt(path: Path, why: str) -> DataError:
    return DataError(
        f"{path}: cached FashionScenes file is corrupt ({why}); delete it (or its folder) "
        "or rebuild with force=True (`--force`)"
    )


def _check_npz(path: Path) -> None:
    try:
        with np.load(path) as z:
            missing = [k for k in ARRAY_KEYS if k not in z.files]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise _corrupt(path, str(exc)) from exc
    if missing:
        raise _corrupt(path, f"missing arrays {missing}")


def _cached(root: Path, params: dict[str, int], source: Path | None) -> bool:
    """True if ``root`` already holds a complete build with these params."""
    meta_path = root / "meta.json"
    if not meta_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
        same = meta["version"] == GENERATOR_VERSION and meta["params"] == params
        same_source = source is None or meta["source"] == str(source)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _corrupt(meta_path, f"unreadable meta.json: {exc}") from exc
    if not (same and same_source):
        return False
    if not all((root / f"{split}.npz").exists() for split in SPLITS):
        return False
    for split in SPLITS:
        _check_npz(root / f"{split}.npz")
    return True


def _split_stats(arrays: dict[str, np.ndarray], pixels: np.ndarray) -> dict[str, Any]:
    objects = arrays["objects"]
    return {
        "scenes": len(arrays["count"]),
        "objects_per_class": np.bincount(objects.ravel(), minlength=NUM_CLASSES)[1:].tolist(),
        "dominant_per_class": np.bincount(arrays["dominant"], minlength=NUM_CLASSES).tolist(),
        "count_histogram": np.bincount(arrays["count"], minlength=MAX_OBJECTS + 1).tolist(),
        "pixels_per_label": {str(k): int(v) for k, v in enumerate(pixels) if v},
    }


def build_fashionscenes(
    root: Path | None = None,
    size: int = 128,
    train: int = 2000,
    val: int = 250,
    seed: int = 0,
    source: Path | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse) the cached scenes and return the folder holding them.

    ``source=None`` means "any source" when checking the cache and :data:`DEFAULT_SOURCE`
    when building, so a copied cache works on a machine without the Debian package.
    """
    # ConfigError (a ValueError) so the CLI reports a bad --size/--train/... in one line
    for name, value, low, keys in (
        ("size", size, 16, "--size, data.scene_size"),
        ("train", train, 1, "--train, data.train_scenes"),
        ("val", val, 1, "--val, data.val_scenes"),
        ("seed", seed, 0, "--seed, data.scene_seed"),
    ):
        if value < low:
            raise ConfigError(f"FashionScenes {name} ({keys}): expected >= {low}, got {value}")
    root = default_root(size, train, val, seed) if root is None else Path(root)
    resolved = Path(source).expanduser().resolve() if source is not None else None
    params = {"size": size, "train": train, "val": val, "seed": seed}
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: FashionScenes output path exists and is not a folder")
    if not force and _cached(root, params, resolved):
        return root

    src = resolved if resolved is not None else DEFAULT_SOURCE
    check_source(src)  # list every missing file at once, before any work
    start = time.perf_counter()
    counts = {"train": train, "val": val}
    splits, stats = {}, {}
    for split in SPLITS:
        images, labels = load_fashion_mnist(src, SOURCE_SPLIT[split])
        arrays, pixels = build_split(images, labels, counts[split], size, seed, split)
        splits[split], stats[split] = arrays, _split_stats(arrays, pixels)
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").unlink(missing_ok=True)  # the cache is invalid until meta is back
    for split, arrays in splits.items():
        atomic_write(root / f"{split}.npz", lambda f, a=arrays: np.savez(f, **a))
    meta = {
        "dataset": "fashionscenes",
        "version": GENERATOR_VERSION,
        "params": params,
        "source": str(src),
        "source_splits": SOURCE_SPLIT,
        "class_names": list(CLASS_NAMES),
        "palette": PALETTE.tolist(),
        "ignore_index": IGNORE_INDEX,
        "arrays": {
            "images": "uint8 [N, H, W, 3]",
            "masks": "uint8 [N, H, W], 0..10 or 255",
            "objects": f"uint8 [N, {MAX_OBJECTS}] class ids in drawing order, 0-padded",
            "count": "uint8 [N] number of objects",
            "dominant": "uint8 [N] class with most labelled pixels, 0 if none",
            "present": f"uint8 [N, {NUM_CLASSES}] multi-hot of classes in the mask",
        },
        "counts": stats,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(root / "meta.json", lambda f: f.write(text.encode()))
    return root


class FashionScenes(SegmentationDataset):
    """One split of a built FashionScenes cache, held in memory (about 130 MB at defaults)."""

    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, root: Path | str, split: str = "train", transform: Transform | None = None):
        super().__init__(transform)
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.root = Path(root)
        self.split = split
        self.path = self.root / f"{split}.npz"
        if not self.path.is_file():
            raise DataError(
                f"{self.path}: FashionScenes split file not found; build it with "
                f"`coopseg data fashionscenes --out {self.root}`"
            )
        try:
            with np.load(self.path) as z:
                arrays = {k: z[k] for k in ARRAY_KEYS}
        except KeyError as exc:
            raise _corrupt(self.path, f"missing array {exc}") from exc
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise _corrupt(self.path, str(exc)) from exc
        n = len(arrays["images"])
        images, masks = arrays["images"], arrays["masks"]
        if (
            images.ndim != 4
            or images.shape[3] != 3
            or masks.shape != images.shape[:3]
            or any(len(arrays[k]) != n for k in ARRAY_KEYS)
        ):
            raise _corrupt(self.path, "array shapes disagree")
        self.images: np.ndarray = images
        self.masks: np.ndarray = masks
        self.objects: np.ndarray = arrays["objects"]
        self.count: np.ndarray = arrays["count"]
        self.dominant: np.ndarray = arrays["dominant"]
        self.present: np.ndarray = arrays["present"]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[index], self.masks[index]

    def describe(self, index: int) -> str:
        return f"{self.path}[scene {index}]"
