"""JointSeg (Haloi, "Rethinking Convolutional Semantic Segmentation Learning"), as taps.

Two agents share an encoder M: a classifier C(M(x)) and a segmenter S(M(x)). Each agent
is trained by its own optimizer over M and its private part (``coopseg.engine.joint``);
this module only builds the network and names its three parameter groups
(:meth:`JointSeg.agent_parameters`).

- **Residual inception block** (paper Fig. 2): four branches on the block input, a 1x1
  conv; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3 (a 5x5 receptive field); and the paper's extra
  3x3 conv *before* a 3x3 stride-1 max-pool. Branches are concatenated, a 3x3 conv maps
  the concatenation to the output width ("to reduce aliasing") and a 1x1-conv projection
  of the block input (same width) is added: ``ReLU(BN(conv3x3(cat)) + BN(conv1x1(x)))``.
  Every conv is followed by BN (+ ReLU inside branches). The **factorized** variant
  (Fig. 3, classifier node) replaces every 3x3 conv by a 1x3 then a 3x1 conv.
- **Shared encoder M**: a 3x3 stem conv (stride ``stem_stride``), then one level per
  entry of ``widths``; every level after the first starts with a 3x3 stride-2 conv
  (downsampling by strided convolution, no pooling) followed by ``blocks`` residual
  inception blocks. The last map of each level is an encoder map E_i; the deepest one
  feeds both agents. It follows the encoder protocol of
  :func:`coopseg.models.backbones.resolve_encoder`, so ``create_model("unet",
  backbone=JointSegEncoder(...))`` and FCN-8s (with maps at strides 8/16/32) work.
- **Classifier agent C**: ``cls_blocks`` factorized residual inception blocks at the
  deepest resolution, global average pooling, dropout, one fully connected layer.
- **Segmentation agent S**: per decoder stage a 2x2 stride-2 transposed convolution
  (cropped to the size of the encoder level it reaches, as U-Net does with odd sizes),
  then **partial attention gating** (PAG, Fig. 4) over the encoder maps.

PAG. For an upsampled map U, an encoder map E_i takes part (switch on) only when
``a_i = min(h, w of E_i) / min(h, w of U) >= 1``; it is brought to U's size by a
max-pool with kernel = stride = a_i when a_i > 1 (an integer ratio on both axes), the
identity when E_i already has U's size, and an adaptive max-pool to U's size when the
ratio is not an integer (odd input sizes; equal to the strided max-pool on exact
multiples). Candidates are the maps of the level U reaches and every shallower level;
deeper maps are smaller than U except in degenerate 1-pixel cases and are never used,
which keeps channel counts fixed at construction.

How the gated maps meet the decoder map (the paper's Fig. 4 is not in its text; this is
our reading, chosen to be both "attention" and "gating"): each pooled map P_i gets a
spatial gate ``g_i = sigmoid(psi(ReLU(theta(P_i) + phi(U))))`` (1x1 convs, additive
attention in the style of Attention U-Net), the gated maps ``g_i * P_i`` are
concatenated with U, and a residual inception block fuses the concatenation to the
stage width. A 1x1 classifier follows the last stage; logits are bilinearly resized to
the input size when the shallowest level has stride > 1.

``forward(x)`` returns ``{"out": segmentation logits, "cls": class logits}``;
``forward(x, task="seg")`` / ``task="cls"`` compute one agent's path only (what each
optimizer step needs). Taps: ``encoder`` (deepest encoder map) -> ``decoder.0`` ...
``decoder.N-1``; ``extra_channels`` is not supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import PretrainedArg
from .deeplabv3plus import init_head
from .fcn import fit_to
from .taps import TapInfo, TappedNetwork, TapStream, run_taps
from .unet import EncoderFeatureInfo

TASKS = ("both", "seg", "cls")


def conv_bn(
    in_ch: int, out_ch: int, kernel: int | tuple[int, int], stride: int = 1, relu: bool = True
) -> nn.Sequential:
    """Conv ("same" padding for odd kernels) + BN (+ ReLU)."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, (kh, kw), stride=stride, padding=(kh // 2, kw // 2), bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def spatial_conv(
    in_ch: int, out_ch: int, factorized: bool, n: int = 3, relu: bool = True
) -> nn.Sequential:
    """An n x n conv, or its factorization 1 x n then n x 1 (the classifier node's)."""
    if not factorized:
        return conv_bn(in_ch, out_ch, n, relu=relu)
    return nn.Sequential(conv_bn(in_ch, out_ch, (1, n)), conv_bn(out_ch, out_ch, (n, 1), relu=relu))


