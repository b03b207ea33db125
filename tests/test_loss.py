"""Loss terms (cross-entropy with class weights, OHEM, label smoothing; Dice; focal;
Lovász) against values worked out by hand, the ignore label included; key checks."""

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
        ({"loss": {"dise": {"weight": 1.0}}}, r"unknown config key train.loss.dise"),
        ({"loss": {"ce": {"weight": 0.0}}}, r"train.loss: every term's weight is 0"),
        ({"loss": {"dice": {"weight": -1.0}}}, r"train.loss.dice.weight: expected >= 0"),
        ({"loss": {"ce": {"label_smoothing": 1.0}}}, r"train.loss.ce.label_smoothing"),
        ({"loss": {"ce": {"class_weights": [1.0]}}}, r"train.loss.ce.class_weights: expected 3"),
        ({"loss": {"focal": {"weight": 1.0, "class_weights": [1.0]}}}, r"focal.class_weights"),
        ({"loss": {"ce": {"ohem_min_kept": 5}}}, r"train.loss.ce.ohem_min_kept is set but"),
        (
            {"class_weights": [1.0, 2.0, 1.0], "loss": {"ce": {"ohem_thresh": 0.7}}},
            r"train.class_weights and train.loss.ce.ohem_thresh are both set",
        ),
        (
            {"loss": {"ce": {"weight": 0.0, "label_smoothing": 0.1}, "dice": {"weight": 1.0}}},
            r"train.loss.ce.weight is 0 but cross-entropy options are set",
        ),
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
    weight, ce = trainer.criterion.terms["ce"]
    assert weight == 1.0 and list(trainer.criterion.terms) == ["ce"]
    assert ce.class_weights.tolist() == [1.0] * 10 + [2.0]
    assert (ce.ohem_thresh, ce.ohem_min_kept) == (0.7, 64)


def _probs(p0: list[float]) -> torch.Tensor:
    """Logits ``[1, 2, 1, N]`` whose softmax puts ``p0`` on class 0, the rest on class 1."""
    p = torch.tensor(p0, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()]).view(1, 2, 1, -1).float()


# three pixels: class-0 probabilities 0.8, 0.4, 0.3; targets 0, 1, ignored
LOGITS = _probs([0.8, 0.4, 0.3])
TARGET = torch.tensor([[[0, 1, IGNORE_INDEX]]])


def _terms(**terms) -> SegmentationLoss:
    cfg = config_from_dict({"model": {**MODEL, "num_classes": 2}, "train": {"loss": terms}})
    return SegmentationLoss.from_config({}, cfg.train)


def test_label_smoothing_by_hand() -> None:
    # true-class probabilities 0.8 and 0.6; e = 0.1, C = 2:
    # pixel loss = (1 - e/2) (-log p_true) + e/2 (-log p_other), mean over labelled pixels
    loss, _ = _terms(ce={"label_smoothing": 0.1})({"out": LOGITS}, TARGET)
    hand = (0.95 * -math.log(0.8) + 0.05 * -math.log(0.2)) + (
        0.95 * -math.log(0.6) + 0.05 * -math.log(0.4)
    )
    assert loss.item() == pytest.approx(hand / 2, rel=1e-5)


def test_dice_by_hand() -> None:
    # class 0: prob (0.8, 0.4), truth (1, 0): 2 * 0.8 / (1.2 + 1) ; class 1: prob (0.2,
    # 0.6), truth (0, 1): 2 * 0.6 / (0.8 + 1); loss = 1 - the mean. The ignored pixel's
    # 0.3 would change both if it counted.
    loss, parts = _terms(ce={"weight": 0.0}, dice={"weight": 1.0})({"out": LOGITS}, TARGET)
    hand = 1 - (1.6 / 2.2 + 1.2 / 1.8) / 2
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    assert list(parts) == ["out"]


