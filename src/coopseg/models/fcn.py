"""FCN-8s (Long, Shelhamer & Darrell, CVPR 2015) on any encoder, written as named taps.

Layer names follow the original Caffe net; ``pool3``/``pool4``/``pool5`` stand for the
encoder's deepest stride-8/16/32 maps. (timm's ``vgg16`` taps each stage before its
pooling, so there they are conv4_3, conv5_3 and pool5: the original's resolutions, with
512 rather than 256 channels at stride 8.)

- ``fc6``/``fc7`` (the head): the original recasts VGG16's classifier as convolutions,
  a 7x7 conv to 4096 then a 1x1 conv to 4096, each followed by ReLU and dropout 0.5.
  Here the width is ``head_channels`` (default **1024**) and fc6's kernel is
  ``head_kernel`` (default **3**, "same" padding). Why: the 4096-wide 7x7 fc6 exists so
  VGG16's ImageNet fully connected weights can be reused; on any other encoder it would
  be a randomly initialised layer of 7*7*C*4096 weights (411 M on ResNet-50's 2048
  channels). 1024 with a 3x3 fc6 is about 20 M head weights on ResNet-50, comparable to
  DeepLabv3+'s ASPP and decoder, so the baselines compare at a similar size.
  ``backbone="vgg16", head_channels=4096, head_kernel=7`` is the original layout (with
  fc6/fc7 randomly initialised): 134.38 M parameters at 21 classes.
- ``score_fr``, ``score_pool4``, ``score_pool3``: 1x1 class scorers on fc7, pool4 and
  pool3, zero-initialised as in the paper (``zero_init_scores=False``: Kaiming instead).
  The "at-once" variant's fixed scaling of pool4/pool3 (0.01/0.0001) is not applied.
- ``upscore2``, ``upscore_pool4``: learnable 2x transposed convolutions (kernel 4,
  stride 2, no bias) initialised to bilinear interpolation. Score fusion:
  ``score16 = up2(score32) + score_pool4(pool4)``, ``score8 = up2(score16) +
  score_pool3(pool3)``.
- ``upscore8``: the final 8x upsampling, fixed to bilinear interpolation as in the paper
  (a 16x16 stride-8 transposed convolution per class, held as a constant buffer).

Geometry. The original pads conv1 by 100 pixels and trims the excess with crop offsets
(5, 9 and 31). timm encoders pad "same", so pixel (0, 0) of every map sits at the image's
top-left: the transposed convolutions are padded by f/2, giving exactly f times the size
(aligned like ``F.interpolate(..., align_corners=False)``), and every crop offset is 0.
When the input size is not divisible by 32 the upsampled map is larger than its target
and is cropped at the bottom/right; encoders that round sizes down (max-pooling VGG) can
leave it smaller, and then it is resized bilinearly instead (``fit_to``).

Encoders: a timm model name, or any module following the protocol of
``coopseg.models.backbones.resolve_encoder`` with maps at strides 8, 16 and 32.
``strides`` (default ``(8, 16, 32)``) names the three maps fused, each twice the last;
``(4, 8, 16)`` (ours, the JointSeg bench's 64-px scenes) is the same net one level
shallower, so that its deepest map stays 4x4 rather than 2x2, with a final 4x upsampling.

Taps, in execution order: ``head`` (fc7 output, stride 32) -> ``score32`` (score_fr
output) -> ``score16`` (fused stride-16 scores) -> ``score8`` (fused stride-8 scores).
``extra_channels={tap: n}`` widens the layer consuming the tap: ``score_fr``,
``upscore2``, ``upscore_pool4`` and ``upscore8`` respectively. The upsamplers' new input
channels start at zero, so a widened model computes what the plain one does until it is
trained; widening ``score8`` makes ``upscore8`` a learnable transposed convolution (still
bilinear-initialised), since a fixed interpolation cannot mix channels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import PretrainedArg, feature_index, resolve_encoder
from .taps import TapInfo, TappedNetwork, TapStream, check_extra_channels


def bilinear_kernel(factor: int) -> torch.Tensor:
    """The ``2f x 2f`` kernel with which a stride-``f`` transposed conv upsamples bilinearly."""
    size = 2 * factor
    center = factor - 0.5
    taps = 1 - (torch.arange(size, dtype=torch.float32) - center).abs() / factor
    return taps[:, None] * taps[None, :]


def bilinear_upsampler(in_ch: int, out_ch: int, factor: int) -> nn.ConvTranspose2d:
    """A learnable ``factor``x transposed conv (kernel 2f, stride f, padding f/2, no bias)
    initialised to per-channel bilinear interpolation of the first ``out_ch`` inputs; any
    further inputs (widening) start at zero."""
    if factor < 2 or factor % 2:
        raise ValueError(f"upsampling factor must be even, got {factor}")
    if in_ch < out_ch:
        raise ValueError(f"need at least {out_ch} input channels, got {in_ch}")
    up = nn.ConvTranspose2d(
        in_ch, out_ch, 2 * factor, stride=factor, padding=factor // 2, bias=False
    )
    kernel = bilinear_kernel(factor)
    with torch.no_grad():
        up.weight.zero_()  # shape (in, out, k, k)
        for c in range(out_ch):
            up.weight[c, c] = kernel
    return up


class BilinearUpsample(nn.Module):
    """Fixed ``factor``x bilinear upsampling as a per-channel transposed conv (no parameters)."""

    def __init__(self, channels: int, factor: int) -> None:
        super().__init__()
        if factor < 2 or factor % 2:
            raise ValueError(f"upsampling factor must be even, got {factor}")
        self.channels, self.factor = channels, factor
        weight = bilinear_kernel(factor).expand(channels, 1, 2 * factor, 2 * factor).clone()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(
            x,
            self.weight.to(x.dtype),
            stride=self.factor,
            padding=self.factor // 2,
            groups=self.channels,
        )


def fit_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bring ``x`` to spatial ``size``: crop at the bottom/right when it is at least that
    large (top-left-aligned maps, crop offset 0), otherwise resize bilinearly."""
    h, w = int(size[0]), int(size[1])
    if x.shape[-2] >= h and x.shape[-1] >= w:
        return x[..., :h, :w]
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def _fc(in_ch: int, out_ch: int, kernel: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
    )


