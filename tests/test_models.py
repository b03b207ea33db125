"""DeepLabv3+ structure: published parameter counts, shapes, taps, weights loading."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from coopseg import create_model
from coopseg.models import PretrainedWeightsError, run_taps
from coopseg.models.deeplabv3plus import atrous_rates


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("backbone", "published"), [("resnet101", 59.3e6), ("xception65", 54.7e6)])
def test_parameter_count_matches_published(backbone: str, published: float) -> None:
    model = create_model("deeplabv3plus", backbone=backbone, num_classes=21, output_stride=16)
    assert abs(n_params(model) - published) / published < 0.005


# Depthwise separable 3x3 convs in ASPP and decoder (the DeepLabv3+ paper's own model,
# the TF reference's split_separable_conv2d), 21 classes, OS 16: counted here, exact.
SEPARABLE_PARAMS = {"resnet101": 45_688_261, "xception65": 41_055_413}


@pytest.mark.parametrize(("backbone", "expected"), sorted(SEPARABLE_PARAMS.items()))
def test_separable_parameter_count(backbone: str, expected: int) -> None:
    with torch.device("meta"):  # sizes only; no arithmetic
        plain = create_model("deeplabv3plus", backbone=backbone, num_classes=21)
        model = create_model("deeplabv3plus", backbone=backbone, num_classes=21, separable=True)
    assert n_params(model) == expected
    # Only the five 3x3 convs change: each plain (C*256*9) becomes a depthwise (C*9) + BN(C)
    # + pointwise (C*256); ASPP sees the backbone's 2048 channels, the decoder 304 and 256.
    saved = sum(c * 256 * 9 - (c * 9 + 2 * c + c * 256) for c in (2048,) * 3 + (304, 256))
    assert n_params(plain) - n_params(model) == saved


def test_separable_follows_the_reference_layer_order() -> None:
    """depthwise 3x3 (dilated) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU, for the three
    atrous ASPP branches and the two decoder convs; 1x1 layers stay plain."""
    model = create_model(
        "deeplabv3plus", backbone="resnet18", num_classes=3, output_stride=8, separable=True
    )
    assert model.separable is True
    layers = [*list(model.aspp.branches)[1:4], model.decoder.conv1, model.decoder.conv2]
    for layer, rate in zip(layers, (12, 24, 36, 1, 1), strict=True):
        kinds = [type(m) for m in layer]
        assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
        depthwise, pointwise = layer[0], layer[3]
        assert depthwise.groups == depthwise.in_channels == depthwise.out_channels
        assert depthwise.kernel_size == (3, 3) and depthwise.dilation == (rate, rate)
        assert depthwise.padding == (rate, rate) and depthwise.bias is None
        assert pointwise.kernel_size == (1, 1) and pointwise.out_channels == 256
    assert model.decoder.conv1[0].in_channels == 256 + 48
    for plain in (model.aspp.branches[0], model.aspp.branches[4].conv, model.decoder.reduce):
        assert plain[0].kernel_size == (1, 1) and plain[0].groups == 1
    default = create_model("deeplabv3plus", backbone="resnet18", num_classes=3)
    assert default.separable is False and default.decoder.conv1[0].groups == 1


def test_depthwise_init_uses_the_depthwise_fan_out() -> None:
    """He init with fan-out k*k per input channel (torch's helper would divide by 2048)."""
    torch.manual_seed(0)
    model = create_model("deeplabv3plus", backbone="resnet18", num_classes=3, separable=True)
    depthwise = model.aspp.branches[1][0].weight  # 512 channels x 3x3
    assert depthwise.std().item() == pytest.approx((2 / 9) ** 0.5, rel=0.05)


def test_aspp_rates_follow_output_stride() -> None:
    assert atrous_rates(16) == (6, 12, 18)
    assert atrous_rates(8) == (12, 24, 36)
    model = create_model("deeplabv3plus", backbone="resnet18", num_classes=3, output_stride=8)
    dilations = [b[0].dilation[0] for b in list(model.aspp.branches)[1:4]]
    assert dilations == [12, 24, 36]
    with pytest.raises(ValueError, match="output_stride"):
        atrous_rates(4)


def test_aspp_rates_option_sets_the_atrous_branches() -> None:
    """A miniature's 8x8 map needs small rates: with (1, 2, 3) every branch is a real
    3x3 atrous conv (an off-centre tap of the map's centre lands inside the map)."""
    model = create_model(
        "deeplabv3plus", backbone="resnet18", num_classes=3, separable=True, aspp_rates=[1, 2, 3]
    )
    assert [b[0].dilation[0] for b in list(model.aspp.branches)[1:4]] == [1, 2, 3]
    assert model.aspp_rates == (1, 2, 3)
    for bad in ([1, 2], [0, 1, 2], [1.5, 2, 3]):
        with pytest.raises(ValueError, match="model.aspp_rates"):
            create_model("deeplabv3plus", backbone="resnet18", num_classes=3, aspp_rates=bad)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("size", [(64, 64), (65, 97), (50, 130)])
def test_output_has_input_size(output_stride: int, size: tuple[int, int]) -> None:
    model = create_model(
        "deeplabv3plus",
        backbone="resnet18",
        num_classes=5,
        output_stride=output_stride,
        aspp_channels=16,
        decoder_channels=16,
    ).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert set(out) == {"out"}
    assert out["out"].shape == (2, 5, *size)


@pytest.mark.parametrize("separable", [False, True])
def test_taps_are_named_in_execution_order_and_carry_declared_shapes(separable: bool) -> None:
    model = create_model(
        "deeplabv3plus", backbone="resnet18", num_classes=4, separable=separable
    ).eval()
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, fmap: torch.Tensor) -> torch.Tensor:
        seen[name] = fmap
        return fmap

    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        tapped = run_taps(model.forward_taps(x), record)["out"]
        plain = model(x)["out"]
    assert list(seen) == list(model.tap_info)
    stages = [n for n in seen if n.startswith("backbone.")]  # send-only stage taps first
    assert list(seen)[: len(stages)] == stages
    head = list(seen)[len(stages) : len(stages) + 7]
    assert head == ["backbone", *(f"aspp.b{i}" for i in range(5)), "aspp"]
    for name, info in model.tap_info.items():
        assert seen[name].shape[1] == info.channels, name
        assert seen[name].shape[-2:] == (64 // info.stride, 96 // info.stride), name
    torch.testing.assert_close(tapped, plain)


@pytest.mark.parametrize("separable", [False, True])
def test_extra_channels_widen_the_consuming_layers(separable: bool) -> None:
    extra = {
        "backbone": 5,
        "aspp.b2": 7,
        "aspp.b4": 3,
        "aspp": 11,
        "decoder.low": 2,
        "decoder.conv1": 13,
        "decoder.conv2": 17,
    }
    kwargs = {"backbone": "resnet18", "num_classes": 4, "separable": separable}
    base = create_model("deeplabv3plus", **kwargs)
    wide = create_model("deeplabv3plus", extra_channels=extra, **kwargs)
    for b_base, b_wide in zip(base.aspp.branches, wide.aspp.branches, strict=True):
        conv_base = b_base.conv[0] if hasattr(b_base, "conv") else b_base[0]
        conv_wide = b_wide.conv[0] if hasattr(b_wide, "conv") else b_wide[0]
        assert conv_wide.in_channels == conv_base.in_channels + 5
    assert wide.aspp.project[0][0].in_channels == base.aspp.project[0][0].in_channels + 10
    assert wide.decoder.conv1[0].in_channels == base.decoder.conv1[0].in_channels + 13
    assert wide.decoder.conv2[0].in_channels == base.decoder.conv2[0].in_channels + 13
    assert wide.classifier.in_channels == base.classifier.in_channels + 17
    if separable:  # the received channels go into the depthwise conv, then the pointwise
        for layer in (*list(wide.aspp.branches)[1:4], wide.decoder.conv1, wide.decoder.conv2):
            assert layer[0].groups == layer[0].in_channels == layer[3].in_channels

    # A widened model runs when the driver hands back concatenated maps.
    def widen(name: str, fmap: torch.Tensor) -> torch.Tensor:
        if name in extra:
            pad = torch.zeros(fmap.shape[0], extra[name], *fmap.shape[-2:])
            return torch.cat([fmap, pad], 1)
        return fmap

    with torch.no_grad():
        out = run_taps(wide.eval().forward_taps(torch.randn(1, 3, 64, 64)), widen)["out"]
    assert out.shape == (1, 4, 64, 64)


def test_unknown_tap_and_architecture_are_named() -> None:
    with pytest.raises(ValueError, match=r"no tap\(s\) \['aspp.b9'\]"):
        create_model("deeplabv3plus", backbone="resnet18", extra_channels={"aspp.b9": 3})
    with pytest.raises(ValueError, match="unknown architecture 'deeplab'"):
        create_model("deeplab")
    with pytest.raises(ValueError, match="unknown backbone 'resnet1O1'"):
        create_model("deeplabv3plus", backbone="resnet1O1")


def test_pretrained_local_file_loads_the_backbone_weights(tmp_path) -> None:
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = create_model("deeplabv3plus", backbone="resnet18", num_classes=3, pretrained=str(path))
    torch.testing.assert_close(model.backbone.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(
        model.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var
    )
    pth = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), pth)
    model = create_model("deeplabv3plus", backbone="resnet18", num_classes=3, pretrained=str(pth))
    torch.testing.assert_close(
        model.backbone.layer1[0].conv1.weight, reference.layer1[0].conv1.weight
    )


