"""JointSeg as the paper states it: PAG without a learned gate, binary accuracy with level 0
normal (and a grade whose level 0 is frequent), two blocks per encoder level, a decoder
that reaches the input size by transposed convolutions, the recipe and augmentation of
the packaged config, and the baselines (inception U-Net, timm classifiers)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from coopseg.bench.jointseg import baseline_segmenter, bench_config
from coopseg.cli import resolve_config_path
from coopseg.config import JointConfig, load_config
from coopseg.data.base import IGNORE_INDEX
from coopseg.data.fashionscenes import FashionScenes, build_fashionscenes
from coopseg.data.joint import (
    AREA_EDGES,
    FOOTWEAR,
    object_share,
    predicted_abnormal,
    scene_class_labels,
)
from coopseg.data.transforms import eval_transform, standardize, train_transform
from coopseg.engine.distributed import DistInfo
from coopseg.engine.joint import JointTrainer, evaluate_classifier
from coopseg.models import JointSegEncoder, create_model
from coopseg.models import jointseg as jointseg_module
from coopseg.models.jointseg import PartialAttentionGate, ResidualInception, timm_classifier

from .test_jointseg import TINY, joint_config

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- PAG: a switch and max-pooling, no learned gate (default) -----------------------------
def test_pag_default_has_no_learned_gate_and_is_switch_plus_max_pool() -> None:
    torch.manual_seed(0)
    gate = PartialAttentionGate(4, [2, 3], 4).eval()
    assert gate.gate == "none"
    assert not any(hasattr(gate, name) for name in ("theta", "phi", "psi"))
    u, e0, e1 = torch.randn(1, 4, 4, 6), torch.randn(1, 2, 16, 24), torch.randn(1, 3, 4, 6)
    with torch.no_grad():
        expected = gate.fuse(torch.cat([u, F.max_pool2d(e0, 4, stride=4), e1], 1))
        torch.testing.assert_close(gate(u, [e0, e1]), expected)

    model = create_model("jointseg", **TINY)
    names = [n for n, _ in model.named_parameters()]
    assert not any(part in n for n in names for part in (".theta.", ".phi.", ".psi."))
    additive = create_model("jointseg", pag_gate="additive", **TINY)
    assert any(".theta." in n for n, _ in additive.named_parameters())
    with pytest.raises(ValueError, match="pag_gate"):
        create_model("jointseg", pag_gate="multiplicative", **TINY)


# -- binary accuracy: level 0 normal, on a grade whose level 0 is frequent ------------------
def test_binary_normal_is_level_0_in_schema_packaged_config_and_bench(tmp_path) -> None:
    assert JointConfig().binary_normal == [0]
    assert load_config(resolve_config_path("jointseg-fashionscenes")).joint.binary_normal == [0]
    assert bench_config("jointseg", 0, "quick", tmp_path).joint.binary_normal == [0]


def test_count_grade_makes_level_0_a_real_frequent_class(tiny_scenes) -> None:
    for split in ("train", "val"):
        scenes = FashionScenes(tiny_scenes, split)
        # the plain object count never reaches level 0: every scene holds an object
        assert (scenes.count == 0).sum() == 0
        every_object = scene_class_labels(scenes, "count", list(range(1, 11)))
        np.testing.assert_array_equal(every_object, scenes.count)
        grade = scene_class_labels(scenes, "count")
        expected = np.isin(scenes.objects, FOOTWEAR).sum(1)
        np.testing.assert_array_equal(grade, expected)
        assert grade.min() >= 0 and grade.max() <= 4
        share = np.bincount(grade, minlength=5) / len(grade)
        assert share[0] >= 0.25, share  # 44 % on the 2000-scene build, the modal grade
    with pytest.raises(ValueError, match="count_classes"):
        scene_class_labels(FashionScenes(tiny_scenes, "val"), "count", [11])


def test_area_grade_bins_the_pixels_of_every_segmented_class(tiny_scenes) -> None:
    scenes = FashionScenes(tiny_scenes, "train")
    masks = scenes.masks
    share = ((masks >= 1) & (masks <= 10)).mean((1, 2))  # any class; ignore band excluded
    np.testing.assert_allclose(object_share(masks), share)
    grade = scene_class_labels(scenes, "area")
    np.testing.assert_array_equal(grade, (share[:, None] >= np.array(AREA_EDGES)).sum(1))
    # every object class moves the grade, not footwear only: scenes without footwear span
    # several grades (the count grade gives all of them 0)
    no_footwear = ~np.isin(scenes.objects, FOOTWEAR).any(1)
    assert len(set(grade[no_footwear])) >= 3
    assert (scene_class_labels(scenes, "count")[no_footwear] == 0).all()
    # one mask pixel over an edge: the grade follows what the segmenter would segment
    scenes.masks = np.zeros_like(masks[:1])
    scenes.masks[0, : int(np.ceil(AREA_EDGES[2] * masks[0].size / masks.shape[2])), :] = 7
    assert scene_class_labels(scenes, "area").tolist() == [3]
    with pytest.raises(ValueError, match="area_edges: expected 4 increasing"):
        scene_class_labels(scenes, "area", area_edges=[0.3, 0.2, 0.4, 0.5])


def test_separate_classifier_scenes_share_no_scene_with_the_segmenters(
    tmp_path, make_config, monkeypatch
) -> None:
    monkeypatch.setenv("COOPSEG_CACHE", str(tmp_path / "cache"))
    cfg = joint_config(make_config, joint={"cls_data": "separate", "cls_scenes": 192})
    trainer = JointTrainer(cfg, show_progress=False)
    cls_scenes, train = trainer.cls_set.scenes, trainer.train_set
    assert len(cls_scenes) == 4 * len(train) and cls_scenes.root != train.root
    seen = {img.tobytes() for split in (train, trainer.val_set) for img in split.images}
    assert not any(img.tobytes() in seen for img in cls_scenes.images)
    # the check has teeth: the segmenter's generator seed gives its own scenes back
    same = build_fashionscenes(tmp_path / "same", size=64, train=48, val=1, seed=0)
    np.testing.assert_array_equal(FashionScenes(same, "train").images, train.images)
    from coopseg.config import ConfigError

    bad = joint_config(make_config, joint={"cls_data": "separate", "cls_scene_seed": 0})
    with pytest.raises(ConfigError, match="joint.cls_scene_seed: equals data.scene_seed"):
        JointTrainer(bad, show_progress=False)


def test_binary_rules_argmax_and_mass() -> None:
    # top-1 is level 0 (normal) but the mass on level 0 is below one half
    logits = torch.log(torch.tensor([[0.4, 0.15, 0.15, 0.15, 0.15], [0.1, 0.6, 0.1, 0.1, 0.1]]))
    assert predicted_abnormal(logits, [0], "argmax").tolist() == [0, 1]
    assert predicted_abnormal(logits, [0], "mass").tolist() == [1, 1]
    assert predicted_abnormal(logits, [0, 1], "mass").tolist() == [0, 0]
    with pytest.raises(ValueError, match="binary_rule"):
        predicted_abnormal(logits, [0], "vote")


class _FixedClassifier(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor, task: str = "cls") -> dict[str, torch.Tensor]:
        return {"cls": self.logits[: len(x)]}


def test_evaluate_classifier_binary_accuracy_follows_the_rule() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.15, 0.15, 0.15, 0.15]] * 4))
    data = [(torch.zeros(3, 4, 4), torch.tensor(label)) for label in (0, 0, 2, 3)]
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = _FixedClassifier(logits)
    by_argmax = evaluate_classifier(model, data, [0], dist=dist, batch_size=4)
    by_mass = evaluate_classifier(model, data, [0], dist=dist, batch_size=4, binary_rule="mass")
    assert by_argmax["binary"] == pytest.approx(0.5)  # all called normal: 2 of 4 right
    assert by_mass["binary"] == pytest.approx(0.5)  # all called abnormal: the other 2
    assert by_argmax["top1"] == pytest.approx(0.5)


# -- encoder: "multiples cascaded residual inception blocks" per level ---------------------
def _inception_params(width: int) -> int:
    """Parameters of ResidualInception(width, width), counted by hand (branch width
    b = width / 4; convs without bias, each followed by BN with 2 parameters a channel)."""
    b = width // 4
    convs = 3 * width * b + 3 * 9 * b * b + 9 * width * b + 9 * 4 * b * width + width * width
    bns = 2 * b * 7 + 2 * width * 2  # 7 branch convs; merge and residual
    return convs + bns


def test_encoder_has_two_inception_blocks_per_level_by_default() -> None:
    widths = [16, 32, 64, 128, 256]
    two = JointSegEncoder(widths=widths)
    for level in two.levels:
        assert sum(isinstance(m, ResidualInception) for m in level) == 2
    one = JointSegEncoder(widths=widths, blocks=1)
    assert _count(ResidualInception(32, 32)) == _inception_params(32)
    assert _count(two) - _count(one) == sum(_inception_params(w) for w in widths)
    assert _count(two) == 2_964_864 and _count(one) == 1_678_984
    model = create_model("jointseg", widths=widths)  # the packaged config's model
    assert sum(isinstance(m, ResidualInception) for m in model.encoder.modules()) == 10
    assert _count(model) == 4_917_728


# -- decoder: transposed convolutions up to the input size ----------------------------------
@pytest.mark.parametrize("size", [(64, 64), (33, 47)])
def test_decoder_reaches_input_size_by_transposed_convolutions(size, monkeypatch) -> None:
    model = create_model("jointseg", **TINY).eval()
    assert model.encoder.feature_info.reduction()[0] == 2  # stem stride 2
    ups = [m for m in model.ups if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == len(TINY["widths"])  # one per level below the deepest, plus stem
    assert all(m.kernel_size == (2, 2) and m.stride == (2, 2) for m in ups)
    last = f"decoder.{len(ups) - 1}"
    assert model.tap_info[last].stride == 1

    def no_resize(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("the decoder resized a map instead of reaching the size")

    monkeypatch.setattr(torch.nn.functional, "interpolate", no_resize)
    seen: dict[str, torch.Size] = {}
    hooks = [g.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.shape))
             for n, g in enumerate(model.gates)]  # fmt: skip
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))["out"]
    for h in hooks:
        h.remove()
    assert out.shape[-2:] == torch.Size(size)
    assert seen[len(ups) - 1][-2:] == torch.Size(size)  # the last PAG block runs at H x W


def test_stem_stride_1_adds_no_extra_stage() -> None:
    model = create_model("jointseg", stem_stride=1, **TINY)
    assert len(model.ups) == len(TINY["widths"]) - 1
    assert model(torch.randn(1, 3, 20, 28))["out"].shape[-2:] == (20, 28)


# -- the packaged config: the paper's recipe and augmentation -------------------------------
def test_packaged_config_follows_the_papers_recipe() -> None:
    cfg = load_config(resolve_config_path("jointseg-fashionscenes"))
    t, j, d, m = cfg.train, cfg.joint, cfg.data, cfg.model
    assert j.cls_lr_ratio == 30 and j.cls_batch_ratio == 32
    assert t.optimizer == "sgd" and t.nesterov and t.momentum > 0 and t.poly_power > 0
    assert m["blocks"] == 2 and m["pag_gate"] == "none"
    assert d.hflip and d.vflip and d.random_pad > 0 and d.normalize == "image"
    assert j.cls_hue > 0 and j.cls_contrast > 0 and j.cls_saturation > 0


# -- augmentation ---------------------------------------------------------------------------
def _sample(h: int = 12, w: int = 16) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    g = torch.Generator().manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
    mask = tv_tensors.Mask(torch.randint(0, 11, (h, w), generator=g))
    return image, mask


def _run(transform: v2.Compose, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return transform(*_sample())


def test_vertical_flip_moves_image_and_mask_together() -> None:
    transform = train_transform([12, 16], [1.0, 1.0], False, MEAN, STD, vflip=True)
    plain = train_transform([12, 16], [1.0, 1.0], False, MEAN, STD)
    base_image, base_mask = _run(plain, 0)
    flipped = 0
    for seed in range(12):
        image, mask = _run(transform, seed)
        if torch.equal(mask, base_mask):
            torch.testing.assert_close(image, base_image)
        else:
            torch.testing.assert_close(mask, base_mask.flip(-2))
            torch.testing.assert_close(image, base_image.flip(-2))
            flipped += 1
    assert 0 < flipped < 12


def test_random_padding_shifts_content_and_pads_mean_and_ignore() -> None:
    transform = train_transform([12, 16], [1.0, 1.0], False, MEAN, STD, random_pad=3)
    _, base_mask = _run(train_transform([12, 16], [1.0, 1.0], False, MEAN, STD), 0)
    shifts, padded_seeds = set(), 0
    for seed in range(20):
        image, mask = _run(transform, seed)
        assert image.shape[-2:] == mask.shape[-2:] == (12, 16)
        padded = mask == IGNORE_INDEX
        # padding shows the mean colour (rounded to uint8), which normalises to about 0
        assert torch.all(image[:, padded].abs() < 0.02)
        padded_seeds += bool(padded.any())
        found = [
            (dy, dx)
            for dy in range(-3, 4)
            for dx in range(-3, 4)
            if torch.equal(
                mask[max(dy, 0) : 12 + min(dy, 0), max(dx, 0) : 16 + min(dx, 0)],
                base_mask[max(-dy, 0) : 12 + min(-dy, 0), max(-dx, 0) : 16 + min(-dx, 0)],
            )
        ]
        assert found, "the crop is a shifted copy of the scene"
        shifts.add(found[0])
    assert len(shifts) > 3 and padded_seeds > 3


@pytest.mark.parametrize("mode", ["image", "image_channel"])
def test_per_image_standardisation(mode) -> None:
    image, mask = _sample()
    out, out_mask = eval_transform(MEAN, STD, mode)(image, mask)
    assert torch.equal(out_mask, mask)
    dims = (-2, -1) if mode == "image_channel" else (-3, -2, -1)
    torch.testing.assert_close(out.mean(dims), torch.zeros_like(out.mean(dims)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dims, unbiased=False), torch.ones_like(out.std(dims)))
    flat = standardize(torch.full((3, 4, 4), 0.7))
    assert torch.isfinite(flat).all() and flat.abs().max() < 1e-5
    with pytest.raises(ValueError, match="normalize"):
        eval_transform(MEAN, STD, "batch")


def test_colour_jitter_changes_the_image_only() -> None:
    jitter = {"hue": 0.1, "contrast": 0.5, "saturation": 0.5}
    transform = train_transform([12, 16], [1.0, 1.0], False, MEAN, STD, jitter=jitter)
    base_image, base_mask = _run(train_transform([12, 16], [1.0, 1.0], False, MEAN, STD), 0)
    image, mask = _run(transform, 0)
    assert torch.equal(mask, base_mask) and not torch.allclose(image, base_image)


def _steps(dataset: Any) -> list[type]:
    scenes = getattr(dataset, "scenes", dataset)
    return [type(t) for t in scenes.transform.transforms]


def test_trainer_streams_use_the_data_options_and_jitter_the_classifier_only(
    make_config,
) -> None:
    cfg = joint_config(
        make_config,
        data={"vflip": True, "random_pad": 4, "normalize": "image"},
        joint={"cls_hue": 0.05, "cls_contrast": 0.3, "cls_saturation": 0.3},
    )
    trainer = JointTrainer(cfg, show_progress=False)
    seg, cls = _steps(trainer.train_set), _steps(trainer.cls_set)
    assert v2.RandomVerticalFlip in seg and v2.RandomVerticalFlip in cls
    assert v2.ColorJitter in cls and v2.ColorJitter not in seg
    crop = next(
        t for t in trainer.cls_set.scenes.transform.transforms if isinstance(t, v2.RandomCrop)
    )
    assert crop.padding == [4, 4, 4, 4]
    for dataset in (trainer.val_set, trainer.cls_val_set, trainer.cls_set):
        image = dataset[0][0]
        assert abs(float(image.mean())) < 1e-4 and abs(float(image.std(unbiased=False)) - 1) < 1e-3


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"data": {"normalize": "batch"}}, "data.normalize"),
        ({"data": {"random_pad": -1}}, "data.random_pad"),
        ({"joint": {"binary_rule": "vote"}}, "joint.binary_rule"),
        ({"joint": {"count_classes": [0, 6]}}, "joint.count_classes"),
        ({"joint": {"cls_hue": 0.7}}, "joint.cls_hue"),
        ({"joint": {"cls_contrast": -0.1}}, "joint.cls_contrast"),
    ],
)
def test_new_keys_are_checked(make_config, section, message) -> None:
    from coopseg.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        JointTrainer(joint_config(make_config, **section), show_progress=False)


# -- baselines: inception U-Net, timm classifiers ------------------------------------------
def test_unet_with_the_inception_decoder_block_reuses_jointseg_block() -> None:
    encoder = JointSegEncoder(widths=[4, 8, 8, 16], blocks=1)
    unet = create_model("unet", backbone=encoder, num_classes=3, decoder_block="inception")
    assert all(type(stage.conv) is jointseg_module.ResidualInception for stage in unet.decoder)
    assert unet(torch.randn(1, 3, 30, 34))["out"].shape == (1, 3, 30, 34)
    plain = create_model("unet", backbone=JointSegEncoder(widths=[4, 8, 8, 16]), num_classes=3)
    assert not any(isinstance(m, ResidualInception) for m in plain.decoder.modules())
    with pytest.raises(ValueError, match="decoder_block"):
        create_model("unet", base_channels=4, num_classes=3, decoder_block="dense")
    bench_unet = baseline_segmenter("unet", [4, 8, 8, 16])
    assert all(isinstance(stage.conv, ResidualInception) for stage in bench_unet.decoder)


def test_timm_classifier_is_a_classifier_agent_the_trainer_trains(make_config) -> None:
    torch.manual_seed(0)
    model = timm_classifier("test_resnet", num_cls_classes=5)
    assert model(torch.randn(2, 3, 32, 32))["cls"].shape == (2, 5)
    cfg = joint_config(make_config, name="timm", train={"iterations": 2})
    trainer = JointTrainer(cfg, show_progress=False, model=model, tasks=("cls",))
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.train()
    assert result.last_cls is not None and 0 <= result.last_cls["binary"] <= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="'cls' agent"):
        model.agent_parameters("seg")