class FCN8s(TappedNetwork):
    """FCN-8s; ``extra_channels`` widens the layers that consume the named taps."""

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        num_classes: int = 21,
        pretrained: PretrainedArg = False,
        head_channels: int = 1024,
        head_kernel: int = 3,
        dropout: float = 0.5,
        zero_init_scores: bool = True,
        extra_channels: Mapping[str, int] | None = None,
        strides: Sequence[int] = (8, 16, 32),
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if head_kernel < 1 or head_kernel % 2 == 0:
            raise ValueError(f"head_kernel must be odd ('same' padding), got {head_kernel}")
        s3, s4, s5 = (int(v) for v in strides) if len(strides) == 3 else (0, 0, 0)
        if s3 < 1 or s4 != 2 * s3 or s5 != 2 * s4:
            raise ValueError(f"strides: expected three strides, each twice the last, got {strides}")
        self.in_chans = in_chans
        self.backbone = resolve_encoder(backbone, pretrained=pretrained, in_chans=in_chans)
        self.pool3_index = feature_index(self.backbone, s3)
        self.pool4_index = feature_index(self.backbone, s4)
        self.pool5_index = feature_index(self.backbone, s5)
        channels = self.backbone.feature_info.channels()
        self.num_classes = num_classes
        self.tap_info = {
            "head": TapInfo(head_channels, s5),
            "score32": TapInfo(num_classes, s5),
            "score16": TapInfo(num_classes, s4),
            "score8": TapInfo(num_classes, s3),
        }
        extra = check_extra_channels(extra_channels, self.tap_info, "fcn8s")
        self.extra_channels = extra

        self.fc6 = _fc(channels[self.pool5_index], head_channels, head_kernel, dropout)
        self.fc7 = _fc(head_channels, head_channels, 1, dropout)
        self.score_fr = nn.Conv2d(head_channels + extra.get("head", 0), num_classes, 1)
        self.score_pool4 = nn.Conv2d(channels[self.pool4_index], num_classes, 1)
        self.score_pool3 = nn.Conv2d(channels[self.pool3_index], num_classes, 1)
        self.upscore2 = bilinear_upsampler(num_classes + extra.get("score32", 0), num_classes, 2)
        self.upscore_pool4 = bilinear_upsampler(
            num_classes + extra.get("score16", 0), num_classes, 2
        )
        self.upscore8: nn.Module
        if extra.get("score8", 0):
            self.upscore8 = bilinear_upsampler(num_classes + extra["score8"], num_classes, s3)
        else:
            self.upscore8 = BilinearUpsample(num_classes, s3)

        for m in (*self.fc6.modules(), *self.fc7.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for score in (self.score_fr, self.score_pool4, self.score_pool3):
            if zero_init_scores:
                nn.init.zeros_(score.weight)
            else:
                nn.init.kaiming_normal_(score.weight, mode="fan_in", nonlinearity="linear")
            nn.init.zeros_(score.bias)

    def forward_taps(self, x: torch.Tensor) -> TapStream:
        size = x.shape[-2:]
        features = self.backbone(x)
        pool3 = features[self.pool3_index]
        pool4 = features[self.pool4_index]
        pool5 = features[self.pool5_index]
        head = yield "head", self.fc7(self.fc6(pool5))
        score = yield "score32", self.score_fr(head)
        up = fit_to(self.upscore2(score), pool4.shape[-2:])
        score = yield "score16", up + self.score_pool4(pool4)
        up = fit_to(self.upscore_pool4(score), pool3.shape[-2:])
        score = yield "score8", up + self.score_pool3(pool3)
        return {"out": fit_to(self.upscore8(score), size)}
