"""DANet (Fu et al., CVPR 2019, "Dual Attention Network"), written as named taps.

Structure follows the official release: a dilated backbone (output stride 8), then
two streams on its last map. Each stream reduces C to C/4 with a 3x3 conv+BN+ReLU
(2048 -> 512 on ResNet-101), applies its attention module, and a second 3x3
conv+BN+ReLU. The position stream uses PAM (softmax over positions of Q.K, Q/K
projected to C/8, no 1/sqrt(d) scaling; out = gamma * attn(V) + x), the channel
stream CAM (energy = A.A^T; the official code takes softmax(rowmax(energy) - energy),
``cam="paper"`` the paper's softmax(energy); out = beta * attn.A + A). gamma and beta
start at 0, so both modules begin as the identity. The two stream maps are summed.
Three classifiers (Dropout2d 0.1 + 1x1 conv, as in the official code) read the sum
(``"out"``) and each stream (``"aux_position"``, ``"aux_channel"``, training mode
only); the three losses are summed (``default_aux_weights``).

PAM's attention matrix is (HW)^2 per image, which dominates memory at segmentation
sizes (a 96x192 map: 2.7 GB per matrix for a batch of 2 in fp32). ``pam_impl`` picks
how it is computed; all give the same values and gradients (see
``benchmarks/pam_memory.py``): ``"dense"`` (plain bmm + softmax), ``"chunked"``
(queries in chunks, each chunk recomputed in backward, so neither pass holds the
whole matrix), ``"sdpa"`` (``scaled_dot_product_attention`` with ``scale=1.0``,
a fused kernel that never stores the matrix) and ``"auto"``: dense up to
``pam_chunk_threshold`` positions (4096, a 64x64 map: there dense was the fastest and
its matrix is 64 MB per image), chunked above. Measured on CPU at 96x192, chunked and
sdpa took the same time within noise (0.04-0.5x more than dense) at 1/12-1/16 of its
memory, chunked with the lower peak; and chunked's bound does not depend on which
kernel sdpa's dispatcher picks (with unsupported widths it silently falls back to a
kernel that stores the matrix).

Taps, in execution order; the streams alternate so two networks can be run in
lockstep, and each stream tap carries its group so links never mix streams:
``backbone`` -> ``position.reduce`` -> ``channel.reduce`` (after the 3x3 reductions)
-> ``position.attention`` -> ``channel.attention`` (after PAM / CAM, before each
stream's 3x3 conv) -> ``fusion`` (the summed map the main classifier reads).

``extra_channels`` widens the layer that consumes each tap: ``backbone`` -> both
reduction convs; ``X.reduce`` -> the attention module runs on the concatenated map
(PAM's Q/K/V are sized from that width and V keeps it, so the residual adds up; CAM
has no weights), so the map at ``X.attention`` and the stream's 3x3 conv are wider
too; ``X.attention`` -> that 3x3 conv (the two extras add up); ``fusion`` -> the main
classifier. The auxiliary classifiers read the stream map after its 3x3 conv, which
links never widen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbones import PretrainedArg, create_backbone
from .deeplabv3plus import conv_bn_relu, init_head
from .taps import TapInfo, TappedNetwork, TapStream, check_extra_channels

PamImpl = Literal["dense", "chunked", "sdpa", "auto"]
CamVariant = Literal["official", "paper"]
PAM_IMPLS = ("dense", "chunked", "sdpa", "auto")
CAM_VARIANTS = ("official", "paper")

# Chunked PAM: elements of one chunk's attention block (batch * queries * keys),
# 2**24 = 64 MB in fp32, whatever the map size.
PAM_CHUNK_ELEMENTS = 2**24
# "auto" leaves dense above this many positions (H*W): where one image's dense matrix
# outgrows a chunk (see benchmarks/pam_memory.py for the measurements).
PAM_AUTO_THRESHOLD = 4096


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v)


def pam_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    impl: PamImpl = "dense",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T) v over positions, unscaled as in DANet: q, k (B, N, d), v (B, N, C).

    ``impl`` only changes memory and speed. ``"auto"`` must be resolved by the caller.
    ``chunk_size``: queries per chunk for ``"chunked"`` (default: a 64 MB block).
    """
    if impl == "dense":
        return _attend(q, k, v)
    if impl == "chunked":
        b, n = q.shape[:2]
        chunk = chunk_size or max(1, PAM_CHUNK_ELEMENTS // (b * n))
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        outs = [
            checkpoint(_attend, qc, k, v, use_reentrant=False) if grad else _attend(qc, k, v)
            for qc in q.split(chunk, dim=1)
        ]
        return torch.cat(outs, dim=1)
    if impl == "sdpa":
        # CPU's fused kernel wants equal head widths (else sdpa silently falls back to
        # the math path, which stores the matrix): zero-pad q and k to v's width,
        # which leaves every dot product unchanged. CUDA's memory-efficient kernel
        # takes unequal widths as they are.
        pad = v.shape[-1] - q.shape[-1]
        if q.device.type != "cuda" and pad > 0:
            q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
        return F.scaled_dot_product_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), scale=1.0
        )
    raise ValueError(f"pam_impl must be one of {PAM_IMPLS[:3]} here, got {impl!r}")


