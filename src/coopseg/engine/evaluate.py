"""Inference protocols and confusion-matrix evaluation over a data set."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import Config, ConfigError
from ..data import SegmentationDataset, build_dataset
from ..data.sampling import shard_indices
from .distributed import DistInfo, init_distributed
from .metrics import ConfusionMatrix, SegMetrics, format_table


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> autocast dtype (None: full precision)."""
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.amp: fp16 autocast needs CUDA; use bf16 on the CPU")
        return torch.float16
    raise ConfigError(f"train.amp: expected none, auto, bf16 or fp16, got {amp!r}")


def check_class_count(cfg: Config, dataset: SegmentationDataset) -> None:
    expected = cfg.model.get("num_classes")
    if expected != dataset.num_classes:
        raise ConfigError(
            f"model.num_classes is {expected} but data set {cfg.data.dataset!r} has "
            f"{dataset.num_classes} classes ({', '.join(dataset.class_names)})"
        )


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


def evaluate_checkpoint(
    cfg: Config, model: nn.Module, checkpoint: str | Path, json_path: Path | None = None
) -> dict[str, Any]:
    """Evaluate ``model`` on the validation set of ``cfg``; print the table, write JSON."""
    dist = init_distributed(cfg.device)
    val_set = build_dataset(cfg.data, "val")
    check_class_count(cfg, val_set)
    metrics = evaluate(
        model.to(dist.device),
        val_set,
        val_set.num_classes,
        dist=dist,
        batch_size=cfg.data.val_batch_size,
        scales=cfg.eval.scales,
        flip=cfg.eval.flip,
        amp_dtype=amp_dtype(cfg.train.amp, dist.device),
        num_workers=cfg.data.num_workers,
    )
    report = {
        "checkpoint": str(checkpoint),
        "dataset": cfg.data.dataset,
        "scales": cfg.eval.scales,
        "flip": cfg.eval.flip,
        **metrics.to_dict(val_set.class_names),
    }
    if dist.is_main:
        title = f"{cfg.name}: {cfg.data.dataset} val ({len(val_set)} images)"
        print(format_table(metrics, val_set.class_names, title=title))
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=2))
            print(f"metrics written to {json_path}")
    return report
