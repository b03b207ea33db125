"""Cross-entropy over the main and auxiliary outputs, normalised for DDP.

Each rank's loss is its summed pixel loss divided by the *global* number of
labelled pixels (times the world size, which DDP's gradient averaging undoes),
so a DDP step equals a single-process step on the same global batch even when
ranks hold different numbers of ignored pixels.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..data.base import IGNORE_INDEX
from .distributed import all_reduce_sum


class SegmentationLoss:
    def __init__(
        self,
        aux_weights: Mapping[str, float] | None = None,
        ignore_index: int = IGNORE_INDEX,
        world_size: int = 1,
    ) -> None:
        self.aux_weights = dict(aux_weights or {})
        self.ignore_index = ignore_index
        self.world_size = world_size

    def __call__(
        self, outputs: Mapping[str, torch.Tensor], target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        unknown = sorted(set(self.aux_weights) - set(outputs))
        if unknown:
            raise KeyError(
                f"train.aux_weights.{unknown[0]}: the model produces no output {unknown[0]!r} "
                f"(its outputs: {sorted(outputs)})"
            )
        valid = (target != self.ignore_index).sum().to(torch.float32)
        denom = all_reduce_sum(valid.clone()).clamp_min(1.0) / self.world_size
        total = torch.zeros((), device=target.device)
        parts: dict[str, float] = {}
        for name, logits in outputs.items():
            weight = 1.0 if name == "out" else self.aux_weights.get(name, 1.0)
            if weight == 0.0:
                continue
            loss = (
                F.cross_entropy(
                    logits.float(), target, ignore_index=self.ignore_index, reduction="sum"
                )
                / denom
            )
            parts[name] = loss.detach()
            total = total + weight * loss
        return total, parts
