"""The cooperative gain in one network: mutual learning and distillation.

Both add to the segmentation loss a per-pixel KL term towards softened, detached target
predictions (Hinton et al.'s ``T^2``-scaled form, so the gradient's size does not depend
on the temperature), averaged over labelled pixels (``ignore_index`` excluded):

* **Mutual learning** (Zhang et al., "Deep Mutual Learning", CVPR 2018;
  ``train.mutual_weight``, ``train.mutual_temperature``): each member of a cooperative
  model also learns towards the mean of the other members' predictions. With the
  ``ensemble`` preset that is plain mutual learning; with links it combines feature and
  logit exchange. After training, a member alone is a deployable network
  (``coopseg export --output <member>`` writes just that network).
* **Distillation** (``train.teacher: CHECKPOINT``, ``train.teacher_output``,
  ``train.teacher_weight``, ``train.teacher_temperature``): any model learns towards a
  frozen trained model's output (the fused output of a cooperative pair, or one member),
  run in eval mode without gradients.

The KL term is averaged over each rank's own labelled pixels: under DDP it is the mean of
the ranks' means, exact only when the ranks hold equally many labelled pixels (the
cross-entropy term stays exact, see :mod:`coopseg.engine.loss`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.base import IGNORE_INDEX


def soft_kl(
    student: torch.Tensor,
    target: torch.Tensor,
    masks: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``T^2 · KL(softmax(target/T) || softmax(student/T))`` per pixel, averaged over the
    pixels whose label is not ``ignore_index`` (0 when there are none). ``target`` is
    detached: the student learns towards it, never the other way."""
    if student.shape != target.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and target logits {tuple(target.shape)} "
            "differ; they must predict the same classes at the same size"
        )
    t = float(temperature)
    log_p = F.log_softmax(student.float() / t, dim=1)
    log_q = F.log_softmax(target.detach().float() / t, dim=1)
    per_pixel = (log_q.exp() * (log_q - log_p)).sum(1)  # [B, H, W]
    valid = masks != ignore_index
    count = valid.sum()
    if count == 0:
        return per_pixel.sum() * 0.0
    return (per_pixel * valid).sum() / count * t * t


def member_logits(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A cooperative model's training outputs by member: ``{name: logits}`` of each
    ``<name>.out`` (the main head; auxiliary heads are not exchanged)."""
    return {
        k[: -len(".out")]: v for k, v in outputs.items() if k.endswith(".out") and k != "fused.out"
    }


def mutual_loss(
    outputs: Mapping[str, torch.Tensor],
    masks: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Deep mutual learning's term summed over members: each member's KL towards each
    other member's detached prediction, averaged over the others (K = 2: one term each)."""
    logits = member_logits(outputs)
    if len(logits) < 2:
        raise ValueError(
            "train.mutual_weight: mutual learning needs a cooperative model of two or more "
            f"members; this model has outputs {sorted(outputs)}"
        )
    total = torch.zeros((), device=masks.device)
    for name, own in logits.items():
        others = [v for k, v in logits.items() if k != name]
        total = total + sum(
            soft_kl(own, o, masks, temperature, ignore_index) for o in others
        ) / len(others)
    return total


class Teacher:
    """A frozen trained model whose chosen output the student learns towards."""

    def __init__(
        self, checkpoint: str | Path, output: str | None, num_classes: int, device: torch.device
    ) -> None:
        from ..models.cooperative import select_output
        from .checkpoint import load_model

        model, cfg, _ = load_model(checkpoint, device)
        classes = cfg.model.get("num_classes")
        if classes != num_classes:
            raise ValueError(
                f"train.teacher: {checkpoint} predicts {classes} classes, the student's data "
                f"set has {num_classes}; a teacher must predict the student's classes"
            )
        try:  # None: the output the checkpoint reports (a pair's best-<output> file's own)
            output = select_output(model, output)
        except ValueError as err:
            raise ValueError(
                f"train.teacher_output: {str(err).removeprefix('--output: ')}"
            ) from None
        for p in model.parameters():
            p.requires_grad_(False)
        self.model: nn.Module = model.eval()
        self.output = output

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()  # stays in eval mode whatever the student's trainer does
        return self.model(images)["out"]


def student_logits(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The student's main prediction among its training outputs (``out`` for a single
    network, the reported member's ``<name>.out`` for a cooperative one)."""
    if "out" in outputs:
        return outputs["out"]
    members = member_logits(outputs)
    if len(members) == 1:
        return next(iter(members.values()))
    raise ValueError(
        "train.teacher: distillation trains one network; give a single architecture "
        f"(this model has outputs {sorted(outputs)})"
    )
