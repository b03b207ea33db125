"""Shared plumbing of the on-disk data sets (Cityscapes, VOC, folder).

A file data set is a list of ``(image path, mask path)`` pairs found by a cheap
listing of folders and split files, plus the *structural* problems met while
listing (a mask missing, an id in a split file with no image). Listing never
opens an image: a training run refuses a broken layout at once, naming the files,
but the content of each file is checked only when it is loaded
(:func:`coopseg.data.base.check_pair`) or by ``coopseg data check``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from .base import DataError, SegmentationDataset, Transform

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".npy")
ARRAY_SUFFIXES = (".npy", ".tif", ".tiff")  # read band by band, any band count
MAX_NAMED = 10  # problems named in one error message; the rest are counted

DATA_ROOT_ENV = "COOPSEG_DATA_ROOT"


class Problem(NamedTuple):
    """One structural problem: its kind (see :class:`DataError`), the file, what is wrong."""

    kind: str
    path: str
    message: str


def resolve_root(
    root: str | Path | None, dataset: str, env_var: str | None = None
) -> tuple[Path, str]:
    """The data set folder and where it came from.

    Precedence: ``data.root`` (the config), then the data set's own environment
    variable (``CITYSCAPES_DATASET`` for Cityscapes, as the official scripts use),
    then ``$COOPSEG_DATA_ROOT/<dataset>`` if that folder exists, else
    ``$COOPSEG_DATA_ROOT`` itself (e.g. the folder holding ``VOCdevkit``).
    """
    if root:
        return Path(root).expanduser(), "data.root"
    if env_var and os.environ.get(env_var):
        return Path(os.environ[env_var]).expanduser(), f"${env_var}"
    if os.environ.get(DATA_ROOT_ENV):
        base = Path(os.environ[DATA_ROOT_ENV]).expanduser()
        return (base / dataset if (base / dataset).is_dir() else base), f"${DATA_ROOT_ENV}"
    where = f"${env_var} or " if env_var else ""
    raise DataError(
        f"data.root is not set for data set {dataset!r}; set it in the config "
        f"(--set data.root=PATH) or set {where}${DATA_ROOT_ENV} (the folder holding {dataset}/)",
        "missing_pair",
    )


def summarize(problems: Sequence[Problem], what: str) -> str:
    """One message naming the first :data:`MAX_NAMED` problems and counting the rest."""
    lines = [f"{what}: {len(problems)} problem(s) with the data set layout"]
    lines += [f"  {p.message}" for p in problems[:MAX_NAMED]]
    if len(problems) > MAX_NAMED:
        lines.append(f"  ... and {len(problems) - MAX_NAMED} more (run `coopseg data check`)")
    return "\n".join(lines)


EXIF_ORIENTATION = 0x0112  # the EXIF tag phones write instead of rotating the pixels
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(img: Image.Image) -> Image.Image:
    """The image as every viewer shows it: its EXIF orientation applied (a phone photo
    taken upright is stored sideways with orientation 6). Without the tag, ``img``
    itself; the same transposes as ``PIL.ImageOps.exif_transpose``."""
    method = _TRANSPOSE.get(img.getexif().get(EXIF_ORIENTATION, 1))
    return img if method is None else img.transpose(method)


def upright_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file as displayed, from its header only (a PNG's
    EXIF is looked for before the pixels: Pillow would decode the file to find a late one)."""
    with Image.open(path) as img:
        w, h = img.size
        if img.format == "PNG" and "exif" not in img.info:
            return w, h
        return (h, w) if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (w, h)