def test_pretrained_file_of_another_backbone_is_refused(tmp_path) -> None:
    other = timm.create_model("resnet34", pretrained=False)
    path = tmp_path / "resnet34.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(PretrainedWeightsError, match="does not fit backbone 'resnet18'"):
        create_model("deeplabv3plus", backbone="resnet18", pretrained=str(path))
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        create_model("deeplabv3plus", backbone="resnet18", pretrained=str(tmp_path / "nope.pth"))


def test_pretrained_offline_fails_fast_with_advice(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsError, match="pretrained='/path/to/weights.safetensors'"):
        create_model("deeplabv3plus", backbone="resnet18", pretrained=True)
    assert time.perf_counter() - start < 10


def test_frozen_batchnorm_does_not_couple_samples() -> None:
    model = create_model(
        "deeplabv3plus",
        backbone="resnet18",
        num_classes=3,
        freeze_bn=True,
        dropout=0.0,
        aspp_channels=16,
        decoder_channels=16,
    ).train()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        together = model(x)["out"]
        alone = torch.cat([model(x[i : i + 1])["out"] for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_paper_configs_use_separable_convolutions() -> None:
    """Every DeepLabv3+ of the feature-sharing and cross papers' configs is separable."""
    from coopseg.config import PACKAGED_CONFIGS, load_config

    paths = sorted(PACKAGED_CONFIGS.glob("fs-deeplab-*.yaml"))
    paths += sorted(PACKAGED_CONFIGS.glob("cross-*.yaml"))
    assert len(paths) == 8 + 15
    for path in paths:
        model = load_config(path).model
        members = model.get("members", [model])
        deeplabs = [m for m in members if m["arch"] == "deeplabv3plus"]
        assert deeplabs, path.name
        assert all(m.get("separable") is True for m in deeplabs), path.name
