"""JointSeg: PAG geometry, the two agents' optimizers, label noise, resume, encoder reuse."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coopseg.config import ConfigError, config_from_dict
from coopseg.data.joint import binary_labels, noisy_labels
from coopseg.engine.joint import JointTrainer
from coopseg.models import JointSegEncoder, create_model
from coopseg.models.jointseg import PartialAttentionGate, ResidualInception, pag_pool, pag_ratio

TINY = {"widths": [4, 8, 8, 16], "cls_width": 8, "cls_blocks": 1}


def joint_config(make_config, **sections: Any):
    """A tiny JointSeg config (the fixture's model section is replaced, not merged)."""
    model = {"arch": "jointseg", "num_classes": 11, "num_cls_classes": 5, **TINY}
    model.update(sections.pop("model", {}))
    joint = {"cls_lr_ratio": 30.0, "cls_batch_ratio": 2, **sections.pop("joint", {})}
    train = {"optimizer": "sgd", "nesterov": True, "lr": 0.01, "iterations": 4, "val_interval": 0}
    train.update(sections.pop("train", {}))
    data = {"batch_size": 2, "crop_size": [32, 32], **sections.pop("data", {})}
    raw = make_config(joint=joint, train=train, data=data, **sections).to_dict()
    raw["model"] = model
    return config_from_dict(raw)


# -- PAG -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("e_size", "u_size", "ratio", "on"),
    [
        ((32, 32), (8, 8), 4.0, True),
        ((16, 16), (8, 8), 2.0, True),
        ((8, 8), (8, 8), 1.0, True),
        ((4, 4), (8, 8), 0.5, False),
        ((16, 24), (8, 12), 2.0, True),  # non-square: min over h and w
        ((24, 16), (6, 4), 4.0, True),
        ((9, 17), (5, 9), 1.8, True),  # odd sizes: a non-integer ratio
        ((5, 9), (9, 17), 5 / 9, False),
    ],
)
def test_pag_ratio_and_switch(e_size, u_size, ratio, on) -> None:
    a = pag_ratio(e_size, u_size)
    assert a == pytest.approx(ratio)
    assert (a >= 1) is on
    e = torch.randn(1, 3, *e_size)
    if on:
        pooled = pag_pool(e, u_size)
        assert pooled.shape[-2:] == torch.Size(u_size)
        if a == 1:
            assert pooled is e  # identity at a_i = 1
        elif a == int(a):
            torch.testing.assert_close(pooled, F.max_pool2d(e, int(a), stride=int(a)))
    else:
        with pytest.raises(ValueError, match="smaller"):
            pag_pool(e, u_size)


@pytest.mark.parametrize("size", [(33, 47), (20, 64), (17, 9)])
def test_jointseg_shapes_and_gated_maps_on_odd_and_non_square_inputs(size) -> None:
    model = create_model("jointseg", **TINY).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        maps = model.encoder(x)
    # every decoder stage attends exactly to the maps at its level and shallower, which
    # are all at least as large as the upsampled map (switch on), deeper ones are not used;
    # the last stage (input size) finds no encoder map that large
    for gate, level in zip(model.gates, model.targets, strict=True):
        if level is None:
            assert gate.encoder_chs == []
            assert all(pag_ratio(m.shape[-2:], size) < 1 for m in maps)
            continue
        assert len(gate.encoder_chs) == level + 1
        u = maps[level].shape[-2:]
        assert all(pag_ratio(m.shape[-2:], u) >= 1 for m in maps[: level + 1])
        assert all(pag_pool(m, u).shape[-2:] == u for m in maps[: level + 1])
        assert all(pag_ratio(m.shape[-2:], u) < 1 for m in maps[level + 1 :])
    with torch.no_grad():
        out = model(x)
        assert set(model(x, task="cls")) == {"cls"}
    assert out["out"].shape == (1, 11, *size)
    assert out["cls"].shape == (1, 5)


@pytest.mark.parametrize("kind", ["none", "additive"])
def test_pag_gates_encoder_maps_into_the_fusion(kind) -> None:
    torch.manual_seed(0)
    gate = PartialAttentionGate(4, [2, 3], 4, gate=kind).eval()
    u = torch.randn(1, 4, 4, 6)
    e0, e1 = torch.randn(1, 2, 16, 24), torch.randn(1, 3, 4, 6)
    base = gate(u, [e0, e1])
    changed = e0.clone()
    changed[..., 0, 0] += 100.0  # the max of its 4x4 pooling window
    assert not torch.allclose(gate(u, [changed, e1]), base)


