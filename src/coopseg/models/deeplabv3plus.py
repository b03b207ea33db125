"""DeepLabv3+ (Chen et al., ECCV 2018) on any timm backbone, written as named taps.

ASPP = 1x1 conv + three 3x3 atrous convs + image pooling, 256 channels each with
BN+ReLU, concatenated and projected to 256 (dropout 0.1, the official keep-prob 0.9);
atrous rates (6, 12, 18) at output stride 16, scaled by 16/OS, or ``aspp_rates``: the
reference rates are sized for a 33x33 map (513 px at OS 16); on a small map they put
every off-centre tap in the zero padding (at 2x2 each atrous branch is a 1x1 conv), so a
miniature gives rates scaled to its map. Decoder: the stride-4
backbone map projected to 48 channels, concatenated with the upsampled ASPP output,
two 3x3 convs of 256, then a 1x1 classifier.

``separable`` selects the form of the 3x3 convs (the three atrous ASPP branches and the
two decoder convs). ``True`` is the DeepLabv3+ paper's own model and what the
feature-sharing paper describes ("applies the depthwise separable convolution to both
... ASPP ... and decoder modules"); it follows the authors' TensorFlow release
(``tensorflow/models`` research/deeplab, ``split_separable_conv2d`` with
``aspp_with_separable_conv`` and ``decoder_use_separable_conv``): a depthwise 3x3 conv
carrying the dilation -> BN -> ReLU -> pointwise 1x1 conv -> BN -> ReLU. ``False``
(the constructor default, so existing configs and checkpoints keep their meaning) is
a plain 3x3 conv + BN + ReLU, as in the popular PyTorch re-implementations. The 1x1
branch, image pooling, projections and classifier are 1x1 convs either way.

Taps, in execution order (what a cooperative link can send or receive):
``backbone`` (stride OS) -> ``aspp.b0`` ... ``aspp.b4`` (the five branches, b4 is image
pooling) -> ``aspp`` (projected output) -> ``decoder.low`` (48-channel low-level map)
-> ``decoder.conv1`` -> ``decoder.conv2``. A layer widened by ``extra_channels`` takes
the extra channels at its first conv: with ``separable`` that is the depthwise conv
(one more depthwise filter per received channel), whose pointwise conv then mixes the
network's own and the received channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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


def separable_conv_bn_relu(
    in_ch: int, out_ch: int, kernel: int = 3, dilation: int = 1
) -> nn.Sequential:
    """Depthwise kxk (dilated) + BN + ReLU, then pointwise 1x1 + BN + ReLU: the DeepLabv3+
    reference's ``split_separable_conv2d`` (BN and ReLU after *both* convs, unlike a
    plain separable conv). Index 0 is the depthwise conv, as index 0 of
    :func:`conv_bn_relu` is its conv, so code reading ``[0].in_channels`` sees both."""
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(
            in_ch, in_ch, kernel, padding=padding, dilation=dilation, groups=in_ch, bias=False
        ),
        nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_ch, out_ch, 1, bias=False),
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


def atrous_rates(output_stride: int, rates: Sequence[int] | None = None) -> tuple[int, int, int]:
    """Atrous rates: ``rates`` if given (three positive integers), else (6, 12, 18) at
    output stride 16, doubled at 8, halved at 32."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    if rates is not None:
        given = list(rates)
        if len(given) != 3 or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in given
        ):
            raise ValueError(f"model.aspp_rates: expected three positive integers, got {rates!r}")
        return tuple(given)  # type: ignore[return-value]
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
        separable: bool = False,
    ) -> None:
        super().__init__()
        atrous = separable_conv_bn_relu if separable else conv_bn_relu
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_ch, out_ch)]
            + [atrous(in_ch, out_ch, 3, r) for r in rates]
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
        separable: bool = False,
    ) -> None:
        super().__init__()
        conv3x3 = separable_conv_bn_relu if separable else conv_bn_relu
        self.reduce = conv_bn_relu(low_ch, low_proj)
        self.conv1 = conv3x3(aspp_ch + low_proj + conv1_extra, channels, 3)
        self.conv2 = conv3x3(channels + conv2_extra, channels, 3)


class DeepLabV3Plus(TappedNetwork):
    """DeepLabv3+; ``separable`` picks depthwise separable 3x3 convs in ASPP and decoder
    (the papers' model), ``extra_channels`` widens the layers that consume the taps."""

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
        separable: bool = False,
        aspp_rates: Sequence[int] | None = None,
        extra_channels: Mapping[str, int] | None = None,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.separable = separable
        self.aspp_rates = atrous_rates(output_stride, aspp_rates)
        self.in_chans = in_chans
        self.backbone = create_backbone(
            backbone, output_stride=output_stride, pretrained=pretrained, in_chans=in_chans
        )
        self.low_index = feature_index(self.backbone, 4)
        channels = self.backbone.feature_info.channels()
        low_ch, high_ch = channels[self.low_index], channels[-1]
        self.output_stride = output_stride
        # The shallower backbone stages are send-only taps (the multiple-layer link's
        # "shallow to deep" senders); the backbone and ASPP outputs are the cross
        # paper's Connection 1 and 2; every ASPP and decoder layer is linked by the
        # same-layer presets ("all layers in decoders and ASPP module").
        reductions = self.backbone.feature_info.reduction()
        self.tap_info = {
            f"backbone.{i}": TapInfo(channels[i], reductions[i], role="send", receives=False)
            for i in range(len(channels) - 1)
        }
        self.tap_info["backbone"] = TapInfo(high_ch, output_stride, role="connection1")
        for i in range(5):
            self.tap_info[f"aspp.b{i}"] = TapInfo(aspp_channels, output_stride)
        self.tap_info["aspp"] = TapInfo(aspp_channels, output_stride, role="connection2")
        self.tap_info["decoder.low"] = TapInfo(low_level_channels, 4)
        self.tap_info["decoder.conv1"] = TapInfo(decoder_channels, 4)
        self.tap_info["decoder.conv2"] = TapInfo(decoder_channels, 4)
        extra = check_extra_channels(extra_channels, self.tap_info, "deeplabv3plus")
        self.extra_channels = extra

        self.aspp = ASPP(
            high_ch + extra.get("backbone", 0),
            self.aspp_rates,
            aspp_channels,
            tuple(extra.get(f"aspp.b{i}", 0) for i in range(5)),
            dropout,
            separable,
        )
        self.decoder = Decoder(
            low_ch,
            aspp_channels,
            low_level_channels,
            decoder_channels,
            conv1_extra=extra.get("aspp", 0) + extra.get("decoder.low", 0),
            conv2_extra=extra.get("decoder.conv1", 0),
            separable=separable,
        )
        self.classifier = nn.Conv2d(
            decoder_channels + extra.get("decoder.conv2", 0), num_classes, 1
        )
        init_head([self.aspp, self.decoder, self.classifier])

    def forward_taps(self, x: torch.Tensor) -> TapStream:
        size = x.shape[-2:]
        features = self.backbone(x)
        low, high = features[self.low_index], features[-1]
        for i, stage in enumerate(features[:-1]):
            yield f"backbone.{i}", stage  # read only: the stages are already computed
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
    the backbone keeps timm's init (or its pretrained weights).

    A grouped (depthwise) conv's fan-out is ``out/groups * k*k``; torch's Kaiming helper
    would count ``out * k*k`` and start a 2048-channel depthwise conv ~45x too small."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d) and m.groups > 1:
                fan_out = m.out_channels // m.groups * math.prod(m.kernel_size)
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
