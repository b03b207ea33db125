"""The training loss: a weighted sum of terms over the main and auxiliary outputs.

``train.loss`` names the terms and their weights: cross-entropy (``ce``), Dice
(``dice``), focal (``focal``) and Lovász-softmax (``lovasz``). Every term is applied to
every output head (auxiliary heads and each cooperative member's outputs alike), each
head weighted by ``train.aux_weights``; every term ignores pixels labelled
``ignore_index``.

Normalisation under DDP. Cross-entropy and focal are sums of per-pixel losses divided
by the *global* (weighted) number of labelled pixels (times the world size, which DDP's
gradient averaging undoes), so a DDP step equals a single-process step on the same
global batch even when ranks hold different numbers of ignored pixels. Dice and
Lovász are not sums over pixels: each rank computes them on its own part of the batch
and DDP averages the gradients, so with them a DDP step equals the mean of the
per-rank losses, not the loss of the global batch (the same holds for
segmentation_models.pytorch and mmsegmentation).

Cross-entropy options, each keeping the global normalisation:

* ``class_weights``: pixel ``i`` counts ``w[y_i]`` times; the denominator is the
  global sum of ``w[y_i]`` over labelled pixels, i.e. ``F.cross_entropy(weight=w)``'s
  weighted mean over the global batch.
* ``label_smoothing`` = e: PyTorch's ``F.cross_entropy(label_smoothing=e)`` (the target
  is ``(1 - e)`` on the true class plus ``e / C`` on every class; with class weights the
  smoothing part of a pixel is weighted per class, as PyTorch does).
* OHEM (``ohem_thresh`` = t, ``ohem_min_kept`` = k): per output head and per image, a
  labelled pixel is kept when the softmax probability of its true class is below t,
  and in any case the k labelled pixels with the lowest such probability are kept
  (ties: lower flat index first; all of them when the image has fewer than k). Only
  kept pixels contribute, to both the sum and the (weighted, global) denominator. The
  rule is per image, never per batch, so which pixels are kept does not depend on how
  the global batch is split across ranks: DDP stays exactly equal to one process.

Focal (Lin et al. 2017, the softmax form): pixel loss ``w[y] (1 - p_y)^gamma (-log
p_y)``, normalised like cross-entropy. segmentation_models.pytorch's multiclass
``FocalLoss`` is a per-class *sigmoid* (one-vs-rest) focal loss, a different loss for
a softmax head, and averages per class, which no global denominator can make
DDP-exact; so focal is computed here, from ``F.cross_entropy``. Dice and Lovász are
segmentation_models.pytorch's ``DiceLoss`` and ``LovaszLoss`` (multiclass mode,
``ignore_index``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..data.base import IGNORE_INDEX
from .distributed import all_reduce_sum

if TYPE_CHECKING:
    from ..config import TrainConfig

TERMS = ("ce", "dice", "focal", "lovasz")  # the keys of train.loss


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


def _class_weights(weights: Sequence[float] | None) -> torch.Tensor | None:
    return None if weights is None else torch.tensor(list(weights), dtype=torch.float32)


class _PixelTerm:
    """A sum of per-pixel losses over the global (weighted) count of labelled pixels."""

    def __init__(
        self,
        ignore_index: int,
        world_size: int,
        class_weights: Sequence[float] | None,
        key: str,
    ) -> None:
        self.ignore_index = ignore_index
        self.world_size = world_size
        self.class_weights = _class_weights(class_weights)
        self.key = key  # the config key of its class weights, for errors
        self._weights: torch.Tensor | None = None
        self._denom: torch.Tensor | None = None

    def _global_denominator(self, pixel_weight: torch.Tensor, floor: float) -> torch.Tensor:
        """Sum over the *global* batch, divided by the world size (DDP averages it back)."""
        total = pixel_weight.sum().to(torch.float32)
        return all_reduce_sum(total.clone()).clamp_min(floor) / self.world_size

    def begin(self, classes: int, target: torch.Tensor) -> None:
        """Once per step: the class weights on the device and, unless pixels are chosen
        per head, the denominator all heads share (one all-reduce per step)."""
        self._weights = None
        if self.class_weights is not None:
            if len(self.class_weights) != classes:
                raise ValueError(
                    f"{self.key}: {len(self.class_weights)} weights for a model "
                    f"with {classes} classes"
                )
            self._weights = self.class_weights.to(target.device)
        self._denom = None if self.per_head_pixels else self._denominator(None, target)

    per_head_pixels = False

    def _denominator(self, keep: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        pixel_weight = valid if keep is None else keep
        if self._weights is None:
            return self._global_denominator(pixel_weight, 1.0)  # a pixel count
        weight = self._weights[target.where(valid, 0)] * pixel_weight
        return self._global_denominator(weight, 1e-12)


class CrossEntropyTerm(_PixelTerm):
    """Cross-entropy with class weights, label smoothing and OHEM (module docstring)."""

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        world_size: int = 1,
        class_weights: Sequence[float] | None = None,
        ohem_thresh: float | None = None,
        ohem_min_kept: int = 0,
        label_smoothing: float = 0.0,
        key: str = "train.loss.ce",
    ) -> None:
        super().__init__(ignore_index, world_size, class_weights, f"{key}.class_weights")
        if ohem_thresh is not None and not 0.0 < ohem_thresh <= 1.0:
            raise ValueError(
                f"{key}.ohem_thresh: expected a probability in (0, 1], got {ohem_thresh}"
            )
        if ohem_min_kept < 0:
            raise ValueError(f"{key}.ohem_min_kept: expected >= 0, got {ohem_min_kept}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"{key}.label_smoothing: expected [0, 1), got {label_smoothing}")
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = ohem_min_kept
        self.label_smoothing = label_smoothing
        self.per_head_pixels = ohem_thresh is not None

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.ohem_thresh is None:
            summed = F.cross_entropy(
                logits.float(),
                target,
                weight=self._weights,
                ignore_index=self.ignore_index,
                reduction="sum",
                label_smoothing=self.label_smoothing,
            )
            return summed / self._denom
        keep = ohem_mask(logits, target, self.ohem_thresh, self.ohem_min_kept, self.ignore_index)
        pixel = F.cross_entropy(
            logits.float(),
            target,
            weight=self._weights,  # per pixel: w[y] * nll (and the smoothing part per class)
            ignore_index=self.ignore_index,
            reduction="none",
            label_smoothing=self.label_smoothing,
        )
        return (pixel * keep).sum() / self._denominator(keep, target)


class FocalTerm(_PixelTerm):
    """Softmax focal loss ``w[y] (1 - p_y)^gamma (-log p_y)``, normalised like CE."""

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        world_size: int = 1,
        gamma: float = 2.0,
        class_weights: Sequence[float] | None = None,
        key: str = "train.loss.focal",
    ) -> None:
        super().__init__(ignore_index, world_size, class_weights, f"{key}.class_weights")
        if gamma < 0:
            raise ValueError(f"{key}.gamma: expected >= 0, got {gamma}")
        self.gamma = gamma

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        nll = F.cross_entropy(
            logits.float(), target, ignore_index=self.ignore_index, reduction="none"
        )  # 0 on ignored pixels
        pixel = (1.0 - torch.exp(-nll)).pow(self.gamma) * nll
        if self._weights is not None:
            valid = target != self.ignore_index
            pixel = pixel * self._weights[target.where(valid, 0)]
        return pixel.sum() / self._denom


class DiceTerm:
    """segmentation_models.pytorch's multiclass soft Dice loss (per rank)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, smooth: float = 0.0) -> None:
        from segmentation_models_pytorch.losses import DiceLoss

        self.fn = DiceLoss("multiclass", smooth=smooth, ignore_index=ignore_index)

    def begin(self, classes: int, target: torch.Tensor) -> None:
        pass

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(logits.float(), target)


