"""Image+mask pipelines on torchvision.transforms.v2 (masks resize with nearest).

The papers' recipe: random scale, random crop padded with the mean (mask with the
ignore index), horizontal flip, mean/std normalisation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .base import IGNORE_INDEX


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range`` (relative to the input)."""

    def __init__(self, scale_range: Sequence[float]) -> None:
        super().__init__()
        self.low, self.high = float(scale_range[0]), float(scale_range[1])

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        factor = torch.empty(1).uniform_(self.low, self.high).item()
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, size=params["size"], antialias=True)


def _normalize_tail(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]


def train_transform(
    crop_size: Sequence[int],
    scale_range: Sequence[float],
    hflip: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> v2.Compose:
    fill_image = tuple(round(m * 255) for m in mean)
    steps: list[v2.Transform] = []
    if tuple(scale_range) != (1.0, 1.0):
        steps.append(RandomScale(scale_range))
    steps.append(
        v2.RandomCrop(
            list(crop_size),
            pad_if_needed=True,
            fill={tv_tensors.Image: fill_image, tv_tensors.Mask: IGNORE_INDEX},
        )
    )
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _normalize_tail(mean, std))


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose(_normalize_tail(mean, std))


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