class ResidualInception(nn.Module):
    """The paper's residual inception block (``factorized=True``: its Fig. 3 variant)."""

    def __init__(self, in_ch: int, out_ch: int, factorized: bool = False, n: int = 3) -> None:
        super().__init__()
        b = max(out_ch // 4, 1)  # branch width; the concatenation is 4b wide

        def conv(c_in: int, c_out: int) -> nn.Sequential:
            return spatial_conv(c_in, c_out, factorized, n)

        self.branch1 = conv_bn(in_ch, b, 1)
        self.branch3 = nn.Sequential(conv_bn(in_ch, b, 1), conv(b, b))
        self.branch5 = nn.Sequential(conv_bn(in_ch, b, 1), conv(b, b), conv(b, b))
        self.branch_pool = nn.Sequential(conv(in_ch, b), nn.MaxPool2d(3, stride=1, padding=1))
        self.merge = spatial_conv(4 * b, out_ch, factorized, n, relu=False)
        self.residual = conv_bn(in_ch, out_ch, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1, self.branch3, self.branch5, self.branch_pool)
        cat = torch.cat([branch(x) for branch in branches], 1)
        return F.relu(self.merge(cat) + self.residual(x))


def _per_level(value: int | Sequence[int], levels: int, name: str) -> list[int]:
    values = [value] * levels if isinstance(value, int) else list(value)
    if len(values) != levels or min(values) < 0:
        raise ValueError(f"{name}: expected one non-negative int per level ({levels}), got {value}")
    return values


class JointSegEncoder(nn.Module):
    """The shared encoder M; returns the last map of every level, shallow to deep."""

    def __init__(
        self,
        in_chans: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256, 512),
        blocks: int | Sequence[int] = 1,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        widths = list(widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"widths: expected positive channel counts, got {widths}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        counts = _per_level(blocks, len(widths), "blocks")
        self.stem = conv_bn(in_chans, widths[0], 3, stride=stem_stride)
        levels = []
        for i, (width, count) in enumerate(zip(widths, counts, strict=True)):
            layers: list[nn.Module] = [] if i == 0 else [conv_bn(widths[i - 1], width, 3, 2)]
            layers += [ResidualInception(width, width) for _ in range(count)]
            levels.append(nn.Sequential(*layers))
        self.levels = nn.ModuleList(levels)
        self.feature_info = EncoderFeatureInfo(
            widths, [stem_stride * 2**i for i in range(len(widths))]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        maps = []
        for level in self.levels:
            x = level(x)
            maps.append(x)
        return maps


def pag_ratio(encoder_size: Sequence[int], up_size: Sequence[int]) -> float:
    """Eq. 3: ``a_i = min(h, w of E_i) / min(h, w of U_i)``; the switch is on when >= 1."""
    return min(int(encoder_size[0]), int(encoder_size[1])) / min(int(up_size[0]), int(up_size[1]))


def pag_pool(e: torch.Tensor, up_size: Sequence[int]) -> torch.Tensor:
    """Bring a switched-on encoder map to U's size: identity at equal size, max-pool with
    kernel = stride = a_i at an integer ratio, adaptive max-pool otherwise."""
    (h, w), (uh, uw) = e.shape[-2:], (int(up_size[0]), int(up_size[1]))
    if pag_ratio((h, w), (uh, uw)) < 1:
        raise ValueError(f"encoder map {h}x{w} is smaller than the upsampled map {uh}x{uw}")
    if (h, w) == (uh, uw):
        return e
    a = h // uh
    if a > 1 and h == a * uh and w == a * uw:
        return F.max_pool2d(e, a, stride=a)
    return F.adaptive_max_pool2d(e, (uh, uw))


class PartialAttentionGate(nn.Module):
    """PAG over the candidate encoder maps, then fusion with the upsampled map U."""

    def __init__(self, up_ch: int, encoder_chs: Sequence[int], out_ch: int) -> None:
        super().__init__()
        inter = max(min(up_ch, 64) // 2, 4)
        self.theta = nn.ModuleList(nn.Conv2d(c, inter, 1) for c in encoder_chs)
        self.phi = nn.ModuleList(nn.Conv2d(up_ch, inter, 1, bias=False) for _ in encoder_chs)
        self.psi = nn.ModuleList(nn.Conv2d(inter, 1, 1) for _ in encoder_chs)
        self.fuse = ResidualInception(up_ch + sum(encoder_chs), out_ch)

    def forward(self, up: torch.Tensor, encoder_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        size = up.shape[-2:]
        parts = [up]
        for i, e in enumerate(encoder_maps):
            if pag_ratio(e.shape[-2:], size) < 1:  # cannot happen for shallower levels
                raise ValueError(f"PAG: encoder map {tuple(e.shape[-2:])} smaller than {size}")
            pooled = pag_pool(e, size)
            gate = torch.sigmoid(self.psi[i](F.relu(self.theta[i](pooled) + self.phi[i](up))))
            parts.append(gate * pooled)
        return self.fuse(torch.cat(parts, 1))


class JointSeg(TappedNetwork):
    """Shared encoder + classifier agent + segmentation agent with PAG (see module doc)."""

    def __init__(
        self,
        num_classes: int = 11,
        num_cls_classes: int = 5,
        in_chans: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256, 512),
        blocks: int | Sequence[int] = 1,
        stem_stride: int = 2,
        decoder_channels: Sequence[int] | None = None,
        cls_width: int | None = None,
        cls_blocks: int = 2,
        cls_dropout: float = 0.2,
        pretrained: PretrainedArg = False,
    ) -> None:
        super().__init__()
        if pretrained:
            raise ValueError(
                "jointseg has no pretrained weights: it is trained from random init (load a "
                "state dict into model.encoder to start from a pretrained encoder)"
            )
        widths = list(widths)
        if len(widths) < 2:
            raise ValueError(f"jointseg needs at least 2 encoder levels, got widths={widths}")
        self.encoder = JointSegEncoder(in_chans, widths, blocks, stem_stride)
        strides = self.encoder.feature_info.reduction()
        targets = list(range(len(widths) - 2, -1, -1))  # levels reached, deep to shallow
        dec = list(decoder_channels) if decoder_channels is not None else widths[-2::-1]
        if len(dec) != len(targets) or min(dec) < 1:
            raise ValueError(
                f"decoder_channels needs {len(targets)} positive widths, one per stage, got {dec}"
            )
        self.ups = nn.ModuleList()
        self.gates = nn.ModuleList()
        in_ch = widths[-1]
        for level, width in zip(targets, dec, strict=True):
            self.ups.append(nn.ConvTranspose2d(in_ch, width, 2, stride=2))
            self.gates.append(PartialAttentionGate(width, widths[: level + 1], width))
            in_ch = width
        self.seg_classifier = nn.Conv2d(in_ch, num_classes, 1)
        self.targets = targets

        cls_width = cls_width or widths[-1]
        self.cls_blocks = nn.Sequential(
            *[
                ResidualInception(widths[-1] if i == 0 else cls_width, cls_width, factorized=True)
                for i in range(cls_blocks)
            ]
        )
        self.cls_fc = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Dropout(cls_dropout),
            nn.Linear(cls_width if cls_blocks else widths[-1], num_cls_classes),
        )
        self.num_classes, self.num_cls_classes = num_classes, num_cls_classes
        self.tap_info = {"encoder": TapInfo(widths[-1], strides[-1])}
        for n, (level, width) in enumerate(zip(targets, dec, strict=True)):
            self.tap_info[f"decoder.{n}"] = TapInfo(width, strides[level])

        init_head([self])

    # -- the three parameter groups ------------------------------------------------
    def agent_modules(self, part: str) -> list[nn.Module]:
        """``"shared"`` (M), ``"cls"`` (C, private) or ``"seg"`` (S, private)."""
        if part == "shared":
            return [self.encoder]
        if part == "cls":
            return [self.cls_blocks, self.cls_fc]
        if part == "seg":
            return [self.ups, self.gates, self.seg_classifier]
        raise ValueError(f"part must be 'shared', 'cls' or 'seg', got {part!r}")

    def agent_parameters(self, agent: str, private_only: bool = False) -> list[nn.Parameter]:
        """The parameters one agent's optimizer owns: M ∪ C (``"cls"``) or M ∪ S (``"seg"``)."""
        parts = [agent] if private_only else ["shared", agent]
        return [p for part in parts for m in self.agent_modules(part) for p in m.parameters()]

    # -- forward -----------------------------------------------------------------
    def classify(self, deepest: torch.Tensor) -> torch.Tensor:
        return self.cls_fc(self.cls_blocks(deepest))

    def forward_taps(self, x: torch.Tensor, task: str = "both") -> TapStream:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        size = x.shape[-2:]
        maps = self.encoder(x)
        y = yield "encoder", maps[-1]
        out: dict[str, torch.Tensor] = {}
        if task in ("both", "cls"):
            out["cls"] = self.classify(maps[-1])
        if task == "cls":
            return out
        for n, (up, gate, level) in enumerate(zip(self.ups, self.gates, self.targets, strict=True)):
            u = fit_to(up(y), maps[level].shape[-2:])
            y = yield f"decoder.{n}", gate(u, maps[: level + 1])
        logits = self.seg_classifier(y)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return {"out": logits, **out}

    def forward(self, x: torch.Tensor, task: str = "both") -> dict[str, torch.Tensor]:
        return run_taps(self.forward_taps(x, task))
