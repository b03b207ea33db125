"""Confusion-matrix evaluation over a data set: the loop that validation, ``coopseg eval``
and the report run (the inference itself: :mod:`coopseg.engine.inference`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from ..config import Config, ConfigError
from ..data import SegmentationDataset, build_dataset
from ..data.base import PredictionWriter
from ..data.sampling import shard_indices
from .distributed import DistInfo, init_distributed
from .inference import (
    SlideWindow,
    amp_dtype,
    center_crop,
    center_region,
    output_label,
    predict_outputs,
    segmentation_outputs,
    slide_window,
)
from .metrics import ConfusionMatrix, SegMetrics, format_table
from .preemption import ignore_stop_signals


def check_class_count(cfg: Config, dataset: SegmentationDataset) -> None:
    expected = cfg.model.get("num_classes")
    if expected != dataset.num_classes:
        raise ConfigError(
            f"model.num_classes is {expected} but data set {cfg.data.dataset!r} has "
            f"{dataset.num_classes} classes ({', '.join(dataset.class_names)})"
        )


def collate_by_size(
    samples: list[tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A batch as sub-batches of consecutive equal-size samples (VOC mixes sizes).

    Each sample lands in exactly one sub-batch and sample order is kept, so every
    pixel is counted once, the confusion matrix equals per-image evaluation, and
    per-batch hooks see predictions in data-set order; nothing is resized or cropped.
    """
    groups: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for image, mask in samples:
        last = groups[-1][-1] if groups else None
        if last is not None and last[0].shape == image.shape and last[1].shape == mask.shape:
            groups[-1].append((image, mask))
        else:
            groups.append([(image, mask)])
    return [default_collate(group) for group in groups]


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
    slide: SlideWindow | None = None,
    on_batch: Callable[[torch.Tensor], None] | None = None,
    center: Sequence[int] | None = None,
) -> SegMetrics:
    """mIoU and friends of the model's prediction over ``dataset`` (a cooperative
    model: its fused output; :func:`evaluate_outputs` gives every output)."""
    metrics = evaluate_outputs(
        model,
        dataset,
        num_classes,
        dist=dist,
        batch_size=batch_size,
        scales=scales,
        flip=flip,
        amp_dtype=amp_dtype,
        num_workers=num_workers,
        channels_last=channels_last,
        slide=slide,
        on_batch=on_batch,
        center=center,
    )
    return next(iter(metrics.values()))


@torch.no_grad()
def evaluate_outputs(
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
    slide: SlideWindow | None = None,
    on_batch: Callable[[torch.Tensor], None] | None = None,
    center: Sequence[int] | None = None,
) -> dict[str, SegMetrics]:
    """Metrics of every segmentation output, keyed by :func:`output_label`, the model's
    prediction first; with DDP each rank takes a shard, then sums.

    ``on_batch`` receives each predicted batch (class indices), e.g. to save them.
    ``center``: score only the central region of that size (:func:`center_crop`).

    Images of different sizes may share a batch: they are run as equal-size
    sub-batches (:func:`collate_by_size`).
    """
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
        collate_fn=collate_by_size,
        generator=torch.Generator(),  # leave the global RNG alone (resume equality)
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )
    cms: dict[str, ConfusionMatrix] = {}
    for groups in loader:
        for images, masks in groups:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            masks = masks.to(device, non_blocking=True)
            if center is not None:
                images, masks = center_crop(images, masks, center)
            scores = predict_outputs(model, images, scales, flip, amp_dtype, slide)
            for key, value in scores.items():
                pred = value.argmax(1)
                if key not in cms:
                    cms[key] = ConfusionMatrix(num_classes, device=device)
                cms[key].update(pred, masks)
                if on_batch is not None and key == next(iter(scores)):
                    on_batch(pred)
    if not cms:  # an empty shard still takes part in the all-reduce
        keys = segmentation_outputs(_probe_outputs(model, dataset, device))
        cms = {key: ConfusionMatrix(num_classes, device=device) for key in keys}
    for cm in cms.values():
        cm.all_reduce()
    model.train(was_training)
    return {output_label(k): cm.compute() for k, cm in cms.items()}  # prediction first


def _probe_outputs(model: nn.Module, dataset: Dataset, device: torch.device) -> dict:
    image, _ = dataset[0]
    return model(image[None].to(device))


def evaluation_report(
    cfg: Config,
    model: nn.Module,
    checkpoint: str | Path,
    val_set: SegmentationDataset,
    dist: DistInfo,
    on_batch: Callable[[torch.Tensor], None] | None = None,
) -> tuple[dict[str, Any], dict[str, SegMetrics]]:
    """Every output's metrics under the config's eval protocol (scales, flip, slide or
    center region), and the dict ``eval.json`` holds (headline first)."""
    slide = slide_window(cfg.eval, cfg.data.crop_size)
    center = center_region(cfg.eval, cfg.data.crop_size)
    all_metrics = evaluate_outputs(
        model.to(dist.device),
        val_set,
        val_set.num_classes,
        dist=dist,
        batch_size=1 if on_batch else cfg.data.val_batch_size,
        scales=cfg.eval.scales,
        flip=cfg.eval.flip,
        amp_dtype=amp_dtype(cfg.train.amp, dist.device),
        num_workers=cfg.data.num_workers,
        slide=slide,
        on_batch=on_batch,
        center=center,
    )
    names = list(val_set.class_names)
    report = {
        "checkpoint": str(checkpoint),
        "dataset": cfg.data.dataset,
        "scales": cfg.eval.scales,
        "flip": cfg.eval.flip,
        "mode": cfg.eval.mode,
        **({"crop_size": list(slide.crop), "stride": list(slide.stride)} if slide else {}),
        **({"center": list(center)} if center else {}),
        **next(iter(all_metrics.values())).to_dict(names),
    }
    if len(all_metrics) > 1:  # a cooperative model: fused and every member, as in the papers
        report["output"] = next(iter(all_metrics))  # the headline above: model.report
        report["outputs"] = {k: m.to_dict(names) for k, m in all_metrics.items()}
    return report, all_metrics


def evaluate_checkpoint(
    cfg: Config,
    model: nn.Module,
    checkpoint: str | Path,
    json_path: Path | None = None,
    save_predictions: Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on the validation set of ``cfg``; print the table, write JSON.

    ``save_predictions``: also write each predicted mask there (batch size 1, so each
    prediction is named by its sample in order).
    """
    dist = init_distributed(cfg.device)
    val_set = build_dataset(cfg.data, "val")
    check_class_count(cfg, val_set)
    writer = None
    if save_predictions is not None:
        shard = shard_indices(len(val_set), dist.rank, dist.world_size)
        writer = PredictionWriter(val_set, shard, save_predictions)
    report, all_metrics = evaluation_report(cfg, model, checkpoint, val_set, dist, writer)
    if writer is not None:
        print(f"rank {dist.rank}: {len(writer.written)} predictions written to {save_predictions}")
    if dist.is_main:
        title = f"{cfg.name}: {cfg.data.dataset} val ({len(val_set)} images)"
        shown = all_metrics if len(all_metrics) > 1 else next(iter(all_metrics.values()))
        print(format_table(shown, val_set.class_names, title=title))
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=2))
            print(f"metrics written to {json_path}")
    return report
