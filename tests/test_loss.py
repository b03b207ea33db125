"""Loss options: class-weighted cross-entropy, OHEM by its documented rule, key checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coopseg.config import ConfigError, config_from_dict
from coopseg.data.base import IGNORE_INDEX
from coopseg.engine.loss import SegmentationLoss, ohem_mask
from coopseg.engine.train import Trainer


def _batch(seed: int = 0, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 5, 6, generator=g)
    target = torch.randint(0, classes, (2, 5, 6), generator=g)
    target[0, 0, :3] = IGNORE_INDEX
    target[1, 4, 2] = IGNORE_INDEX
    return logits, target


def test_plain_loss_is_cross_entropy_mean() -> None:
    logits, target = _batch()
    loss, parts = SegmentationLoss()({"out": logits}, target)
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"out"}


def test_class_weighted_loss_equals_weighted_cross_entropy_mean() -> None:
    logits, target = _batch()
    w = [0.5, 2.0, 1.0, 3.0]
    loss, _ = SegmentationLoss(class_weights=w)({"out": logits}, target)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(w), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected)
    unweighted = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    assert not torch.allclose(loss, unweighted)


def test_class_weighted_aux_head_uses_same_weighted_mean() -> None:
    logits, target = _batch()
    aux = torch.randn_like(logits)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0])
    loss, parts = SegmentationLoss({"aux": 0.4}, class_weights=w.tolist())(
        {"out": logits, "aux": aux}, target
    )
    main = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE_INDEX)
    side = F.cross_entropy(aux, target, weight=w, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(parts["aux"], side)
    torch.testing.assert_close(loss, main + 0.4 * side)


def _hand_logits(probs: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image, 1 x N pixels, 2 classes, target 0 everywhere: true-class prob = ``probs``."""
    p = torch.tensor(probs, dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()]).unsqueeze(0).float()  # [1, 2, 1, N]
    return logits, torch.zeros(1, *p.shape, dtype=torch.long)


def test_ohem_threshold_keeps_pixels_below_it() -> None:
    logits, target = _hand_logits([[0.9, 0.2, 0.69, 0.71, 0.5, 0.95]])
    target[0, 0, 4] = IGNORE_INDEX  # hard (0.5) but unlabelled: never kept
    keep = ohem_mask(logits, target, thresh=0.7)
    assert keep[0, 0].tolist() == [False, True, True, False, False, False]


def test_ohem_min_kept_adds_the_lowest_probabilities_per_image() -> None:
    # image 0: only 0.2 is below 0.7; min_kept=3 adds the next lowest, 0.8 and 0.85
    # image 1: 0.1, 0.3, 0.6, 0.65 are all below 0.7, already >= 3: rule adds nothing
    logits, target = _hand_logits([[0.9, 0.2, 0.85, 0.99, 0.8], [0.1, 0.3, 0.95, 0.6, 0.65]])
    logits = logits.permute(2, 1, 0, 3)  # two images of 1 x 5
    target = target.permute(1, 0, 2)
    keep = ohem_mask(logits, target, thresh=0.7, min_kept=3)
    assert keep[0, 0].tolist() == [False, True, True, False, True]
    assert keep[1, 0].tolist() == [True, True, False, True, True]
    # fewer labelled pixels than min_kept: all labelled pixels, never an ignored one
    target[0, 0, 1:] = IGNORE_INDEX
    keep = ohem_mask(logits, target, thresh=0.05, min_kept=3)
    assert keep[0, 0].tolist() == [True, False, False, False, False]


def test_ohem_loss_is_mean_over_kept_pixels() -> None:
    probs = [[0.9, 0.2, 0.69, 0.71, 0.5, 0.95]]
    logits, target = _hand_logits(probs)
    loss, _ = SegmentationLoss(ohem_thresh=0.7)({"out": logits}, target)
    expected = -(math.log(0.2) + math.log(0.69) + math.log(0.5)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # with class weights, kept pixels are weighted and so is the denominator
    target[0, 0, 1] = 1  # true prob of pixel 1 becomes 0.8: no longer hard
    w = [2.0, 5.0]
    loss, _ = SegmentationLoss(class_weights=w, ohem_thresh=0.7)({"out": logits}, target)
    expected = -(2 * math.log(0.69) + 2 * math.log(0.5)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ohem_loss_gradient_only_reaches_kept_pixels() -> None:
    logits, target = _hand_logits([[0.9, 0.2, 0.95, 0.5]])
    logits.requires_grad_(True)
    loss, _ = SegmentationLoss(ohem_thresh=0.7)({"out": logits}, target)
    loss.backward()
    touched = logits.grad.abs().sum(1)[0, 0] > 0
    assert touched.tolist() == [False, True, False, True]


def test_loss_rejects_bad_options() -> None:
    logits, target = _batch()
    with pytest.raises(ValueError, match="train.class_weights: 3 weights"):
        SegmentationLoss(class_weights=[1.0, 1.0, 1.0])({"out": logits}, target)
    with pytest.raises(ValueError, match="train.ohem_thresh"):
        SegmentationLoss(ohem_thresh=1.5)


MODEL = {"arch": "deeplabv3plus", "backbone": "resnet18", "num_classes": 3}


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"class_weights": [1.0, 2.0]}, r"train.class_weights: expected 3 weights"),
        ({"class_weights": [1.0, -2.0, 1.0]}, r"train.class_weights: expected non-negative"),
        ({"class_weights": 2.0}, r"train.class_weights: expected a list"),
        ({"ohem_thresh": 0.0}, r"train.ohem_thresh: expected a probability"),
        ({"ohem_thresh": 0.7, "ohem_min_kept": -1}, r"train.ohem_min_kept: expected >= 0"),
        ({"ohem_min_kept": 100}, r"train.ohem_min_kept is set but train.ohem_thresh"),
        ({"ohem_min_keep": 100}, r"unknown config key train.ohem_min_keep"),
    ],
)
def test_invalid_loss_keys_are_named(train, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": MODEL, "train": train})


def test_trainer_builds_the_configured_loss(make_config) -> None:
    cfg = make_config(
        train={"class_weights": [1.0] * 10 + [2.0], "ohem_thresh": 0.7, "ohem_min_kept": 64}
    )
    trainer = Trainer(cfg, show_progress=False)
    crit = trainer.criterion
    assert crit.class_weights.tolist() == [1.0] * 10 + [2.0]
    assert (crit.ohem_thresh, crit.ohem_min_kept) == (0.7, 64)
