"""DF-DAM (Xiong et al., "Differentiating Features for Scene Segmentation Based on
Dedicated Attention Mechanisms"), written as named taps.

Structure. A non-dilated ResNet (timm ``features_only``, output stride 32). Its
lowest stage (layer1, stride 4) is the *spatial* information X^SI, its two highest
stages (layer3, stride 16; layer4, stride 32) the *context* information; each is
projected to ``channels`` (128) by a 1x1 conv + BN + ReLU.

- **DAFM** (dual attention fusion). Two identical branches read the projected layer4
  map: global average pool -> 1x1 conv ``channels -> channels`` (with bias; a fully
  connected layer on the pooled vector, no bottleneck) -> sigmoid, giving the channel
  weights alpha^H and alpha^L. The layer4 map is upsampled (bilinear) to layer3's size
  and ``out = alpha^H * High + alpha^L * Low``.
- **2DPAM** (2-D position attention). ``concat(X^SI, DAFM out resized to stride 4)``
  -> 3x3 conv ``2*channels -> attention_channels`` (32) + BN + ReLU -> 1x1 conv to one
  channel -> sigmoid = the confidence map beta; ``out = beta * X^SI``.
- **Sum fusion**: 2DPAM out + DAFM out (resized to stride 4), then the refine block
  (3x3 conv ``channels -> channels`` + BN + ReLU), a 1x1 classifier, and a bilinear
  upsample to the input size.
- **Auxiliary heads** (training mode only, deep supervision as in HED, the paper's
  [26]): a 1x1 classifier on the fused context (``"aux_context"``, the DAFM output) and
  one on the spatial path (``"aux_spatial"``), both upsampled to the input size. The
  paper's loss is ``L_p + 0.4 L_c + 0.1 L_s``, hence ``default_aux_weights``.
  Which spatial map the paper supervises is ambiguous, so ``aux_spatial_on`` offers
  both readings. ``"raw"`` (default) is the literal one: y_s is "the output from spatial
  information", and the paper defines the spatial information as X^SI itself ("X^SI is
  the spatial information (low-level features)", Eq. 9), calling beta*X^SI the
  "filtered"/"weighted spatial information". ``"weighted"`` supervises beta*X^SI, the
  2DPAM output (the conclusion's "the optimized features are used as the source of
  ... spatial information"); without 2DPAM (``fusion`` ``"sum"``/``"dafm"``) beta is 1 and
  both readings are the same map.

Ablations (the paper's Tables 1-2, ``fusion=``): ``"sum"`` is the baseline, where a
plain summation replaces *both* modules (context = Low + up(High); fused =
X^SI + up(context)); ``"dafm"`` keeps DAFM and replaces 2DPAM by the plain sum (beta
fixed at 1); ``"dafm+2dpam"`` (default) is the full model. The modules that are
replaced are not built, so the parameter differences are exactly the modules' sizes.

Choices where the paper is silent, and why. The paper does not describe the weight
branches, the confidence network or the refine block; these were chosen so that the
published sizes (Table 4/6, input 3x320x640, 19 classes, "GFLOPs" = multiply-
accumulates) come out for *both* backbones, counted as ``coopseg profile`` counts
(``engine/profile.py``: eval-mode forward, convs/linear/matmul only):

============  ==================  ==================  ===================
backbone      params (published)  GMACs (published)   timm backbone alone
============  ==================  ==================  ===================
ResNet-18     11.546 M (11.57)    10.41 (10.31)       11.18 M, 7.40 G
ResNet-101    43.189 M (43.24)    35.27 (35.52)       42.50 M, 31.83 G
============  ==================  ==================  ===================

i.e. params -0.2 % / -0.1 % and MACs +1.0 % / -0.7 %. The published numbers leave
about 0.39 M parameters and 2.9 GMACs to the R18 head; nearly all of those MACs must
be spent at stride 4 (80x160 positions), which is what fixes the budget of the 3x3
convs in 2DPAM and the refine block. A wider 2DPAM (3x3 to 64 channels) would overshoot
the R18 MACs by ~10 %; dropping the 3x3 refine conv would undershoot by ~17 %. The
two auxiliary heads are included in the parameter count (they exist as modules, the
paper counts its training network); being 1x1 convs they add 2x2.5 k parameters and,
since they only run in training mode, no MACs. The DAFM weight branches act on pooled
vectors and so cost no MACs either (2x16.5 k parameters).

Taps, in execution order (what a cooperative link can send or receive), and the layer
that consumes each (``extra_channels={tap: n}`` widens that layer by n input channels):

- ``spatial``: X^SI (``channels``, stride 4)
- ``context.low``: projected layer3 (``channels``, stride 16)
- ``context.high``: projected layer4 (``channels``, stride 32)
- ``context``: the fused context (DAFM output, or Low + up(High) for ``"sum"``; stride 16)
- ``spatial.selected``: beta * X^SI, the 2DPAM output (stride 4; only with 2DPAM)
- ``fusion``: the summed map before the refine block (stride 4)
- ``refine``: the refine block's output (stride 4)

The first five feed element-wise products/sums, so a widened one gets its own 1x1 conv
+ BN + ReLU back to ``channels`` (``model.merge[name]``, with ``.`` written ``_``) right
after the tap; ``fusion`` is consumed by the refine conv and ``refine`` by the
classifier, which are widened directly. With no extra channels the structure is the
one described above.

``model.record_attention = True`` makes each forward store detached copies of the
attention in ``model.attention``: ``alpha_high`` and ``alpha_low`` ([B, channels],
with DAFM) and ``beta`` ([B, 1, H/4, W/4], with 2DPAM).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import PretrainedArg, create_backbone, feature_index
from .deeplabv3plus import conv_bn_relu, init_head
from .taps import TapInfo, TappedNetwork, TapStream, check_extra_channels

FUSIONS = ("sum", "dafm", "dafm+2dpam")
AUX_SPATIAL_ON = ("raw", "weighted")


def _resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ChannelWeights(nn.Sequential):
    """One DAFM branch: global average pool -> 1x1 conv (FC) -> sigmoid, [B, C, 1, 1]."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_ch, out_ch, 1), nn.Sigmoid())


