"""The training crop against the images: ``data.crop_size: auto`` and the warning when a
crop is far larger than the data.

A random crop larger than an image is padded (mean colour, ignored label): a 512x512
crop of a 128x128 image is 94 % padding, costs about 15x the time of a crop at the
image's size and teaches nothing. ``auto`` (the folder recipes' value) takes the
training images' median height and width, at most :data:`AUTO_CROP_MAX` each; a crop
given by number is kept, with a warning when more than half of it would be padding at
scale 1. Sizes come from the files' headers (EXIF orientation applied), from an evenly
spread sample of at most :data:`SAMPLE` images, so this costs well under a second.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from ..config import DataConfig
from .base import DataError, SegmentationDataset
from .files import FileDataset, upright_size

AUTO = "auto"
AUTO_CROP_MAX = 512  # auto never trains crops larger than 512x512 (photographs)
SAMPLE = 200  # images whose size is read
WARN_PADDING = 0.5  # warn when more than this fraction of a crop is padding


def image_sizes(dataset: SegmentationDataset, limit: int = SAMPLE) -> list[tuple[int, int]]:
    """``(height, width)`` of up to ``limit`` images spread over ``dataset`` (displayed
    orientation); unreadable files are left out (``data check`` names them)."""
    count = len(dataset)
    picks = sorted({i * count // limit for i in range(limit)}) if count > limit else range(count)
    sizes = []
    for i in picks:
        try:
            if isinstance(dataset, FileDataset):
                w, h = upright_size(dataset.images[i])
            else:
                h, w = dataset.load(i)[0].shape[:2]
        except (OSError, DataError):
            continue
        sizes.append((h, w))
    return sizes


def median_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    return (
        int(statistics.median_low(h for h, _ in sizes)),
        int(statistics.median_low(w for _, w in sizes)),
    )


def auto_crop(sizes: Sequence[tuple[int, int]]) -> list[int]:
    """The crop ``auto`` picks for images of these sizes."""
    h, w = median_size(sizes)
    return [min(h, AUTO_CROP_MAX), min(w, AUTO_CROP_MAX)]


def padding_fraction(crop: Sequence[int], size: tuple[int, int]) -> float:
    """The part of a ``crop`` (height, width) of an image of ``size`` that is padding."""
    ch, cw = int(crop[0]), int(crop[1])
    return 1.0 - min(size[0], ch) * min(size[1], cw) / (ch * cw)


def crop_report(
    crop: Sequence[int], sizes: Sequence[tuple[int, int]], what: str = "the training images"
) -> str:
    """A warning when ``crop`` is far larger than the images (median), else ``""``."""
    if not sizes:
        return ""
    median = median_size(sizes)
    padding = padding_fraction(crop, median)
    if padding <= WARN_PADDING:
        return ""
    h, w = median
    fit = auto_crop(sizes)
    return (
        f"data.crop_size {crop[0]}x{crop[1]} is larger than {what} (median "
        f"{h}x{w} of {len(sizes)} read): about {100 * padding:.0f} % of every crop is "
        f"padding at scale 1, slower and no better; set data.crop_size=[{fit[0]}, {fit[1]}] "
        f"or auto (the images' median size, at most {AUTO_CROP_MAX}x{AUTO_CROP_MAX})"
    )


def _training_sizes(cfg: DataConfig) -> list[tuple[int, int]]:
    if cfg.dataset == "fashionscenes":
        return [(cfg.scene_size, cfg.scene_size)]
    from . import open_dataset

    return image_sizes(open_dataset(cfg, cfg.train_split))


def fit_crop(cfg: DataConfig) -> list[str]:
    """Resolve ``data.crop_size: auto`` in ``cfg`` (to the images' median size, at most
    :data:`AUTO_CROP_MAX`) and return the lines to say at the start of training: what
    ``auto`` chose, or a warning that a crop is far larger than the data."""
    if cfg.crop_size != AUTO:
        warning = crop_report(cfg.crop_size, _training_sizes(cfg))
        return [f"warning: {warning}"] if warning else []
    sizes = _training_sizes(cfg)
    if not sizes:
        raise DataError(
            f"data.crop_size auto: no readable training image in {cfg.root} to size the "
            "crop by; set data.crop_size=[height, width]",
            "unreadable",
        )
    cfg.crop_size = auto_crop(sizes)
    h, w = median_size(sizes)
    return [
        f"data.crop_size auto: {cfg.crop_size[0]}x{cfg.crop_size[1]} (the training images' "
        f"median size {h}x{w}, at most {AUTO_CROP_MAX}x{AUTO_CROP_MAX})"
    ]
