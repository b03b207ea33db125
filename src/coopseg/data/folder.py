"""Your own data: a folder of images and masks matched by file stem.

::

    ROOT/images/<stem>.{jpg,png,...}
    ROOT/masks/<stem>.png
    ROOT/classes.yaml              (or data.classes_file)
    ROOT/splits/{train,val}.txt    optional: one stem per line

Masks are either *index* images (PNG mode ``L``, or ``P`` whose pixel values are
read as indices, never as colours): value = class index, 255 = ignore; or
*colour* images (``RGB``/``RGBA``), decoded through the colours of the class file.

The class file is YAML (so JSON works too), in class-index order, either a list of
names (index masks only)::

    [background, crack, corrosion]

or a mapping of name to ``[r, g, b]``; an entry named ``ignore`` is not a class but
the colour of pixels to ignore (label 255)::

    background: [0, 0, 0]
    crack: [255, 0, 0]
    corrosion: [0, 255, 0]
    ignore: [255, 255, 255]

Without ``splits/``, a deterministic split holds out ``data.val_ratio`` of the stems
(shuffled with ``data.split_seed``) for ``val``; the rest is ``train``. Every image
needs a mask and every mask an image: unmatched files are errors named one by one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml

from .base import IGNORE_INDEX, DataError, Transform
from .fashionscenes import _voc_palette
from .files import IMAGE_SUFFIXES, FileDataset, Problem, open_mask, read_list

CLASS_FILES = ("classes.yaml", "classes.yml", "classes.json")
IGNORE_NAME = "ignore"


class ClassTable(NamedTuple):
    """Class names, their colours (``[K, 3]`` uint8), and whether colours were given."""

    names: tuple[str, ...]
    palette: np.ndarray
    has_colours: bool
    ignore_colour: tuple[int, int, int] | None


def load_classes(path: str | Path) -> ClassTable:
    """Read a class file (see the module docstring); errors name the file and entry."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: class file not found", "missing_class_file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot read class file ({exc})", "unreadable") from exc
    if isinstance(raw, list) and raw and all(isinstance(n, str) for n in raw):
        names = tuple(raw)
        return ClassTable(names, _voc_palette(len(names)), False, None)
    if not isinstance(raw, dict) or not raw:
        raise DataError(
            f"{path}: expected a list of class names or a mapping name: [r, g, b]", "bad_format"
        )
    names, colours, ignore = [], [], None
    for name, colour in raw.items():
        ok = (
            isinstance(colour, list)
            and len(colour) == 3
            and all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in colour
            )
        )
        if not ok:
            raise DataError(
                f"{path}: class {name!r}: colour must be [r, g, b] in 0..255, got {colour!r}",
                "bad_format",
            )
        if str(name) == IGNORE_NAME:
            ignore = tuple(colour)
            continue
        names.append(str(name))
        colours.append(colour)
    if len(names) > 255:
        raise DataError(
            f"{path}: {len(names)} classes; at most 255 fit an 8-bit mask", "bad_format"
        )
    seen: dict[tuple[int, ...], str] = {}
    for name, colour in zip(names, colours, strict=True):
        key = tuple(colour)
        if key in seen or key == ignore:
            other = seen.get(key, IGNORE_NAME)
            raise DataError(f"{path}: classes {other!r} and {name!r} share colour {colour}")
        seen[key] = name
    if not names:
        raise DataError(f"{path}: no classes listed", "bad_format")
    return ClassTable(tuple(names), np.array(colours, dtype=np.uint8), True, ignore)


def decode_colours(rgb: np.ndarray, table: ClassTable, name: str | Path) -> np.ndarray:
    """An ``[H, W, 3]`` colour mask -> class indices (255 for the ignore colour)."""
    keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    pal = table.palette.astype(np.int32)
    table_keys = list((pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2])
    values = list(range(len(table.names)))
    if table.ignore_colour is not None:
        r, g, b = table.ignore_colour
        table_keys.append((r << 16) | (g << 8) | b)
        values.append(IGNORE_INDEX)
    order = np.argsort(table_keys)
    sorted_keys = np.asarray(table_keys, dtype=np.int32)[order]
    sorted_vals = np.asarray(values, dtype=np.uint8)[order]
    pos = np.clip(np.searchsorted(sorted_keys, keys), 0, len(sorted_keys) - 1)
    found = sorted_keys[pos] == keys
    if not found.all():
        bad = np.unique(keys[~found])[:5]
        colours = [[int(k) >> 16, (int(k) >> 8) & 255, int(k) & 255] for k in bad]
        raise DataError(
            f"{name}: mask colours {colours} are not in the class file "
            f"(add them, or name one 'ignore')",
            "bad_label",
        )
    return sorted_vals[pos]