class DAFM(nn.Module):
    """Dual attention fusion: channel weights for both maps, learned from the higher one."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight_high = ChannelWeights(channels, channels)
        self.weight_low = ChannelWeights(channels, channels)

    def forward(
        self, low: torch.Tensor, high: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(alpha_high * up(high) + alpha_low * low, alpha_high, alpha_low)``."""
        alpha_high = self.weight_high(high)
        alpha_low = self.weight_low(high)
        fused = alpha_high * _resize(high, low.shape[-2:]) + alpha_low * low
        return fused, alpha_high, alpha_low


class PositionAttention(nn.Module):
    """2DPAM: a one-channel confidence map from (spatial, context) that filters spatial."""

    def __init__(self, channels: int, context_channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.confidence = nn.Sequential(
            conv_bn_relu(channels + context_channels, hidden, 3),
            nn.Conv2d(hidden, 1, 1),
            nn.Sigmoid(),
        )

    def forward(
        self, spatial: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(beta * spatial, beta)``; ``context`` must already have spatial's size."""
        beta = self.confidence(torch.cat([spatial, context], 1))
        return beta * spatial, beta


class DFDAM(TappedNetwork):
    """DF-DAM; ``fusion`` selects the ablation, ``aux_spatial_on`` the map the spatial
    auxiliary head reads (``"raw"`` X^SI or ``"weighted"`` beta*X^SI), ``extra_channels``
    widens tap consumers."""

    default_aux_weights: ClassVar[dict[str, float]] = {"aux_context": 0.4, "aux_spatial": 0.1}

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 21,
        pretrained: PretrainedArg = False,
        fusion: str = "dafm+2dpam",
        channels: int = 128,
        attention_channels: int = 32,
        aux_spatial_on: str = "raw",
        extra_channels: Mapping[str, int] | None = None,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        if fusion not in FUSIONS:
            raise ValueError(f"dfdam: fusion must be one of {list(FUSIONS)}, got {fusion!r}")
        if aux_spatial_on not in AUX_SPATIAL_ON:
            raise ValueError(
                f"dfdam: aux_spatial_on must be one of {list(AUX_SPATIAL_ON)}, "
                f"got {aux_spatial_on!r}"
            )
        self.fusion = fusion
        self.aux_spatial_on = aux_spatial_on
        self.use_dafm = fusion != "sum"
        self.use_2dpam = fusion == "dafm+2dpam"
        self.record_attention = False
        self.attention: dict[str, torch.Tensor] = {}

        self.backbone = create_backbone(backbone, pretrained=pretrained, in_chans=in_chans)
        self.spatial_index = feature_index(self.backbone, 4)
        self.low_index = feature_index(self.backbone, 16)
        self.high_index = feature_index(self.backbone, 32)
        ch = self.backbone.feature_info.channels()

        self.tap_info = {
            "spatial": TapInfo(channels, 4),
            "context.low": TapInfo(channels, 16),
            "context.high": TapInfo(channels, 32),
            "context": TapInfo(channels, 16),
        }
        if self.use_2dpam:
            self.tap_info["spatial.selected"] = TapInfo(channels, 4)
        self.tap_info["fusion"] = TapInfo(channels, 4)
        self.tap_info["refine"] = TapInfo(channels, 4)
        extra = check_extra_channels(extra_channels, self.tap_info, "dfdam")
        self.extra_channels = extra

        self.spatial_proj = conv_bn_relu(ch[self.spatial_index], channels)
        self.low_proj = conv_bn_relu(ch[self.low_index], channels)
        self.high_proj = conv_bn_relu(ch[self.high_index], channels)
        merged = ("spatial", "context.low", "context.high", "context", "spatial.selected")
        self.merge = nn.ModuleDict(
            {
                _key(name): conv_bn_relu(channels + extra[name], channels)
                for name in merged
                if extra.get(name, 0) > 0
            }
        )
        self.dafm = DAFM(channels) if self.use_dafm else None
        self.pam = (
            PositionAttention(channels, channels, attention_channels) if self.use_2dpam else None
        )
        self.refine = conv_bn_relu(channels + extra.get("fusion", 0), channels, 3)
        self.classifier = nn.Conv2d(channels + extra.get("refine", 0), num_classes, 1)
        self.aux_context = nn.Conv2d(channels, num_classes, 1)
        self.aux_spatial = nn.Conv2d(channels, num_classes, 1)
        # The confidence map's last conv keeps PyTorch's default init: a fan-out (=1)
        # Kaiming init would start beta saturated at 0 or 1.
        head = [self.spatial_proj, self.low_proj, self.high_proj, self.merge, self.refine]
        if self.pam is not None:
            head.append(self.pam.confidence[0])
        init_head([*head, self.classifier, self.aux_context, self.aux_spatial])

    def _merged(self, name: str, fmap: torch.Tensor) -> torch.Tensor:
        key = _key(name)
        return self.merge[key](fmap) if key in self.merge else fmap

    def forward_taps(self, x: torch.Tensor) -> TapStream:
        size = x.shape[-2:]
        features = self.backbone(x)
        record = self.record_attention
        attention: dict[str, torch.Tensor] = {}

        spatial = yield "spatial", self.spatial_proj(features[self.spatial_index])
        spatial = self._merged("spatial", spatial)
        low = yield "context.low", self.low_proj(features[self.low_index])
        low = self._merged("context.low", low)
        high = yield "context.high", self.high_proj(features[self.high_index])
        high = self._merged("context.high", high)

        if self.dafm is not None:
            context, alpha_high, alpha_low = self.dafm(low, high)
            if record:
                attention["alpha_high"] = alpha_high.detach().flatten(1)
                attention["alpha_low"] = alpha_low.detach().flatten(1)
        else:
            context = low + _resize(high, low.shape[-2:])
        context = yield "context", context
        context = self._merged("context", context)
        context_up = _resize(context, spatial.shape[-2:])

        if self.pam is not None:
            selected, beta = self.pam(spatial, context_up)
            if record:
                attention["beta"] = beta.detach()
            selected = yield "spatial.selected", selected
            selected = self._merged("spatial.selected", selected)
        else:
            selected = spatial
        fused = yield "fusion", selected + context_up
        y = yield "refine", self.refine(fused)
        if record:
            self.attention = attention

        out = {"out": _resize(self.classifier(y), size)}
        if self.training:
            out["aux_context"] = _resize(self.aux_context(context), size)
            supervised = selected if self.aux_spatial_on == "weighted" else spatial
            out["aux_spatial"] = _resize(self.aux_spatial(supervised), size)
        return out


def _key(tap: str) -> str:
    return tap.replace(".", "_")
