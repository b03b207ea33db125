"""FCN-8s and U-Net baselines: shapes, bilinear upsamplers, fusion, skips, encoders, taps."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coopseg import create_model
from coopseg.models import run_taps
from coopseg.models.fcn import BilinearUpsample, FCN8s, fit_to
from coopseg.models.unet import UNet

SMALL = {
    "fcn8s": {"backbone": "resnet18", "head_channels": 16},
    "unet": {"backbone": "resnet18", "decoder_channels": (32, 16, 16, 8)},
    "unet-classic": {"backbone": "unet", "base_channels": 4},
}


def build(kind: str, num_classes: int = 3, **kwargs) -> nn.Module:
    arch = kind.split("-")[0]
    return create_model(arch, num_classes=num_classes, **{**SMALL[kind], **kwargs})


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class TinyEncoder(nn.Module):
    """A non-timm encoder (as JointSeg brings): list of maps + timm-style feature_info.

    Downsamples with 2x2 stride-2 convs, which round odd sizes *down* (timm rounds up).
    """

    class Info:
        def channels(self) -> list[int]:
            return [8, 12, 16, 20, 24]

        def reduction(self) -> list[int]:
            return [2, 4, 8, 16, 32]

    def __init__(self) -> None:
        super().__init__()
        widths = [3, *self.Info().channels()]
        self.downs = nn.ModuleList(nn.Conv2d(a, b, 2, stride=2) for a, b in pairwise(widths))
        self.feature_info = self.Info()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for down in self.downs:
            x = torch.relu(down(x))
            maps.append(x)
        return maps


@pytest.mark.parametrize("kind", ["fcn8s", "unet", "unet-classic"])
def test_output_has_input_size(kind: str) -> None:
    model = build(kind, num_classes=5).eval()
    with torch.no_grad():
        for size in [(64, 64), (65, 97), (50, 130)]:
            out = model(torch.randn(1, 3, *size))
            assert set(out) == {"out"}
            assert out["out"].shape == (1, 5, *size), size


@pytest.mark.parametrize("kind", ["fcn8s", "unet", "unet-classic"])
def test_taps_are_named_in_execution_order_and_carry_declared_shapes(kind: str) -> None:
    model = build(kind, num_classes=4).eval()
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, fmap: torch.Tensor) -> torch.Tensor:
        seen[name] = fmap
        return fmap

    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        tapped = run_taps(model.forward_taps(x), record)["out"]
        plain = model(x)["out"]
    assert list(seen) == list(model.tap_info)
    if kind == "fcn8s":
        assert list(seen) == ["head", "score32", "score16", "score8"]
    else:
        # resnet18: skips at strides 16, 8, 4, 2; classic: 8, 4, 2, 1.
        assert list(seen) == ["encoder", *(f"decoder.{i}" for i in range(4))]
    for name, info in model.tap_info.items():
        assert seen[name].shape[1] == info.channels, name
        assert seen[name].shape[-2:] == (64 // info.stride, 96 // info.stride), name
    torch.testing.assert_close(tapped, plain)


def _up2_1d(v: torch.Tensor) -> torch.Tensor:
    """Hand-built 2x bilinear upsampling of the last axis with zeros beyond the border:
    out[2m] = 3/4 v[m] + 1/4 v[m-1], out[2m+1] = 3/4 v[m] + 1/4 v[m+1]."""
    zero = torch.zeros_like(v[..., :1])
    left = torch.cat([zero, v[..., :-1]], -1)
    right = torch.cat([v[..., 1:], zero], -1)
    even, odd = 0.75 * v + 0.25 * left, 0.75 * v + 0.25 * right
    return torch.stack([even, odd], -1).flatten(-2)


def test_fcn_upsamplers_start_as_exact_bilinear_interpolation() -> None:
    model = build("fcn8s", num_classes=3)
    x = torch.randn(1, 3, 3, 4)
    expected = _up2_1d(_up2_1d(x).transpose(-1, -2)).transpose(-1, -2)
    for up in (model.upscore2, model.upscore_pool4):
        assert up.weight.requires_grad and up.bias is None  # learnable, as in the paper
        with torch.no_grad():
            got = up(x)
        assert got.shape == (1, 3, 6, 8)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # Away from the border it is exactly F.interpolate's bilinear (align_corners=False).
    with torch.no_grad():
        got = model.upscore2(x)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], rtol=0, atol=1e-6)

    # The final 8x upsampler is fixed (no parameters) and bilinear.
    assert isinstance(model.upscore8, BilinearUpsample)
    assert n_params(model.upscore8) == 0
    with torch.no_grad():
        got = model.upscore8(x)
    ref = F.interpolate(x, scale_factor=8, mode="bilinear", align_corners=False)
    assert got.shape == (1, 3, 24, 32)
    torch.testing.assert_close(got[..., 4:-4, 4:-4], ref[..., 4:-4, 4:-4], rtol=0, atol=1e-6)


def test_fcn_fuses_scores_of_strides_32_16_and_8() -> None:
    model = build("fcn8s", num_classes=3).eval()
    # Zero-initialised class scorers, as in the paper: the untrained output is exactly 0.
    assert all(
        torch.count_nonzero(s.weight) == 0
        for s in (model.score_fr, model.score_pool4, model.score_pool3)
    )
    # pool4/pool3 scorers read resnet18's stride-16 (256 ch) and stride-8 (128 ch) maps.
    assert (model.score_pool4.in_channels, model.score_pool3.in_channels) == (256, 128)
    assert model.score_fr.in_channels == 16
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.count_nonzero(model(x)["out"]) == 0
        for score in (model.score_fr, model.score_pool4, model.score_pool3):
            nn.init.normal_(score.weight)
            nn.init.normal_(score.bias)
        full = model(x)["out"]
        for name in ("score_fr", "score_pool4", "score_pool3"):
            score = getattr(model, name)
            saved = score.weight.clone(), score.bias.clone()
            score.weight.zero_()
            score.bias.zero_()
            without = model(x)["out"]
            assert (without - full).abs().max() > 1e-3, f"{name} does not reach the output"
            score.weight.copy_(saved[0])
            score.bias.copy_(saved[1])


def test_unet_decoder_concatenates_the_skip_at_every_scale() -> None:
    classic = create_model("unet", num_classes=2)  # base 64
    assert [s.up.in_channels for s in classic.decoder] == [1024, 512, 256, 128]
    assert [s.up.out_channels for s in classic.decoder] == [512, 256, 128, 64]
    assert [s.up.kernel_size for s in classic.decoder] == [(2, 2)] * 4
    assert [s.up.stride for s in classic.decoder] == [(2, 2)] * 4
    # First conv of each stage sees upsampled (512..64) + skip (512..64) channels.
    assert [s.conv[0].in_channels for s in classic.decoder] == [1024, 512, 256, 128]

    model = build("unet", num_classes=2).eval()  # resnet18 skips: 256, 128, 64, 64
    skips = [256, 128, 64, 64]
    widths = [32, 16, 16, 8]
    for stage, skip, width in zip(model.decoder, skips, widths, strict=True):
        assert stage.up.out_channels == width
        assert stage.conv[0].in_channels == width + skip
    seen = []
    hooks = [
        s.conv[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
        for s in model.decoder
    ]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    assert seen == [(1, 288, 4, 4), (1, 144, 8, 8), (1, 80, 16, 16), (1, 72, 32, 32)]


def test_classic_unet_parameter_count_is_exact() -> None:
    """By hand, base 64, 3 -> 2 channels, k = 3x3 conv with bias = 9*i*o + o:
    encoder (3,64),(64,64),(64,128),(128,128),...,(512,1024),(1024,1024): 18,838,464;
    decoder: 2x2 up-convs 4*i*o + o (1024->512, ..., 128->64): 2,786,240; stage convs
    (1024,512),(512,512),...,(128,64),(64,64): 9,406,976; classifier 64*2 + 2 = 130.
    Total 31,031,810 -- the original U-Net's. BN adds 2*o and removes the bias o of each
    of the 18 3x3 convs: + (2 * (64+...+1024) + 2 * (512+...+64)) = + 5,888.
    """
    plain = create_model("unet", backbone="unet", num_classes=2, batch_norm=False)
    assert n_params(plain) == 31_031_810
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert n_params(create_model("unet", num_classes=2)) == 31_037_698


@pytest.mark.parametrize("arch", ["fcn8s", "unet"])
def test_module_encoder_with_feature_info_is_used_as_is(arch: str) -> None:
    encoder = TinyEncoder()
    model = create_model(arch, backbone=encoder, num_classes=3).eval()
    assert model.backbone is encoder
    with torch.no_grad():
        for size in [(64, 64), (65, 97)]:  # 65x97: the encoder's maps round down
            assert model(torch.randn(1, 3, *size))["out"].shape == (1, 3, *size)
    if arch == "fcn8s":
        assert (model.score_pool3.in_channels, model.score_pool4.in_channels) == (16, 20)
        assert model.fc6[0].in_channels == 24
    else:
        assert [s.conv[0].in_channels for s in model.decoder] == [40, 32, 24, 16]
    with pytest.raises(ValueError, match="pretrained applies to timm encoder names only"):
        create_model(arch, backbone=TinyEncoder(), pretrained=True)
    with pytest.raises(TypeError, match="feature_info"):
        create_model(arch, backbone=nn.Conv2d(3, 8, 3))


def test_fit_to_crops_larger_maps_and_resizes_smaller_ones() -> None:
    x = torch.arange(30.0).reshape(1, 1, 5, 6)
    torch.testing.assert_close(fit_to(x, (4, 5)), x[..., :4, :5])
    assert fit_to(x, (7, 6)).shape == (1, 1, 7, 6)


def test_unet_and_fcn_refuse_what_they_cannot_build() -> None:
    with pytest.raises(ValueError, match="classic U-Net encoder has no pretrained weights"):
        UNet(backbone="unet", pretrained=True)
    with pytest.raises(ValueError, match="no feature map at stride 32"):
        FCN8s(backbone=UNet(base_channels=4).backbone)  # classic encoder stops at stride 16
    with pytest.raises(ValueError, match=r"unet has no tap\(s\) \['decoder.9'\]"):
        build("unet-classic", extra_channels={"decoder.9": 2})
    with pytest.raises(ValueError, match=r"fcn8s has no tap\(s\) \['aspp'\]"):
        build("fcn8s", extra_channels={"aspp": 2})
    with pytest.raises(ValueError, match="decoder_channels needs 4 widths"):
        build("unet", decoder_channels=(8, 8))


def _widen(extra: dict[str, int], fill: str):
    def on_tap(name: str, fmap: torch.Tensor) -> torch.Tensor:
        if name not in extra:
            return fmap
        shape = (fmap.shape[0], extra[name], *fmap.shape[-2:])
        partner = torch.randn(shape) if fill == "random" else torch.zeros(shape)
        return torch.cat([fmap, partner], 1)

    return on_tap


def test_fcn_extra_channels_widen_the_consumers_and_start_at_zero() -> None:
    extra = {"head": 5, "score32": 3, "score16": 2, "score8": 4}
    base = build("fcn8s", num_classes=3).eval()
    wide = build("fcn8s", num_classes=3, extra_channels=extra).eval()
    assert wide.score_fr.in_channels == base.score_fr.in_channels + 5
    assert wide.upscore2.in_channels == 3 + 3
    assert wide.upscore_pool4.in_channels == 3 + 2
    assert isinstance(wide.upscore8, nn.ConvTranspose2d)  # learnable once it must mix inputs
    assert wide.upscore8.in_channels == 3 + 4 and wide.upscore8.weight.requires_grad

    # Give both nets the same weights where they have the same layers (random scorers),
    # leave the widened layers' partner inputs as constructed, and feed random partner
    # maps: the output is the plain net's, i.e. every partner input starts at zero.
    with torch.no_grad():
        for score in (base.score_fr, base.score_pool4, base.score_pool3):
            nn.init.normal_(score.weight)
            nn.init.normal_(score.bias)
        base_state = base.state_dict()
        for name, tensor in wide.state_dict().items():
            if name in base_state and base_state[name].shape == tensor.shape:
                tensor.copy_(base_state[name])
        wide.score_fr.weight[:, :16].copy_(base.score_fr.weight)
        x = torch.randn(1, 3, 65, 97)
        want = base(x)["out"]
        got = run_taps(wide.forward_taps(x), _widen(extra, "random"))["out"]
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want)


def test_unet_extra_channels_widen_the_consumers() -> None:
    extra = {"encoder": 5, "decoder.0": 7, "decoder.2": 2, "decoder.3": 3}
    base = build("unet-classic", num_classes=3)
    wide = build("unet-classic", num_classes=3, extra_channels=extra)
    assert wide.decoder[0].up.in_channels == base.decoder[0].up.in_channels + 5
    assert wide.decoder[1].up.in_channels == base.decoder[1].up.in_channels + 7
    assert wide.decoder[2].up.in_channels == base.decoder[2].up.in_channels
    assert wide.decoder[2].conv[0].in_channels == base.decoder[2].conv[0].in_channels
    assert wide.decoder[3].up.in_channels == base.decoder[3].up.in_channels + 2
    assert wide.decoder[3].conv[0].in_channels == base.decoder[3].conv[0].in_channels
    assert wide.classifier.in_channels == base.classifier.in_channels + 3
    with torch.no_grad():
        out = run_taps(wide.eval().forward_taps(torch.randn(1, 3, 65, 97)), _widen(extra, "zero"))
    assert out["out"].shape == (1, 3, 65, 97)