def test_focal_by_hand() -> None:
    # gamma 2: (1 - p)^2 (-log p) for p = 0.8 and 0.6, class weights 3 (class 0), 1
    crit = _terms(ce={"weight": 0.0}, focal={"weight": 1.0, "class_weights": [3.0, 1.0]})
    loss, _ = crit({"out": LOGITS}, TARGET)
    hand = (3 * 0.2**2 * -math.log(0.8) + 1 * 0.4**2 * -math.log(0.6)) / (3 + 1)
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    # gamma 0 is cross-entropy
    loss, _ = _terms(ce={"weight": 0.0}, focal={"weight": 1.0, "gamma": 0.0})(
        {"out": LOGITS}, TARGET
    )
    assert loss.item() == pytest.approx((-math.log(0.8) - math.log(0.6)) / 2, rel=1e-5)


def test_lovasz_by_hand() -> None:
    # class 0: errors |fg - p| = (0.2 fg, 0.4 bg), sorted 0.4 (bg), 0.2 (fg); Jaccard loss
    # along the order: 1 - 1/2, 1 - 0/2 -> increments 0.5, 0.5 -> 0.4*0.5 + 0.2*0.5 = 0.3.
    # class 1: errors (0.2 bg, 0.4 fg), sorted 0.4 (fg), 0.2 (bg): Jaccard loss 1, 1 ->
    # increments 1, 0 -> 0.4. Mean over the present classes: 0.35.
    loss, _ = _terms(ce={"weight": 0.0}, lovasz={"weight": 1.0})({"out": LOGITS}, TARGET)
    assert loss.item() == pytest.approx(0.35, rel=1e-5)


def test_terms_sum_over_every_head() -> None:
    """ce + 0.5 dice on the main head, a member's head and an aux head (weight 0.4)."""
    g = torch.Generator().manual_seed(1)
    outputs = {n: torch.randn(2, 3, 4, 5, generator=g) for n in ("top.out", "top.aux", "out")}
    target = torch.randint(0, 3, (2, 4, 5), generator=g)
    target[1, :2] = IGNORE_INDEX
    crit = _terms(dice={"weight": 0.5})
    crit.aux_weights = {"aux": 0.4}
    loss, parts = crit(outputs, target)
    ce = {n: F.cross_entropy(o, target, ignore_index=IGNORE_INDEX) for n, o in outputs.items()}
    dice = {n: crit.terms["dice"][1](o, target) for n, o in outputs.items()}
    head = {n: ce[n] + 0.5 * dice[n] for n in outputs}
    torch.testing.assert_close(loss, head["out"] + head["top.out"] + 0.4 * head["top.aux"])
    torch.testing.assert_close(parts["top.aux"], head["top.aux"])
    torch.testing.assert_close(parts["term.ce"], ce["out"] + ce["top.out"] + 0.4 * ce["top.aux"])
    torch.testing.assert_close(parts["term.ce"] + parts["term.dice"], loss)


def test_all_ignored_batch_gives_zero_loss_with_gradient() -> None:
    logits = LOGITS.clone().requires_grad_(True)
    target = torch.full_like(TARGET, IGNORE_INDEX)
    crit = _terms(dice={"weight": 1.0}, focal={"weight": 1.0}, lovasz={"weight": 1.0})
    loss, _ = crit({"out": logits}, target)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().sum().item() == 0.0


def test_old_loss_keys_give_the_same_loss_as_train_loss_ce() -> None:
    """Configs written before ``train.loss`` load and give bit-identical numbers."""
    logits, target = _batch(classes=3)
    logits.requires_grad_(True)
    old = {"class_weights": [0.5, 2.0, 1.0], "ohem_thresh": 0.6, "ohem_min_kept": 4}
    direct = SegmentationLoss(class_weights=[0.5, 2.0, 1.0], ohem_thresh=0.6, ohem_min_kept=4)
    values = []
    for train in (old, {"loss": {"ce": old}}, None):
        if train is None:
            crit = direct
        else:
            crit = SegmentationLoss.from_config(
                {}, config_from_dict({"model": MODEL, "train": train}).train
            )
        loss, _ = crit({"out": logits}, target)
        values.append((loss, torch.autograd.grad(loss, logits)[0]))
    for loss, grad in values[1:]:
        assert torch.equal(loss, values[0][0]) and torch.equal(grad, values[0][1])
