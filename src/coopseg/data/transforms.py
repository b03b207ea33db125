"""Image+mask pipelines on torchvision.transforms.v2 (masks resize with nearest).

The papers' recipe: random scale, random crop padded with the mean (mask with the
ignore index), horizontal flip, mean/std normalisation. Options for the JointSeg paper's
("random flip left/right, up/down and random padding", hue/contrast/saturation changes
for the classifier, "each image is standardized by its mean and dividing its standard
deviation"): ``vflip``, ``random_pad`` (the crop first pads every side by that many
pixels, so the content shifts by a random -N..N px), ``jitter`` (``v2.ColorJitter``
arguments) and ``normalize="image"`` / ``"image_channel"`` (per-image standardisation).
:func:`data_transform` builds a split's pipeline from a ``DataConfig``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..config import DataConfig
from .base import IGNORE_INDEX

NORMALIZE_MODES = ("dataset", "image", "image_channel")


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range`` (relative to the input), or,
    given ``scale_set``, drawn with equal chance from that discrete set (the DF-DAM
    paper's "scales contains {0.75, 1.0, 1.25, 1.5, 1.75, 2.0}")."""

    def __init__(
        self, scale_range: Sequence[float], scale_set: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        self.low, self.high = float(scale_range[0]), float(scale_range[1])
        if scale_set is not None and not scale_set:
            raise ValueError("data.scale_set: expected a non-empty list of factors, or null")
        self.scale_set = None if scale_set is None else [float(s) for s in scale_set]

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        if self.scale_set is not None:  # torch's RNG, so SeededAugmentation governs it
            factor = self.scale_set[int(torch.randint(len(self.scale_set), ()).item())]
        else:
            factor = torch.empty(1).uniform_(self.low, self.high).item()
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, size=params["size"], antialias=True)


def standardize(x: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """Per-image standardisation of ``[..., C, H, W]`` floats: ``(x - mean) / std`` over each
    image (TF's ``per_image_standardization``: std at least ``1 / sqrt(n)``, so a flat
    image stays finite), or over each channel of each image with ``per_channel``."""
    dims = (-2, -1) if per_channel else (-3, -2, -1)
    n = math.prod(x.shape[d] for d in dims)
    mean = x.mean(dims, keepdim=True)
    std = x.std(dims, unbiased=False, keepdim=True).clamp_min(1.0 / math.sqrt(n))
    return (x - mean) / std


class PerImageStandardize(v2.Transform):
    """:func:`standardize` on the image (masks pass through)."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, per_channel: bool = False) -> None:
        super().__init__()
        self.per_channel = per_channel

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return tv_tensors.wrap(
            standardize(inpt.as_subclass(torch.Tensor), self.per_channel), like=inpt
        )


def _normalize_tail(
    mean: Sequence[float], std: Sequence[float], normalize: str = "dataset"
) -> list[v2.Transform]:
    if normalize not in NORMALIZE_MODES:
        raise ValueError(
            f"data.normalize: expected one of {list(NORMALIZE_MODES)}, got {normalize!r}"
        )
    scale = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)
    if normalize == "dataset":
        return [scale, v2.Normalize(list(mean), list(std))]
    return [scale, PerImageStandardize(per_channel=normalize == "image_channel")]


def train_transform(
    crop_size: Sequence[int],
    scale_range: Sequence[float],
    hflip: bool,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    vflip: bool = False,
    random_pad: int = 0,
    jitter: Mapping[str, float] | None = None,
    normalize: str = "dataset",
    scale_set: Sequence[float] | None = None,
) -> v2.Compose:
    """Random scale, (random padding +) random crop, flips, colour jitter, normalisation.
    ``scale_set`` (a discrete set of factors) replaces the continuous ``scale_range``."""
    if random_pad < 0:
        raise ValueError(f"data.random_pad: expected >= 0, got {random_pad}")
    # 3 bands: uint8 RGB images; other band counts are float32 in [0, 1] (data.files)
    fill_image = tuple(round(m * 255) for m in mean) if len(mean) == 3 else tuple(mean)
    steps: list[v2.Transform] = []
    if scale_set is not None:
        if [float(s) for s in scale_set] != [1.0]:
            steps.append(RandomScale(scale_range, scale_set))
    elif tuple(scale_range) != (1.0, 1.0):
        steps.append(RandomScale(scale_range))
    steps.append(
        v2.RandomCrop(
            list(crop_size),
            padding=random_pad or None,
            pad_if_needed=True,
            fill={tv_tensors.Image: fill_image, tv_tensors.Mask: IGNORE_INDEX},
        )
    )
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if vflip:
        steps.append(v2.RandomVerticalFlip())
    if jitter and any(jitter.values()):
        steps.append(v2.ColorJitter(**{k: v for k, v in jitter.items() if v}))
    return v2.Compose(steps + _normalize_tail(mean, std, normalize))


def eval_transform(
    mean: Sequence[float], std: Sequence[float], normalize: str = "dataset"
) -> v2.Compose:
    return v2.Compose(_normalize_tail(mean, std, normalize))


def data_transform(
    cfg: DataConfig,
    split: str,
    *,
    crop_size: Sequence[int] | None = None,
    scale_range: Sequence[float] | None = None,
    jitter: Mapping[str, float] | None = None,
) -> v2.Compose:
    """The ``"train"`` or ``"val"`` pipeline a ``DataConfig`` asks for (every option);
    ``crop_size`` / ``scale_range`` / ``jitter`` override or add to it (JointSeg's
    classifier stream: whole scenes, no rescale, colour jitter)."""
    if split == "val":
        return eval_transform(cfg.mean, cfg.std, cfg.normalize)
    if split != "train":
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return train_transform(
        cfg.crop_size if crop_size is None else crop_size,
        cfg.scale_range if scale_range is None else scale_range,
        cfg.hflip,
        cfg.mean,
        cfg.std,
        vflip=cfg.vflip,
        random_pad=cfg.random_pad,
        jitter=jitter,
        normalize=cfg.normalize,
        scale_set=cfg.scale_set if scale_range is None else None,  # an override wins
    )


class SeededAugmentation(Dataset):
    """Makes augmentation a pure function of ``(seed, epoch, sample index)``.

    The sampler hands out ``(index, sample_seed)`` keys; the random transforms run
    under that seed. A resumed run, a run with more loader workers, or a DDP run
    therefore sees exactly the same augmented batches as the uninterrupted
    single-process run.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, sample_seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            state = random.getstate()
            random.seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(state)