class LovaszTerm:
    """segmentation_models.pytorch's Lovász-softmax loss (per rank, classes present)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, per_image: bool = False) -> None:
        from segmentation_models_pytorch.losses import LovaszLoss

        self.ignore_index = ignore_index
        self.fn = LovaszLoss("multiclass", per_image=per_image, ignore_index=ignore_index)

    def begin(self, classes: int, target: torch.Tensor) -> None:
        pass

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not (target != self.ignore_index).any():
            return logits.sum() * 0.0  # smp returns an empty tensor here
        return self.fn(logits.float(), target)


class SegmentationLoss:
    """Weighted sum over output heads of a weighted sum of loss terms.

    ``terms`` maps a term name to ``(weight, term)``; without it the loss is today's
    cross-entropy built from ``class_weights`` / ``ohem_*`` / ``label_smoothing``.
    """

    def __init__(
        self,
        aux_weights: Mapping[str, float] | None = None,
        ignore_index: int = IGNORE_INDEX,
        world_size: int = 1,
        class_weights: Sequence[float] | None = None,
        ohem_thresh: float | None = None,
        ohem_min_kept: int = 0,
        label_smoothing: float = 0.0,
        terms: Mapping[str, tuple[float, Any]] | None = None,
    ) -> None:
        self.aux_weights = dict(aux_weights or {})
        self.ignore_index = ignore_index
        self.world_size = world_size
        if terms is None:
            ce = CrossEntropyTerm(
                ignore_index,
                world_size,
                class_weights,
                ohem_thresh,
                ohem_min_kept,
                label_smoothing,
                key="train",
            )
            terms = {"ce": (1.0, ce)}
        self.terms = {name: (w, term) for name, (w, term) in terms.items() if w != 0.0}
        if not self.terms:
            raise ValueError("train.loss: every term has weight 0; nothing to train on")

    @classmethod
    def from_config(
        cls, aux_weights: Mapping[str, float], t: TrainConfig, world_size: int = 1
    ) -> SegmentationLoss:
        """The loss ``train.loss`` describes; ``train.class_weights`` / ``ohem_*`` (the
        keys before ``train.loss``) still set the cross-entropy term's options."""
        loss, ignore = t.loss, IGNORE_INDEX
        ce = loss.ce
        terms: dict[str, tuple[float, Any]] = {}
        if ce.weight:
            term = CrossEntropyTerm(
                ignore,
                world_size,
                ce.class_weights if ce.class_weights is not None else t.class_weights,
                ce.ohem_thresh if ce.ohem_thresh is not None else t.ohem_thresh,
                ce.ohem_min_kept or t.ohem_min_kept,
                ce.label_smoothing,
            )
            terms["ce"] = (ce.weight, term)
        if loss.dice.weight:
            terms["dice"] = (loss.dice.weight, DiceTerm(ignore, loss.dice.smooth))
        if loss.focal.weight:
            focal = FocalTerm(ignore, world_size, loss.focal.gamma, loss.focal.class_weights)
            terms["focal"] = (loss.focal.weight, focal)
        if loss.lovasz.weight:
            terms["lovasz"] = (loss.lovasz.weight, LovaszTerm(ignore, loss.lovasz.per_image))
        return cls(aux_weights, ignore, world_size, terms=terms)

    def weight_of(self, name: str) -> float:
        """``train.aux_weights`` by full name, else by its last part, so ``aux_context``
        also sets ``top.aux_context`` and ``bottom.aux_context`` of a cooperative model."""
        if name in self.aux_weights:
            return self.aux_weights[name]
        return self.aux_weights.get(name.rpartition(".")[2], 1.0)

    def __call__(
        self, outputs: Mapping[str, torch.Tensor], target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, parts)``: parts per head and, with several terms, ``term.<name>``:
        that term's share of the total (all heads)."""
        short = {name.rpartition(".")[2] for name in outputs}  # member outputs: "top.aux_x"
        unknown = sorted(set(self.aux_weights) - set(outputs) - short)
        if unknown:
            raise KeyError(
                f"train.aux_weights.{unknown[0]}: the model produces no output {unknown[0]!r} "
                f"(its outputs: {sorted(outputs)})"
            )
        classes = next(iter(outputs.values())).shape[1]  # every head: all classes
        for _, term in self.terms.values():
            term.begin(classes, target)
        total = torch.zeros((), device=target.device)
        parts: dict[str, torch.Tensor] = {}
        shares = dict.fromkeys(self.terms, 0.0)
        for name, logits in outputs.items():
            weight = 1.0 if name == "out" else self.weight_of(name)
            if weight == 0.0:
                continue
            head = torch.zeros((), device=target.device)
            for term_name, (term_weight, term) in self.terms.items():
                value = term_weight * term(logits, target)
                shares[term_name] = shares[term_name] + weight * value.detach()
                head = head + value
            parts[name] = head.detach()
            total = total + weight * head
        if len(self.terms) > 1:
            parts.update({f"term.{k}": torch.as_tensor(v).detach() for k, v in shares.items()})
        return total, parts