def test_residual_inception_factorized_uses_n_by_1_convs() -> None:
    plain = ResidualInception(8, 8)
    fact = ResidualInception(8, 8, factorized=True)
    kernels = {tuple(m.kernel_size) for m in fact.modules() if isinstance(m, torch.nn.Conv2d)}
    assert (1, 3) in kernels and (3, 1) in kernels and (3, 3) not in kernels
    plain_k = {tuple(m.kernel_size) for m in plain.modules() if isinstance(m, torch.nn.Conv2d)}
    assert (3, 3) in plain_k and (1, 3) not in plain_k
    assert fact(torch.randn(1, 8, 7, 5)).shape == (1, 8, 7, 5)


# -- encoder reuse ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["unet", "fcn8s"])
def test_encoder_works_inside_unet_and_fcn(arch) -> None:
    encoder = JointSegEncoder(widths=[4, 8, 8, 16, 16])
    extra = {"head_channels": 16} if arch == "fcn8s" else {}
    model = create_model(arch, backbone=encoder, num_classes=3, **extra)
    assert model.backbone is encoder
    x = torch.randn(1, 3, 40, 56)
    out = model(x)["out"]
    assert out.shape == (1, 3, 40, 56)
    out.sum().backward()
    assert encoder.stem[0].weight.grad is not None


# -- labels ------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "p"), [(100, 0.8), (7, 0.5), (48, 0.0), (10, 1.0), (33, 0.25)])
def test_label_noise_fraction_exact_and_deterministic(n, p) -> None:
    labels = np.arange(n) % 5
    noisy, replaced = noisy_labels(labels, p, 5, seed=3)
    assert len(replaced) == round(n * p) == len(set(replaced.tolist()))
    untouched = np.setdiff1d(np.arange(n), replaced)
    np.testing.assert_array_equal(noisy[untouched], labels[untouched])
    again, replaced2 = noisy_labels(labels, p, 5, seed=3)
    np.testing.assert_array_equal(noisy, again)
    np.testing.assert_array_equal(replaced, replaced2)
    assert noisy.min() >= 0 and noisy.max() < 5
    if 0 < round(n * p) < n:
        _, other = noisy_labels(labels, p, 5, seed=4)
        assert not np.array_equal(other, replaced) or n < 10


def test_binary_labels() -> None:
    np.testing.assert_array_equal(binary_labels(np.array([0, 1, 2, 4]), [0, 1]), [0, 0, 1, 1])
    np.testing.assert_array_equal(binary_labels(np.array([0, 1, 2, 4]), [0]), [0, 1, 1, 1])


# -- the two agents ----------------------------------------------------------------------
def _params(module_list) -> list[torch.Tensor]:
    return [p.detach().clone() for m in module_list for p in m.parameters()]


def _moved(before, module_list) -> bool:
    after = [p for m in module_list for p in m.parameters()]
    return any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_each_optimizer_steps_shared_encoder_and_only_its_own_part(make_config) -> None:
    trainer = JointTrainer(joint_config(make_config), show_progress=False)
    model = trainer.model
    parts = {p: model.agent_modules(p) for p in ("shared", "cls", "seg")}
    ids = {p: {id(q) for m in mods for q in m.parameters()} for p, mods in parts.items()}
    assert not ids["shared"] & ids["cls"] and not ids["cls"] & ids["seg"]
    assert ids["shared"] | ids["cls"] | ids["seg"] == {id(q) for q in model.parameters()}
    owned = {a: {id(p) for g in o.param_groups for p in g["params"]} for a, o in
             trainer.optimizers.items()}  # fmt: skip
    assert owned["cls"] == ids["shared"] | ids["cls"]
    assert owned["seg"] == ids["shared"] | ids["seg"]

    images = torch.randn(4, 3, 32, 32)
    before = {p: _params(m) for p, m in parts.items()}
    trainer.cls_step(images, torch.tensor([0, 1, 2, 3]))
    assert _moved(before["shared"], parts["shared"]) and _moved(before["cls"], parts["cls"])
    assert not _moved(before["seg"], parts["seg"])

    before = {p: _params(m) for p, m in parts.items()}
    trainer.seg_step(images[:2], torch.randint(0, 11, (2, 32, 32)))
    assert _moved(before["shared"], parts["shared"]) and _moved(before["seg"], parts["seg"])
    assert not _moved(before["cls"], parts["cls"])


def test_lr_and_batch_ratios_honoured(make_config) -> None:
    cfg = joint_config(make_config, joint={"cls_lr_ratio": 30.0, "cls_batch_ratio": 3})
    trainer = JointTrainer(cfg, show_progress=False)
    cls_opt, seg_opt = trainer.optimizers["cls"], trainer.optimizers["seg"]
    assert cls_opt.param_groups[0]["lr"] == pytest.approx(30 * seg_opt.param_groups[0]["lr"])
    assert seg_opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert cls_opt.param_groups[0]["nesterov"] and seg_opt.param_groups[0]["nesterov"]
    seen: dict[str, list[int]] = {"cls": [], "seg": []}
    trainer.cls_step = lambda x, y: seen["cls"].append(len(x)) or {}  # type: ignore[method-assign]
    trainer.seg_step = lambda x, y: seen["seg"].append(len(x)) or {}  # type: ignore[method-assign]
    trainer.cfg.train.val_interval = 0
    trainer.validate = lambda: (None, None)  # type: ignore[method-assign]
    trainer.train()
    assert seen["seg"] == [2] * 4 and seen["cls"] == [6] * 4