class PositionAttention(nn.Module):
    """PAM: every position is a gamma-weighted sum over all positions (gamma starts at 0)."""

    def __init__(
        self,
        channels: int,
        impl: PamImpl = "auto",
        auto_threshold: int = PAM_AUTO_THRESHOLD,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if impl not in PAM_IMPLS:
            raise ValueError(f"pam_impl must be one of {PAM_IMPLS}, got {impl!r}")
        key_channels = max(1, channels // 8)
        self.query = nn.Conv2d(channels, key_channels, 1)
        self.key = nn.Conv2d(channels, key_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.impl = impl
        self.auto_threshold = auto_threshold
        self.chunk_size = chunk_size

    def resolved_impl(self, positions: int) -> PamImpl:
        """The implementation ``forward`` uses on a map of ``positions`` = H*W."""
        if self.impl != "auto":
            return self.impl
        return "dense" if positions <= self.auto_threshold else "chunked"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)
        k = self.key(x).flatten(2).transpose(1, 2)
        v = self.value(x).flatten(2).transpose(1, 2)
        out = pam_attention(q, k, v, self.resolved_impl(h * w), self.chunk_size)
        # Under autocast, keep x's dtype (the fp32 scale would promote the sum).
        return x + (self.gamma * out.transpose(1, 2).reshape(b, c, h, w)).to(x.dtype)


class ChannelAttention(nn.Module):
    """CAM: every channel is a beta-weighted sum over all channels (beta starts at 0).

    ``"official"`` uses softmax(rowmax(E) - E), which favours *dissimilar* channels;
    ``"paper"`` softmax(E). The energy is computed in fp32 even under autocast: it is a
    sum over all H*W positions and overflows fp16 on large maps.
    """

    def __init__(self, variant: CamVariant = "official") -> None:
        super().__init__()
        if variant not in CAM_VARIANTS:
            raise ValueError(f"cam must be one of {CAM_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):
            a = x.flatten(2).float()
            energy = torch.bmm(a, a.transpose(1, 2))
            if self.variant == "official":
                energy = energy.amax(dim=-1, keepdim=True) - energy
            out = torch.bmm(torch.softmax(energy, dim=-1), a)
        return x + (self.beta * out.view(b, c, h, w)).to(x.dtype)


def classifier(in_ch: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(in_ch, num_classes, 1))


class DANetStream(nn.Module):
    """One attention stream: 3x3 reduce -> attention -> 3x3 conv, plus its classifier."""

    def __init__(
        self,
        in_ch: int,
        channels: int,
        attention: nn.Module,
        conv_in: int,
        num_classes: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.reduce = conv_bn_relu(in_ch, channels, 3)
        self.attention = attention
        self.conv = conv_bn_relu(conv_in, channels, 3)
        self.classifier = classifier(channels, num_classes, dropout)


class DANet(TappedNetwork):
    """DANet; ``extra_channels`` widens the layers that consume the named taps."""

    default_aux_weights: ClassVar[dict[str, float]] = {"aux_position": 1.0, "aux_channel": 1.0}

    def __init__(
        self,
        backbone: str = "resnet101",
        num_classes: int = 21,
        output_stride: int = 8,
        pretrained: PretrainedArg = False,
        head_channels: int | None = None,
        cam: CamVariant = "official",
        pam_impl: PamImpl = "auto",
        pam_chunk_threshold: int = PAM_AUTO_THRESHOLD,
        dropout: float = 0.1,
        extra_channels: Mapping[str, int] | None = None,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.backbone = create_backbone(
            backbone, output_stride=output_stride, pretrained=pretrained, in_chans=in_chans
        )
        in_ch = self.backbone.feature_info.channels()[-1]
        stride = self.backbone.feature_info.reduction()[-1]
        channels = head_channels or in_ch // 4
        self.output_stride = stride
        # Presets link inside the two streams only (feature-sharing paper §4.3): the
        # same-layer link sends each stream's attention output into the partner's
        # stream conv, which is then exactly 2x wide (§3.1); the reductions are also
        # sent by the multiple-layer link. The backbone and fused maps are opt-in.
        known = {
            "backbone": TapInfo(in_ch, stride, role=None),
            "position.reduce": TapInfo(channels, stride, "position", role="send"),
            "channel.reduce": TapInfo(channels, stride, "channel", role="send"),
            "position.attention": TapInfo(channels, stride, "position"),
            "channel.attention": TapInfo(channels, stride, "channel"),
            "fusion": TapInfo(channels, stride, role=None),
        }
        extra = check_extra_channels(extra_channels, known, "danet")
        self.extra_channels = extra
        widths = {s: channels + extra.get(f"{s}.reduce", 0) for s in ("position", "channel")}
        # The attention taps carry the attention module's (possibly widened) width.
        self.tap_info = dict(known)
        for s, width in widths.items():
            self.tap_info[f"{s}.attention"] = TapInfo(width, stride, s)  # role "same"
        self.position = DANetStream(
            in_ch + extra.get("backbone", 0),
            channels,
            PositionAttention(widths["position"], pam_impl, pam_chunk_threshold),
            widths["position"] + extra.get("position.attention", 0),
            num_classes,
            dropout,
        )
        self.channel = DANetStream(
            in_ch + extra.get("backbone", 0),
            channels,
            ChannelAttention(cam),
            widths["channel"] + extra.get("channel.attention", 0),
            num_classes,
            dropout,
        )
        self.classifier = classifier(channels + extra.get("fusion", 0), num_classes, dropout)
        init_head([self.position, self.channel, self.classifier])

    def forward_taps(self, x: torch.Tensor) -> TapStream:
        size = x.shape[-2:]
        feat = yield "backbone", self.backbone(x)[-1]
        p = yield "position.reduce", self.position.reduce(feat)
        c = yield "channel.reduce", self.channel.reduce(feat)
        p = yield "position.attention", self.position.attention(p)
        c = yield "channel.attention", self.channel.attention(c)
        p, c = self.position.conv(p), self.channel.conv(c)
        fused = yield "fusion", p + c

        def logits(head: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
            return F.interpolate(head(fmap), size=size, mode="bilinear", align_corners=False)

        out = {"out": logits(self.classifier, fused)}
        if self.training:
            out["aux_position"] = logits(self.position.classifier, p)
            out["aux_channel"] = logits(self.channel.classifier, c)
        return out
