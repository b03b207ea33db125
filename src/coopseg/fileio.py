"""Atomic file writes: a crash mid-write never leaves a truncated file in place.

No coopseg imports here: data sets, checkpoints and exports all write through it."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

# errors that mean "the disk (or the user's quota) is full"
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def atomic_write(
    path: Path, write: Callable[[BinaryIO], object], keep_previous: Path | None = None
) -> None:
    """Call ``write(fh)`` on a temp file beside ``path``, fsync it, then rename it over.

    ``keep_previous``: first move the file now at ``path`` there, so that the previous
    version survives until the new one is complete and in place (at every instant
    one of the two is a whole file). A full disk raises an ``OSError`` that names
    ``path`` and says the file there was left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches and weights may be shared
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in DISK_FULL_ERRNOS:
            raise OSError(
                err.errno,
                f"cannot write {path}: {os.strerror(err.errno).lower()}; "
                "the file there (if any) was left as it was",
            ) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable (a power cut after them keeps the new names)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_index_png(path: Path, mask: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write a uint8 mask as a PNG atomically (mode P with ``palette``, else mode L)."""
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), "L")
    if palette is not None and len(palette):
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[: min(256, len(palette))] = np.asarray(palette, dtype=np.uint8)[:256]
        img = img.convert("P")
        img.putpalette(flat.ravel().tolist())
    atomic_write(path, lambda f: img.save(f, format="PNG"))
