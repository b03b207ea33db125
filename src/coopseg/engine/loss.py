"""Cross-entropy over the main and auxiliary outputs, normalised for DDP.

Each rank's loss is its summed pixel loss divided by the *global* number of
labelled pixels (times the world size, which DDP's gradient averaging undoes),
so a DDP step equals a single-process step on the same global batch even when
ranks hold different numbers of ignored pixels.

Options, each keeping that global normalisation:

* ``class_weights`` (``train.class_weights``): pixel ``i`` counts ``w[y_i]``
  times; the denominator is the global sum of ``w[y_i]`` over labelled pixels,
  i.e. ``F.cross_entropy(weight=w)``'s weighted mean over the global batch.
* OHEM (``train.ohem_thresh`` = t, ``train.ohem_min_kept`` = k): per output
  head and per image, a labelled pixel is kept when the softmax probability
  of its true class is below t, and in any case the k labelled pixels with
  the lowest such probability are kept (ties: lower flat index first; all of
  them when the image has fewer than k). Only kept pixels contribute, to both
  the sum and the (weighted, global) denominator. The rule is per image, never
  per batch, so which pixels are kept does not depend on how the global batch
  is split across ranks: DDP stays exactly equal to one process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..data.base import IGNORE_INDEX
from .distributed import all_reduce_sum


def ohem_mask(
    logits: torch.Tensor,
    target: torch.Tensor,
    thresh: float,
    min_kept: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Bool ``[B, H, W]``: the hard pixels by the rule in the module docstring."""
    valid = target != ignore_index
    with torch.no_grad():
        probs = logits.detach().float().softmax(1)
        true = probs.gather(1, target.where(valid, 0).unsqueeze(1)).squeeze(1)
        keep = valid & (true < thresh)
        if min_kept > 0:
            flat = true.where(valid, torch.inf).flatten(1)  # ignored pixels sort last
            k = min(min_kept, flat.shape[1])
            lowest = flat.argsort(dim=1, stable=True)[:, :k]
            chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
            keep |= chosen.view_as(keep) & valid
    return keep


class SegmentationLoss:
    """Weighted sum over output heads of a (class-weighted, OHEM) cross-entropy."""

    def __init__(
        self,
        aux_weights: Mapping[str, float] | None = None,
        ignore_index: int = IGNORE_INDEX,
        world_size: int = 1,
        class_weights: Sequence[float] | None = None,
        ohem_thresh: float | None = None,
        ohem_min_kept: int = 0,
    ) -> None:
        self.aux_weights = dict(aux_weights or {})
        self.ignore_index = ignore_index
        self.world_size = world_size
        self.class_weights = (
            None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        )
        if ohem_thresh is not None and not 0.0 < ohem_thresh <= 1.0:
            raise ValueError(
                f"train.ohem_thresh: expected a probability in (0, 1], got {ohem_thresh}"
            )
        if ohem_min_kept < 0:
            raise ValueError(f"train.ohem_min_kept: expected >= 0, got {ohem_min_kept}")
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = ohem_min_kept

    def _global_denominator(self, pixel_weight: torch.Tensor, floor: float) -> torch.Tensor:
        """Sum over the *global* batch, divided by the world size (DDP averages it back)."""
        total = pixel_weight.sum().to(torch.float32)
        return all_reduce_sum(total.clone()).clamp_min(floor) / self.world_size

    def weight_of(self, name: str) -> float:
        """``train.aux_weights`` by full name, else by its last part, so ``aux_context``
        also sets ``top.aux_context`` and ``bottom.aux_context`` of a cooperative model."""
        if name in self.aux_weights:
            return self.aux_weights[name]
        return self.aux_weights.get(name.rpartition(".")[2], 1.0)

    def __call__(
        self, outputs: Mapping[str, torch.Tensor], target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        short = {name.rpartition(".")[2] for name in outputs}  # member outputs: "top.aux_x"
        unknown = sorted(set(self.aux_weights) - set(outputs) - short)
        if unknown:
            raise KeyError(
                f"train.aux_weights.{unknown[0]}: the model produces no output {unknown[0]!r} "
                f"(its outputs: {sorted(outputs)})"
            )
        weights = None
        if self.class_weights is not None:
            classes = next(iter(outputs.values())).shape[1]  # every head: all classes
            if len(self.class_weights) != classes:
                raise ValueError(
                    f"train.class_weights: {len(self.class_weights)} weights for a model "
                    f"with {classes} classes"
                )
            weights = self.class_weights.to(target.device)
        valid = target != self.ignore_index
        denom = None  # shared by all heads unless OHEM picks pixels per head
        if self.ohem_thresh is None:
            if weights is None:
                denom = self._global_denominator(valid, 1.0)
            else:
                denom = self._global_denominator(weights[target.where(valid, 0)] * valid, 1e-12)
        total = torch.zeros((), device=target.device)
        parts: dict[str, float] = {}
        for name, logits in outputs.items():
            weight = 1.0 if name == "out" else self.weight_of(name)
            if weight == 0.0:
                continue
            if self.ohem_thresh is None:
                summed = F.cross_entropy(
                    logits.float(),
                    target,
                    weight=weights,
                    ignore_index=self.ignore_index,
                    reduction="sum",
                )
                loss = summed / denom
            else:
                keep = ohem_mask(
                    logits, target, self.ohem_thresh, self.ohem_min_kept, self.ignore_index
                )
                pixel_weight = keep.float()
                floor = 1.0  # a pixel count
                if weights is not None:
                    pixel_weight = pixel_weight * weights[target.where(valid, 0)]
                    floor = 1e-12
                nll = F.cross_entropy(
                    logits.float(), target, ignore_index=self.ignore_index, reduction="none"
                )
                loss = (nll * pixel_weight).sum() / self._global_denominator(pixel_weight, floor)
            parts[name] = loss.detach()
            total = total + weight * loss
        return total, parts
