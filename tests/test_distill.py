"""Mutual learning and distillation: the KL term against hand-computed values (the
ignore label excluded), detached targets, and training with a frozen teacher."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from coopseg.config import ConfigError
from coopseg.engine.checkpoint import save_weights
from coopseg.engine.distill import mutual_loss, soft_kl
from coopseg.engine.train import Trainer
from coopseg.models import create_model
from coopseg.models.cooperative import standalone

from .conftest import TINY_MEMBER, tiny_cooperative


def _kl(q: list[float], p: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(q, p, strict=True))


def _softmax(z: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def test_soft_kl_matches_a_hand_computation_and_skips_ignored_pixels() -> None:
    # one image, 2 classes, 1 x 3 pixels; the last pixel is ignored
    student = torch.tensor([[[[0.0, 1.0, 5.0]], [[1.0, 0.0, -5.0]]]])
    target = torch.tensor([[[[2.0, 0.0, 0.0]], [[0.0, 0.0, 9.0]]]])
    masks = torch.tensor([[[1, 0, 255]]])
    for t in (1.0, 2.0):
        want = (
            sum(
                _kl(
                    _softmax(target[0, :, 0, i].tolist(), t),
                    _softmax(student[0, :, 0, i].tolist(), t),
                )
                for i in range(2)
            )
            / 2
            * t
            * t
        )
        assert soft_kl(student, target, masks, t).item() == pytest.approx(want, rel=1e-5)
    assert soft_kl(student, target, torch.full_like(masks, 255)).item() == 0.0
    s = student.clone().requires_grad_(True)
    q = target.clone().requires_grad_(True)
    soft_kl(s, q, masks).backward()
    assert q.grad is None and s.grad.abs().sum() > 0  # the target is detached
    with pytest.raises(ValueError, match="same classes"):
        soft_kl(student, target[:, :1], masks)


def test_mutual_loss_pulls_each_member_towards_the_other() -> None:
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    masks = torch.randint(0, 3, (2, 4, 4))
    outputs = {"top.out": a, "bottom.out": b, "top.aux": torch.randn(2, 3, 4, 4)}
    want = soft_kl(a, b, masks, 2.0) + soft_kl(b, a, masks, 2.0)
    assert mutual_loss(outputs, masks, 2.0).item() == pytest.approx(want.item())
    assert mutual_loss({"top.out": a, "bottom.out": a}, masks).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="two or more members"):
        mutual_loss({"out": a}, masks)


def test_mutual_learning_trains_a_pair_whose_members_deploy_alone(make_config) -> None:
    cfg = make_config(
        name="dml",
        model=tiny_cooperative("ensemble"),
        train={"iterations": 2, "val_interval": 0, "mutual_weight": 1.0, "mutual_temperature": 2.0},
    )
    trainer = Trainer(cfg, show_progress=False)
    trainer.train()
    values = trainer.step(*next(iter(trainer.loader(trainer.train_set, 4, 0, "x"))))
    assert values["loss_mutual"].item() > 0
    member = standalone(trainer.model, "top")
    assert member is trainer.model.members["top"]
    x = torch.randn(1, 3, 32, 32)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(member(x)["out"], trainer.model(x)["top.out"])


def test_a_student_learns_from_a_frozen_teacher_of_the_same_classes(
    make_config, tmp_path: Path
) -> None:
    pair_cfg = make_config(name="teacher", model=tiny_cooperative("ensemble"))
    torch.manual_seed(0)
    pair = create_model("cooperative", **{k: v for k, v in pair_cfg.model.items() if k != "arch"})
    ckpt = tmp_path / "teacher.safetensors"
    save_weights(ckpt, pair, pair_cfg, {"class_names": [str(i) for i in range(11)]})
    student = {**TINY_MEMBER, "num_classes": 11}
    cfg = make_config(
        name="student",
        model=student,
        train={"iterations": 2, "val_interval": 0, "teacher": str(ckpt), "teacher_weight": 0.5},
    )
    trainer = Trainer(cfg, show_progress=False)
    teacher = trainer.teacher
    assert teacher.output == "fused" and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    trainer.train()
    values = trainer.step(*next(iter(trainer.loader(trainer.train_set, 4, 0, "x"))))
    assert values["loss_teacher"].item() > 0
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in before.items())

    member = make_config(
        name="s2", model=student, train={"teacher": str(ckpt), "teacher_output": "bottom"}
    )
    assert Trainer(member, show_progress=False).teacher.output == "bottom"
    wrong = make_config(
        name="s3", model=student, train={"teacher": str(ckpt), "teacher_output": "nope"}
    )
    with pytest.raises(ConfigError, match="train.teacher_output: unknown output 'nope'"):
        Trainer(wrong, show_progress=False)
    three = make_config(name="t3", model={**TINY_MEMBER, "num_classes": 3})
    small = create_model("deeplabv3plus", **{k: v for k, v in three.model.items() if k != "arch"})
    bad = tmp_path / "three.safetensors"
    save_weights(bad, small, three, {})
    refused = make_config(name="s4", model=student, train={"teacher": str(bad)})
    with pytest.raises(ConfigError, match="predicts 3 classes, the student's data set has 11"):
        Trainer(refused, show_progress=False)
