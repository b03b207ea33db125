"""Segmentation metrics from one accumulated confusion matrix.

Everything (IoU, accuracies, pixel counts) is derived from a single int64 K×K
matrix (rows = ground truth, columns = prediction), so per-batch results can be
summed exactly across batches, processes and evaluation shards before any ratio
is taken. Ratios are never averaged per image.

Conventions:

* pixels whose target equals ``ignore_index`` are skipped;
* a class with neither ground truth nor prediction (union 0) has IoU NaN and is
  left out of mIoU (``nanmean``); a class with no ground truth has accuracy NaN
  and is left out of mean accuracy;
* a target or prediction outside ``[0, K)`` (other than ``ignore_index`` in the
  target) is an error, never dropped or wrapped silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix", "SegMetrics", "format_table"]


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


@dataclass
class SegMetrics:
    """Metrics of one confusion matrix; fractions in [0, 1], NaN where undefined."""

    iou: list[float]
    miou: float
    pixel_acc: float
    mean_acc: float
    class_acc: list[float]
    matrix: list[list[int]]
    pixels: int  # non-ignored pixels evaluated (sum of the matrix)

    @property
    def num_classes(self) -> int:
        return len(self.iou)

    @property
    def gt_pixels(self) -> list[int]:
        """Ground-truth pixel count per class (row sums)."""
        return [sum(row) for row in self.matrix]

    @property
    def pred_pixels(self) -> list[int]:
        """Predicted pixel count per class (column sums)."""
        return [sum(col) for col in zip(*self.matrix, strict=True)] if self.matrix else []

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-friendly form (NaN becomes ``None``), per-class entries keyed by name."""
        names = _class_names(class_names, self.num_classes)
        gt, pred = self.gt_pixels, self.pred_pixels
        return {
            "miou": _nan_to_none(self.miou),
            "pixel_acc": _nan_to_none(self.pixel_acc),
            "mean_acc": _nan_to_none(self.mean_acc),
            "pixels": self.pixels,
            "classes": {
                name: {
                    "iou": _nan_to_none(self.iou[i]),
                    "acc": _nan_to_none(self.class_acc[i]),
                    "gt_pixels": gt[i],
                    "pred_pixels": pred[i],
                }
                for i, name in enumerate(names)
            },
            "matrix": [list(row) for row in self.matrix],
        }


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [f"class{i}" for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for {num_classes} classes")
    if len(set(names)) != len(names):
        raise ValueError(f"class names are not unique: {names}")
    return names


class ConfusionMatrix:
    """Accumulates a K×K int64 confusion matrix (rows = ground truth, cols = prediction)."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        device: torch.device | str | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index {ignore_index} collides with a class index (num_classes "
                f"{num_classes})"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device or "cpu")

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={int(self.mat.sum())})"
        )

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of label maps (any equal shapes, typically N×H×W integer tensors)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target shapes differ: pred {tuple(pred.shape)}, "
                f"target {tuple(target.shape)} (pass class indices, e.g. logits.argmax(1))"
            )
        for name, t in (("pred", pred), ("target", target)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor of class indices, got {t.dtype}")
        k = self.num_classes
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).to(device=target.device, dtype=torch.long)
        keep = target != self.ignore_index
        bad_t = keep & ((target < 0) | (target >= k))
        if bool(bad_t.any()):
            values = torch.unique(target[bad_t]).tolist()
            raise ValueError(
                f"target has values {values[:20]} outside [0, {k}) that are not "
                f"ignore_index={self.ignore_index}"
            )
        target, pred = target[keep], pred[keep]
        bad_p = (pred < 0) | (pred >= k)
        if bool(bad_p.any()):
            values = torch.unique(pred[bad_p]).tolist()
            raise ValueError(f"pred has values {values[:20]} outside [0, {k})")
        counts = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)
        self.mat += counts.to(self.mat.device)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts (e.g. from another shard); returns ``self``."""
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge matrices of {other.num_classes} and {self.num_classes} classes"
            )
        if other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge matrices with ignore_index {other.ignore_index} and "
                f"{self.ignore_index}"
            )
        self.mat += other.mat.to(self.mat.device)
        return self

    def all_reduce(self) -> None:
        """Sum counts over all ranks so every rank computes the global metrics.

        A no-op unless ``torch.distributed`` is initialised. With NCCL the matrix is
        reduced through the current CUDA device and copied back.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        mat = self.mat
        if dist.get_backend() == "nccl" and mat.device.type != "cuda":
            mat = mat.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(mat, op=dist.ReduceOp.SUM)
        if mat is not self.mat:
            self.mat.copy_(mat)

    def compute(self) -> SegMetrics:
        """Derive all metrics from the counts accumulated so far."""
        m = self.mat.detach().to("cpu", torch.float64)
        tp = m.diagonal()
        gt = m.sum(1)
        pred = m.sum(0)
        union = gt + pred - tp
        nan = torch.tensor(math.nan, dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
        class_acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
        total = m.sum()
        pixel_acc = float(tp.sum() / total) if total > 0 else math.nan
        return SegMetrics(
            iou=iou.tolist(),
            miou=float(torch.nanmean(iou)),
            pixel_acc=pixel_acc,
            mean_acc=float(torch.nanmean(class_acc)),
            class_acc=class_acc.tolist(),
            matrix=self.mat.cpu().tolist(),
            pixels=int(self.mat.sum()),
        )


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100.0 * x:.2f}"


def format_table(
    metrics: SegMetrics | Mapping[str, SegMetrics],
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
    """Plain-text table for a terminal or a log file.

    One ``SegMetrics``: columns IoU % and Acc % per class. A mapping name →
    ``SegMetrics`` (e.g. ``member0``, ``member1``, ``fused``): one IoU % column per
    entry, so several outputs can be compared side by side. Undefined values print
    as "—". Summary lines (mIoU, pixel acc, mean acc) follow the class rows.
    """
    if isinstance(metrics, SegMetrics):
        single = True
        entries = {"": metrics}
    else:
        single = False
        entries = dict(metrics)
        if not entries:
            raise ValueError("format_table needs at least one SegMetrics")
    counts = {m.num_classes for m in entries.values()}
    if len(counts) != 1:
        raise ValueError(f"entries have different numbers of classes: {sorted(counts)}")
    names = _class_names(class_names, counts.pop())
    ms = list(entries.values())

    if single:
        m = ms[0]
        header = ["Class", "IoU %", "Acc %"]
        body = [[n, _pct(m.iou[i]), _pct(m.class_acc[i])] for i, n in enumerate(names)]
        summary = [
            ["mIoU", _pct(m.miou), ""],
            ["pixel acc", _pct(m.pixel_acc), ""],
            ["mean acc", _pct(m.mean_acc), ""],
        ]
    else:
        header = ["Class (IoU %)", *entries]
        body = [[n] + [_pct(m.iou[i]) for m in ms] for i, n in enumerate(names)]
        summary = [
            ["mIoU"] + [_pct(m.miou) for m in ms],
            ["pixel acc"] + [_pct(m.pixel_acc) for m in ms],
            ["mean acc"] + [_pct(m.mean_acc) for m in ms],
        ]

    rows = [header, *body, *summary]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [title] if title else []
    lines += [fmt(header), rule, *map(fmt, body), rule, *map(fmt, summary)]
    return "\n".join(lines)
