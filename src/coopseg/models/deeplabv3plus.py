"""DeepLabv3+ (Chen et al., ECCV 2018) on any timm backbone, written as named taps.

Structure follows the official release with plain (non-separable) convolutions:
ASPP = 1x1 conv + three 3x3 atrous convs + image pooling, 256 channels each with
BN+ReLU, concatenated and projected to 256 (dropout 0.1, the official keep-prob 0.9);
atrous rates (6, 12, 18) at output stride 16, scaled by 16/OS. Decoder: the stride-4
backbone map projected to 48 channels, concatenated with the upsampled ASPP output,
two 3x3 convs of 256, then a 1x1 classifier.

Taps, in execution order (what a cooperative link can send or receive):
``backbone`` (stride OS) -> ``aspp.b0`` ... ``aspp.b4`` (the five branches, b4 is image
pooling) -> ``aspp`` (projected output) -> ``decoder.low`` (48-channel low-level map)
-> ``decoder.conv1`` -> ``decoder.conv2``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import PretrainedArg, create_backbone, feature_index
from .taps import TapInfo, TappedNetwork, TapStream, check_extra_channels


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global context broadcast back to the map's size."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.adaptive_avg_pool2d(x, 1))
        return y.expand(-1, -1, x.shape[-2], x.shape[-1])


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """Atrous rates: (6, 12, 18) at output stride 16, doubled at 8, halved at 32."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    scale = 16 / output_stride
    return tuple(int(r * scale) for r in (6, 12, 18))  # type: ignore[return-value]


class ASPP(nn.Module):
    def __init__(
        self,
        in_ch: int,
        rates: tuple[int, int, int],
        out_ch: int = 256,
        branch_extra: tuple[int, ...] = (0,) * 5,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_ch, out_ch)]
            + [conv_bn_relu(in_ch, out_ch, 3, r) for r in rates]
            + [ImagePooling(in_ch, out_ch)]
        )
        self.project = nn.Sequential(
            conv_bn_relu(5 * out_ch + sum(branch_extra), out_ch), nn.Dropout(dropout)
        )


class Decoder(nn.Module):
    def __init__(
        self,
        low_ch: int,
        aspp_ch: int,
        low_proj: int = 48,
        channels: int = 256,
        conv1_extra: int = 0,
        conv2_extra: int = 0,
    ) -> None:
        super().__init__()
        self.reduce = conv_bn_relu(low_ch, low_proj)
        self.conv1 = conv_bn_relu(aspp_ch + low_proj + conv1_extra, channels, 3)
        self.conv2 = conv_bn_relu(channels + conv2_extra, channels, 3)


class DeepLabV3Plus(TappedNetwork):
    """DeepLabv3+; ``extra_channels`` widens the layers that consume the named taps."""

    def __init__(
        self,
        backbone: str = "resnet101",
        num_classes: int = 21,
        output_stride: int = 16,
        pretrained: PretrainedArg = False,
        aspp_channels: int = 256,
        decoder_channels: int = 256,
        low_level_channels: int = 48,
        dropout: float = 0.1,
        extra_channels: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(
            backbone, output_stride=output_stride, pretrained=pretrained
        )
        self.low_index = feature_index(self.backbone, 4)
        channels = self.backbone.feature_info.channels()
        low_ch, high_ch = channels[self.low_index], channels[-1]
        self.output_stride = output_stride
        self.tap_info = {"backbone": TapInfo(high_ch, output_stride)}
        for i in range(5):
            self.tap_info[f"aspp.b{i}"] = TapInfo(aspp_channels, output_stride)
        self.tap_info["aspp"] = TapInfo(aspp_channels, output_stride)
        self.tap_info["decoder.low"] = TapInfo(low_level_channels, 4)
        self.tap_info["decoder.conv1"] = TapInfo(decoder_channels, 4)
        self.tap_info["decoder.conv2"] = TapInfo(decoder_channels, 4)
        extra = check_extra_channels(extra_channels, self.tap_info, "deeplabv3plus")
        self.extra_channels = extra

        self.aspp = ASPP(
            high_ch + extra.get("backbone", 0),
            aspp_rates(output_stride),
            aspp_channels,
            tuple(extra.get(f"aspp.b{i}", 0) for i in range(5)),
            dropout,
        )
        self.decoder = Decoder(
            low_ch,
            aspp_channels,
            low_level_channels,
            decoder_channels,
            conv1_extra=extra.get("aspp", 0) + extra.get("decoder.low", 0),
            conv2_extra=extra.get("decoder.conv1", 0),
        )
        self.classifier = nn.Conv2d(
            decoder_channels + extra.get("decoder.conv2", 0), num_classes, 1
        )
        init_head([self.aspp, self.decoder, self.classifier])

    def forward_taps(self, x: torch.Tensor) -> TapStream:
        size = x.shape[-2:]
        features = self.backbone(x)
        low, high = features[self.low_index], features[-1]
        high = yield "backbone", high
        branches = []
        for i, branch in enumerate(self.aspp.branches):
            branches.append((yield f"aspp.b{i}", branch(high)))
        context = yield "aspp", self.aspp.project(torch.cat(branches, 1))
        low = yield "decoder.low", self.decoder.reduce(low)
        context = F.interpolate(context, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = yield "decoder.conv1", self.decoder.conv1(torch.cat([context, low], 1))
        y = yield "decoder.conv2", self.decoder.conv2(y)
        logits = F.interpolate(self.classifier(y), size=size, mode="bilinear", align_corners=False)
        return {"out": logits}


def init_head(modules: list[nn.Module]) -> None:
    """He init for the (transposed) convs of layers trained from scratch, BN to identity;
    the backbone keeps timm's init (or its pretrained weights)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
