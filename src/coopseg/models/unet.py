"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015) on the classic or any encoder, as taps.

Decoder, at each scale from the deepest up: a 2x2 stride-2 transposed convolution
(kernel = stride = the stride ratio, 2 on every usual encoder) to the stage's width, the
encoder's skip map at that scale concatenated to it, then two 3x3 conv (+BN) + ReLU; a
1x1 classifier at the end. ``decoder_block="inception"`` replaces the double conv by the
JointSeg paper's residual inception block (``coopseg.models.inception.ResidualInception``;
paper: "we use the improved inception block for UNet"). Stage widths
(``decoder_channels``, deep to shallow) default to the classic rule, each stage as wide as
its skip map (1024 -> 512 -> 256 -> 128 -> 64 on the classic encoder).

Encoders:

- ``backbone="unet"`` (the default): the classic contracting path, a double 3x3 conv
  block at full resolution and then four times a 2x2 max-pool and a double conv that
  doubles the width: ``base_channels`` (64) ... 16 * ``base_channels`` (1024), maps at
  strides 1, 2, 4, 8, 16. No pretrained weights exist for it.
- a timm model name (``features_only``, every returned map used as a skip), or any module
  following the protocol of ``coopseg.models.backbones.resolve_encoder`` (e.g.
  JointSeg's encoder).

Departures from the original, on purpose: convolutions are padded ("same") so the output
has the input's size without the overlap-tile strategy, and the skip maps need no
cropping; ``batch_norm=True`` (default) adds BN after every 3x3 conv (such convs then have
no bias), ``batch_norm=False`` gives the original's plain conv + ReLU; no dropout. With
``base_channels=64``, 3 input and 2 output channels the parameter count is 31,031,810
without BN (the original's) and 31,037,698 with it. Input sizes need not be divisible by
anything: an upsampled map larger than its skip (timm encoders round sizes up) is cropped
at the bottom/right, a smaller one (encoders that round down) resized bilinearly. When the
shallowest skip has stride > 1 (timm encoders: 2), the logits are bilinearly upsampled to
the input size.

Taps, in execution order: ``encoder`` (the deepest encoder map) -> ``decoder.0`` ...
``decoder.N-1`` (each decoder stage's output, deep to shallow; N = number of skip maps).
``extra_channels={tap: n}`` widens the layer consuming the tap: the next stage's
transposed convolution, or the classifier for ``decoder.N-1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import PretrainedArg, resolve_encoder
from .deeplabv3plus import init_head
from .fcn import fit_to
from .inception import ResidualInception
from .taps import TapInfo, TappedNetwork, TapStream, check_extra_channels


def double_conv(in_ch: int, out_ch: int, batch_norm: bool = True) -> nn.Sequential:
    """Two 3x3 convs ("same" padding), each followed by (BN and) ReLU."""
    layers: list[nn.Module] = []
    for c_in in (in_ch, out_ch):
        layers.append(nn.Conv2d(c_in, out_ch, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class EncoderFeatureInfo:
    """The timm-style ``feature_info`` of a hand-written encoder."""

    def __init__(self, channels: Sequence[int], reductions: Sequence[int]) -> None:
        self._channels, self._reductions = list(channels), list(reductions)

    def channels(self) -> list[int]:
        return list(self._channels)

    def reduction(self) -> list[int]:
        return list(self._reductions)


class UNetEncoder(nn.Module):
    """The classic U-Net contracting path; returns the map of every scale, shallow to deep.

    Max-pooling rounds sizes up (``ceil_mode``) so odd sizes lose no border pixels.
    """

    def __init__(
        self, in_chans: int = 3, base_channels: int = 64, depth: int = 4, batch_norm: bool = True
    ) -> None:
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        stages: list[nn.Module] = [double_conv(in_chans, widths[0], batch_norm)]
        for c_in, c_out in pairwise(widths):
            stages.append(
                nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), double_conv(c_in, c_out, batch_norm))
            )
        self.stages = nn.ModuleList(stages)
        self.feature_info = EncoderFeatureInfo(widths, [2**i for i in range(depth + 1)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


DECODER_BLOCKS = ("double_conv", "inception")


class UpStage(nn.Module):
    """Upsample (transposed conv, kernel = stride), concatenate the skip, then a double conv
    or (``block="inception"``) a residual inception block."""

    def __init__(
        self,
        in_ch: int,
        skip_ch: int,
        out_ch: int,
        factor: int,
        batch_norm: bool,
        block: str = "double_conv",
    ) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, factor, stride=factor)
        if block == "inception":
            self.conv: nn.Module = ResidualInception(out_ch + skip_ch, out_ch)
        elif block == "double_conv":
            self.conv = double_conv(out_ch + skip_ch, out_ch, batch_norm)
        else:
            raise ValueError(f"decoder_block must be one of {list(DECODER_BLOCKS)}, got {block!r}")

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = fit_to(self.up(x), skip.shape[-2:])
        return self.conv(torch.cat([skip, up], 1))


class UNet(TappedNetwork):
    """U-Net; ``extra_channels`` widens the layers that consume the named taps."""

    def __init__(
        self,
        backbone: str | nn.Module = "unet",
        num_classes: int = 21,
        pretrained: PretrainedArg = False,
        base_channels: int = 64,
        decoder_channels: Sequence[int] | None = None,
        batch_norm: bool = True,
        extra_channels: Mapping[str, int] | None = None,
        decoder_block: str = "double_conv",
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        classic = isinstance(backbone, str) and backbone == "unet"
        if classic:
            if pretrained:
                raise ValueError("the classic U-Net encoder has no pretrained weights")
            self.backbone: nn.Module = UNetEncoder(in_chans, base_channels, batch_norm=batch_norm)
        else:
            self.backbone = resolve_encoder(backbone, pretrained=pretrained, in_chans=in_chans)
        channels = list(self.backbone.feature_info.channels())
        strides = list(self.backbone.feature_info.reduction())
        if len(channels) < 2:
            raise ValueError(f"U-Net needs an encoder with at least 2 feature maps, got {strides}")
        ratios = [deep / shallow for shallow, deep in pairwise(strides)]
        if any(r != int(r) or r < 2 for r in ratios):
            raise ValueError(
                f"U-Net needs encoder strides that grow by integer factors >= 2, got {strides}"
            )
        skips = list(range(len(channels) - 2, -1, -1))  # feature indices, deep to shallow
        widths = (
            list(decoder_channels) if decoder_channels is not None else [channels[i] for i in skips]
        )
        if len(widths) != len(skips):
            raise ValueError(
                f"decoder_channels needs {len(skips)} widths (one per skip map), got {widths}"
            )
        self.tap_info = {"encoder": TapInfo(channels[-1], strides[-1])}
        for n, (i, width) in enumerate(zip(skips, widths, strict=True)):
            self.tap_info[f"decoder.{n}"] = TapInfo(width, strides[i])
        extra = check_extra_channels(extra_channels, self.tap_info, "unet")
        self.extra_channels = extra

        stages = []
        in_ch = channels[-1] + extra.get("encoder", 0)
        for n, (i, width) in enumerate(zip(skips, widths, strict=True)):
            factor = strides[i + 1] // strides[i]
            stages.append(UpStage(in_ch, channels[i], width, factor, batch_norm, decoder_block))
            in_ch = width + extra.get(f"decoder.{n}", 0)
        self.decoder = nn.ModuleList(stages)
        self.classifier = nn.Conv2d(in_ch, num_classes, 1)
        self.skip_indices = skips

        init_head([*([self.backbone] if classic else []), self.decoder, self.classifier])

    def forward_taps(self, x: torch.Tensor) -> TapStream:
        size = x.shape[-2:]
        features = list(self.backbone(x))
        y = yield "encoder", features[-1]
        for n, (stage, i) in enumerate(zip(self.decoder, self.skip_indices, strict=True)):
            y = yield f"decoder.{n}", stage(y, features[i])
        logits = self.classifier(y)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return {"out": logits}
