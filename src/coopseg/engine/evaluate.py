"""Inference protocols and confusion-matrix evaluation over a data set."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.sampling import shard_indices
from .distributed import DistInfo
from .metrics import ConfusionMatrix, SegMetrics


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Class scores at the input's size: softmax averaged over scales and flips.

    With one scale of 1.0 and no flip this returns the raw logits (same argmax,
    one forward pass): plain inference.
    """
    size = images.shape[-2:]
    ctx = autocast_context(images.device, amp_dtype)
    if list(scales) == [1.0] and not flip:
        with ctx:
            return model(images)["out"].float()
    total = None
    for scale in scales:
        if scale == 1.0:
            scaled = images
        else:
            new = [max(1, round(s * scale)) for s in size]
            scaled = F.interpolate(images, size=new, mode="bilinear", align_corners=False)
        views = [False, True] if flip else [False]
        for flipped in views:
            inp = scaled.flip(-1) if flipped else scaled
            with ctx:
                logits = model(inp)["out"].float()
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            probs = logits.softmax(1)
            total = probs if total is None else total + probs
    return total / (len(scales) * (2 if flip else 1))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    *,
    dist: DistInfo,
    batch_size: int = 8,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    channels_last: bool = False,
) -> SegMetrics:
    """mIoU and friends over ``dataset``; with DDP each rank takes a shard, then sums."""
    was_training = model.training
    model.eval()
    device = dist.device
    shard = Subset(dataset, shard_indices(len(dataset), dist.rank, dist.world_size))
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # leave the global RNG alone (resume equality)
    )
    cm = ConfusionMatrix(num_classes, device=device)
    for images, masks in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        masks = masks.to(device, non_blocking=True)
        scores = predict_probs(model, images, scales, flip, amp_dtype)
        cm.update(scores.argmax(1), masks)
    cm.all_reduce()
    model.train(was_training)
    return cm.compute()
