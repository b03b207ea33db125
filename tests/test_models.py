"""DeepLabv3+ structure: published parameter counts, shapes, taps, weights loading."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from coopseg import create_model
from coopseg.models import PretrainedWeightsError, run_taps
from coopseg.models.deeplabv3plus import aspp_rates


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("backbone", "published"), [("resnet101", 59.3e6), ("xception65", 54.7e6)])
def test_parameter_count_matches_published(backbone: str, published: float) -> None:
    model = create_model("deeplabv3plus", backbone=backbone, num_classes=21, output_stride=16)
    assert abs(n_params(model) - published) / published < 0.005


def test_aspp_rates_follow_output_stride() -> None:
    assert aspp_rates(16) == (6, 12, 18)
    assert aspp_rates(8) == (12, 24, 36)
    model = create_model("deeplabv3plus", backbone="resnet18", num_classes=3, output_stride=8)
    dilations = [b[0].dilation[0] for b in list(model.aspp.branches)[1:4]]
    assert dilations == [12, 24, 36]
    with pytest.raises(ValueError, match="output_stride"):
        aspp_rates(4)


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


def test_taps_are_named_in_execution_order_and_carry_declared_shapes() -> None:
    model = create_model("deeplabv3plus", backbone="resnet18", num_classes=4).eval()
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, fmap: torch.Tensor) -> torch.Tensor:
        seen[name] = fmap
        return fmap

    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        tapped = run_taps(model.forward_taps(x), record)["out"]
        plain = model(x)["out"]
    assert list(seen) == list(model.tap_info)
    assert list(seen)[:7] == ["backbone", *(f"aspp.b{i}" for i in range(5)), "aspp"]
    for name, info in model.tap_info.items():
        assert seen[name].shape[1] == info.channels, name
        assert seen[name].shape[-2:] == (64 // info.stride, 96 // info.stride), name
    torch.testing.assert_close(tapped, plain)


def test_extra_channels_widen_the_consuming_layers() -> None:
    extra = {
        "backbone": 5,
        "aspp.b2": 7,
        "aspp.b4": 3,
        "aspp": 11,
        "decoder.low": 2,
        "decoder.conv1": 13,
        "decoder.conv2": 17,
    }
    base = create_model("deeplabv3plus", backbone="resnet18", num_classes=4)
    wide = create_model("deeplabv3plus", backbone="resnet18", num_classes=4, extra_channels=extra)
    for b_base, b_wide in zip(base.aspp.branches, wide.aspp.branches, strict=True):
        conv_base = b_base.conv[0] if hasattr(b_base, "conv") else b_base[0]
        conv_wide = b_wide.conv[0] if hasattr(b_wide, "conv") else b_wide[0]
        assert conv_wide.in_channels == conv_base.in_channels + 5
    assert wide.aspp.project[0][0].in_channels == base.aspp.project[0][0].in_channels + 10
    assert wide.decoder.conv1[0].in_channels == base.decoder.conv1[0].in_channels + 13
    assert wide.decoder.conv2[0].in_channels == base.decoder.conv2[0].in_channels + 13
    assert wide.classifier.in_channels == base.classifier.in_channels + 17

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