def test_label_noise_reaches_the_classifier_stream(make_config) -> None:
    clean = JointTrainer(joint_config(make_config, name="clean"), show_progress=False)
    noisy = JointTrainer(
        joint_config(make_config, name="noisy", joint={"cls_label_noise": 0.5}),
        show_progress=False,
    )
    assert len(noisy.noisy_indices) == round(0.5 * len(noisy.cls_set)) == 24
    keep = np.setdiff1d(np.arange(48), noisy.noisy_indices)
    assert torch.equal(noisy.cls_set.labels[keep], clean.cls_set.labels[keep])
    assert torch.equal(noisy.cls_val_set.labels, clean.cls_val_set.labels)  # eval is clean


def test_checkpoint_resume_equals_uninterrupted_run(make_config) -> None:
    straight = JointTrainer(joint_config(make_config, name="straight"), show_progress=False)
    result = straight.train()
    assert result.last_cls is not None and 0 <= result.last_cls["top1"] <= 1
    assert result.last_cls["top2"] >= result.last_cls["top1"]

    cut = joint_config(make_config, name="resumed", train={"max_time_s": 1e-9})
    assert JointTrainer(cut, show_progress=False).train().iteration == 1
    resumed = JointTrainer(joint_config(make_config, name="resumed"), resume=True,
                           show_progress=False)  # fmt: skip
    assert resumed.iteration == 1
    assert resumed.train().iteration == 4
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    for agent in ("cls", "seg"):
        sa = straight.optimizers[agent].state_dict()["state"]
        sb = resumed.optimizers[agent].state_dict()["state"]
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"])
        assert straight.schedulers[agent].get_last_lr() == resumed.schedulers[agent].get_last_lr()


def test_resume_refuses_a_changed_joint_section(make_config) -> None:
    JointTrainer(
        joint_config(make_config, name="r", train={"max_time_s": 1e-9}), show_progress=False
    ).train()
    with pytest.raises(Exception, match="joint section"):
        JointTrainer(
            joint_config(make_config, name="r", joint={"cls_lr_ratio": 10.0}),
            resume=True,
            show_progress=False,
        )


def test_bad_joint_values_are_config_errors(make_config) -> None:
    with pytest.raises(ConfigError, match="cls_label"):
        joint_config(make_config, joint={"cls_label": "severity"})
    with pytest.raises(ConfigError, match="num_cls_classes"):
        JointTrainer(joint_config(make_config, joint={"cls_label": "dominant"}))
    with pytest.raises(ConfigError, match="cls_batch_ratio"):
        JointTrainer(
            joint_config(make_config, joint={"cls_batch_ratio": 30}), show_progress=False
        ).train()


def test_the_joint_trainer_runs_the_same_fault_tolerant_loop(make_config) -> None:
    """One loop for both trainers: resume auto, the last.prev.pt fallback, a stretched
    schedule and the time-based checkpoint reach JointSeg's two agents too."""
    from coopseg.engine.loop import TrainingLoop

    assert issubclass(JointTrainer, TrainingLoop)
    cfg = joint_config(make_config, name="auto", train={"resume": "auto", "max_time_s": 1e-9})
    first = JointTrainer(cfg, show_progress=False)
    assert "starting a new run" in first.resume_note
    first.train()
    ckpts = cfg.run_dir / "checkpoints"
    (ckpts / "last.pt").replace(ckpts / "last.prev.pt")  # as if the newest never landed
    (ckpts / "last.pt").write_bytes(b"not a checkpoint")
    longer = joint_config(
        make_config,
        name="auto",
        train={"resume": "auto", "iterations": 8, "checkpoint_interval": 0,
               "checkpoint_interval_s": 1e-9},
    )  # fmt: skip
    resumed = JointTrainer(longer, show_progress=False)
    assert resumed.iteration == 1 and "last.prev.pt" in resumed.resume_note
    assert "train.iterations 4 -> 8" in resumed.schedule_note
    power = longer.train.poly_power
    for agent in ("cls", "seg"):
        expected = resumed.agent_lr(agent) * (1 - 1 / 8) ** power
        assert resumed.optimizers[agent].param_groups[0]["lr"] == pytest.approx(expected)
    assert resumed.train().iteration == 8