def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 ``[H, W, 3]`` in its displayed orientation (EXIF applied,
    :func:`upright`); DataError naming the file if unreadable."""
    try:
        with Image.open(path) as img:
            # a writable copy (torch warns on read-only arrays)
            return np.array(upright(img).convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found", "missing_pair") from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})", "unreadable") from exc


def read_image(path: Path, bands: int | None = 3) -> np.ndarray:
    """An image file as ``[H, W, C]``.

    ``bands == 3``: RGB uint8, as :func:`read_rgb` (a ``.npy`` must hold uint8 RGB).
    Otherwise (N-band data), ``.npy`` and ``.tif`` files are read band by band (``.tif``
    with tifffile) and other formats with PIL as they are (``L``: 1 band, ``RGBA``: 4),
    as float32: integer pixels divided by their type's maximum (uint8 / 255, uint16 /
    65535), floats as stored. ``bands=None`` (``data check``): the file's own bands, no
    conversion. A ``.npy`` is ``[H, W, C]``, or ``[C, H, W]`` when only its first axis
    matches ``bands``; a 2-D array is one band.
    """
    suffix = path.suffix.lower()
    if bands == 3 and suffix != ".npy":
        return read_rgb(path)
    if bands is None and suffix not in ARRAY_SUFFIXES:
        return read_rgb(path)
    if suffix in (".tif", ".tiff"):
        _require_tifffile(path)
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif suffix in (".tif", ".tiff"):
            array = _read_tiff(path)
        else:
            with Image.open(path) as img:
                array = np.array(img)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found", "missing_pair") from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})", "unreadable") from exc
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise DataError(f"{path}: expected an H x W x bands array, got shape {array.shape}")
    if bands and array.shape[0] == bands and array.shape[2] != bands:
        array = np.moveaxis(array, 0, -1)  # [C, H, W]
    if bands is None:
        return array
    if bands == 3:
        if array.dtype != np.uint8:
            raise DataError(
                f"{path}: {array.dtype} pixels; 3-band images are read as 8-bit RGB "
                "(store uint8, or give data.mean/std another band count)",
                "bad_format",
            )
        return np.ascontiguousarray(array)
    return to_float(array, path)


def to_float(array: np.ndarray, path: Path | str) -> np.ndarray:
    """float32 pixels: integers over their type's maximum, floats as they are."""
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise DataError(f"{path}: {array.dtype} pixels; expected integers or floats", "bad_format")


def _require_tifffile(path: Path) -> None:
    try:
        import tifffile  # noqa: F401
    except ImportError:
        raise DataError(
            f"{path}: multi-band TIFF needs tifffile: pip install 'coopseg[multiband]'",
            "unreadable",
        ) from None


def _read_tiff(path: Path) -> np.ndarray:
    """Every band of a TIFF's first image series as ``[H, W, C]`` (planar or not)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            array, axes = series.asarray(), series.axes
    except (tifffile.TiffFileError, IndexError) as exc:
        raise ValueError(str(exc)) from exc
    if array.ndim == 3 and axes[-2:] == "YX":
        array = np.moveaxis(array, 0, -1)  # planar: bands first
    return array


def open_mask(path: Path) -> Image.Image:
    """A mask file, fully decoded, in its displayed orientation (:func:`upright`, like
    the image); DataError naming the file if unreadable."""
    try:
        img = Image.open(path)
        img.load()
        return upright(img)
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found", "missing_pair") from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path}: cannot read mask ({exc})", "unreadable") from exc


def read_index_mask(path: Path) -> np.ndarray:
    """A one-channel mask (palette ``P`` read as indices, or ``L``) as uint8 ``[H, W]``.

    A palette PNG must *not* be converted to RGB: its pixel values already are the
    class indices (VOC, Cityscapes label images).
    """
    img = open_mask(path)
    if img.mode not in ("P", "L"):
        raise DataError(
            f"{path}: mask must be a one-channel index image (PNG mode P or L), got mode "
            f"{img.mode}",
            "bad_format",
        )
    return np.asarray(img)


def read_list(path: Path) -> list[str]:
    """Ids from a split file: one per line, first whitespace-separated field, no blanks."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"{path}: cannot read split list ({exc})", "bad_list") from exc
    return [line.split()[0] for line in text.splitlines() if line.strip()]


class FileDataset(SegmentationDataset):
    """Pairs of image and mask files; subclasses fill ``images``/``masks``/``problems``.

    ``strict=True`` (training, evaluation) raises one :class:`DataError` naming the
    structural problems; ``strict=False`` (``coopseg data check``) keeps them in
    ``problems`` and the pairs that are complete in ``images``/``masks``.
    """

    def __init__(self, transform: Transform | None = None) -> None:
        super().__init__(transform)
        self.images: list[Path] = []
        self.masks: list[Path] = []
        self.problems: list[Problem] = []

    def _finish(self, strict: bool, what: str) -> None:
        if strict and self.problems:
            raise DataError(summarize(self.problems, what), self.problems[0].kind)
        if strict and not self.images:
            raise DataError(f"{what}: no samples found", "missing_pair")

    def __len__(self) -> int:
        return len(self.images)

    def read_mask(self, index: int) -> np.ndarray:
        """The mask of sample ``index`` as class indices (255 = ignore)."""
        return read_index_mask(self.masks[index])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return read_image(self.images[index], self.bands), self.read_mask(index)

    def describe(self, index: int) -> str:
        return f"{self.images[index]} (mask {self.masks[index]})"

    def sample_name(self, index: int) -> str:
        return self.images[index].stem
