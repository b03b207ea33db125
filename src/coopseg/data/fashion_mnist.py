"""Reader for the Fashion-MNIST IDX files that FashionScenes is built from.

The files come from the Debian package ``dataset-fashion-mnist`` (or any folder holding
the four standard files), never from the internet, so every failure here has to say
which file is wrong and how to get a good copy.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .base import DataError

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")

SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
ALL_FILES: tuple[str, ...] = SPLIT_FILES["train"] + SPLIT_FILES["test"]

FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/ format).
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: Path | str) -> np.ndarray:
    """Parse one IDX file (gzip or plain), checking the header against the payload size.

    A truncated or corrupt download would otherwise turn into a reshape error or, worse,
    silently shifted pixels; here it becomes a :class:`DataError` naming the file.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read or decompress ({exc}); the file is corrupt") from exc

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX data type code 0x{type_code:02x}")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares zero dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        raise DataError(
            f"{path}: IDX header says shape {dims} ({expected} data bytes) but the file has "
            f"{actual} data bytes; the file is truncated or corrupt"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _resolve(source_dir: Path, name: str) -> Path | None:
    """The file ``name``, or its un-gzipped twin (people often extract the archives)."""
    for candidate in (source_dir / name, source_dir / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def missing_files_message(source_dir: Path, missing: list[str]) -> str:
    """The one explanation of how to get the source files, shared by every caller."""
    return (
        f"Fashion-MNIST source files missing in {source_dir}: {', '.join(missing)}. "
        "Install them with `apt-get install dataset-fashion-mnist` (Debian; files land in "
        f"{DEFAULT_SOURCE}), or pass `--source DIR` / set `data.source` to a folder holding "
        f"the four files {', '.join(ALL_FILES)}."
    )


def check_source(source_dir: Path | str, splits: tuple[str, ...] = ("train", "test")) -> None:
    """Fail early, listing every missing file at once rather than one per attempt."""
    source_dir = Path(source_dir)
    names = [name for split in splits for name in SPLIT_FILES[split]]
    missing = [name for name in names if _resolve(source_dir, name) is None]
    if missing:
        raise DataError(missing_files_message(source_dir, missing))


def load_fashion_mnist(source_dir: Path | str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``[N, 28, 28]`` and labels uint8 ``[N]`` (0..9) of one split."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    source_dir = Path(source_dir)
    check_source(source_dir, (split,))
    image_name, label_name = SPLIT_FILES[split]
    image_path = _resolve(source_dir, image_name)
    label_path = _resolve(source_dir, label_name)
    assert image_path is not None and label_path is not None  # check_source guarantees it
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{image_path}: expected uint8 images [N, H, W], got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(
            f"{label_path}: expected uint8 labels [N], got {labels.dtype} {tuple(labels.shape)}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels"
        )
    if labels.size and int(labels.max()) >= len(FASHION_CLASSES):
        raise DataError(f"{label_path}: label {int(labels.max())} is outside 0..9")
    return images, labels