def ratio_split(stems: Sequence[str], val_ratio: float, seed: int) -> dict[str, list[str]]:
    """Deterministic ``train``/``val`` split of ``stems`` (order-independent)."""
    if not 0.0 <= val_ratio < 1.0:
        raise DataError(f"data.val_ratio must be in [0, 1), got {val_ratio}", "bad_list")
    ordered = sorted(stems)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_val = math.floor(len(ordered) * val_ratio + 0.5)
    if val_ratio > 0 and len(ordered) >= 2:
        n_val = min(max(n_val, 1), len(ordered) - 1)
    val = sorted(ordered[i] for i in perm[:n_val])
    train = sorted(ordered[i] for i in perm[n_val:])
    return {"train": train, "val": val}


def _by_stem(folder: Path, suffixes: Sequence[str], problems: list[Problem]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        if path.stem in found:
            problems.append(
                Problem(
                    "missing_pair",
                    str(path),
                    f"{path}: same stem as {found[path.stem].name}; stems must be unique",
                )
            )
            continue
        found[path.stem] = path
    return found


class FolderDataset(FileDataset):
    """One split of an ``images/`` + ``masks/`` folder (see the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        classes_file: str | Path | None = None,
        val_ratio: float = 0.1,
        split_seed: int = 0,
        strict: bool = True,
    ) -> None:
        super().__init__(transform)
        self.root = Path(root)
        self.split = split
        if classes_file is None:
            found = [self.root / n for n in CLASS_FILES if (self.root / n).is_file()]
            if not found:
                raise DataError(
                    f"{self.root / CLASS_FILES[0]}: no class file (none of "
                    f"{', '.join(CLASS_FILES)} in {self.root}); write one or set "
                    "data.classes_file",
                    "missing_class_file",
                )
            classes_file = found[0]
        self.classes = load_classes(classes_file)
        self.class_names = self.classes.names
        self.palette = self.classes.palette
        image_dir, mask_dir = self.root / "images", self.root / "masks"
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                self.problems.append(
                    Problem("missing_pair", str(folder), f"{folder}: folder not found")
                )
        if not self.problems:
            self._scan(image_dir, mask_dir, val_ratio, split_seed)
        self._finish(strict, f"folder data set {self.root} ({split} split)")

    def _scan(self, image_dir: Path, mask_dir: Path, val_ratio: float, seed: int) -> None:
        images = _by_stem(image_dir, IMAGE_SUFFIXES, self.problems)
        masks = _by_stem(mask_dir, (".png",), self.problems)
        for stem in sorted(images.keys() - masks.keys()):
            self.problems.append(
                Problem("missing_pair", str(images[stem]), f"{images[stem]}: no mask {stem}.png")
            )
        for stem in sorted(masks.keys() - images.keys()):
            self.problems.append(
                Problem("missing_pair", str(masks[stem]), f"{masks[stem]}: no image {stem}.*")
            )
        paired = sorted(images.keys() & masks.keys())
        list_file = self.root / "splits" / f"{self.split}.txt"
        if list_file.is_file():
            stems = read_list(list_file)
            for stem in stems:
                if stem not in paired and stem not in images and stem not in masks:
                    self.problems.append(
                        Problem("bad_list", str(list_file), f"{list_file}: {stem!r} has no files")
                    )
        elif (self.root / "splits").is_dir():
            self.problems.append(Problem("bad_list", str(list_file), f"{list_file}: not found"))
            stems = []
        elif self.split in ("train", "val"):
            stems = ratio_split(paired, val_ratio, seed)[self.split]
        else:
            self.problems.append(
                Problem(
                    "bad_list",
                    str(list_file),
                    f"{list_file}: not found (without splits/, only train and val exist)",
                )
            )
            stems = []
        pairs = set(paired)
        for stem in stems:
            if stem in pairs:
                self.images.append(images[stem])
                self.masks.append(masks[stem])

    def read_mask(self, index: int) -> np.ndarray:
        path = self.masks[index]
        img = open_mask(path)
        if img.mode in ("P", "L"):
            return np.asarray(img)
        if img.mode in ("RGB", "RGBA"):
            if not self.classes.has_colours:
                raise DataError(
                    f"{path}: colour mask, but the class file lists names without colours",
                    "bad_format",
                )
            return decode_colours(np.asarray(img.convert("RGB")), self.classes, path)
        raise DataError(
            f"{path}: mask mode {img.mode}; expected an index PNG (L or P) or a colour PNG",
            "bad_format",
        )
