"""JointSeg (Haloi, "Rethinking Convolutional Semantic Segmentation Learning"), as taps.

Two agents share an encoder M: a classifier C(M(x)) and a segmenter S(M(x)). Each agent
is trained by its own optimizer over M and its private part (``coopseg.engine.joint``);
this module only builds the network and names its three parameter groups
(:meth:`JointSeg.agent_parameters`). "Paper:" marks what the paper states, "ours:" a
choice it leaves open (docs/jointseg.md lists the readings each option offers).

- **Residual inception block** (paper Fig. 2): paper: a base inception block with "an
  additional convolution ... before max-pooling", the concatenated features "convolved
  with another 3x3 convolution" and "added with 1x1 convolved input features; both
  operations have the same number of output filters". Ours (the figure is not in the
  text): four branches on the block input, 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3; 3x3 ->
  3x3 stride-1 max-pool, each a quarter of the output width, and
  ``ReLU(BN(conv3x3(cat)) + BN(conv1x1(x)))``; every conv is followed by BN (paper: "batch
  normalization is used") and ReLU inside the branches. The **factorized** variant
  (paper Fig. 3, "convolution factorization", classifier node) replaces every 3x3 conv
  by a 1x3 then a 3x1 conv.
- **Shared encoder M**: paper: "strided convolution is used to down-sample" and "for
  each spatial dimension level of the encoder ... multiples cascaded residual inception
  blocks were used". Ours: a 3x3 stem conv (stride ``stem_stride``), then one level per
  entry of ``widths``; every level after the first starts with a 3x3 stride-2 conv,
  followed by ``blocks`` residual inception blocks (default 2: "multiples"). The last map
  of each level is an encoder map E_i ("the last feature maps (before reducing the feature
  map width and height for each block)"); the deepest one feeds both agents. It follows
  the encoder protocol of :func:`coopseg.models.backbones.resolve_encoder`, so
  ``create_model("unet", backbone=JointSegEncoder(...))`` and FCN-8s work.
- **Classifier agent C**: paper: factorized residual inception blocks, "followed by a
  global pool layer and a fully connected layer". Ours: ``cls_blocks`` of them at the
  deepest resolution, average pooling, dropout (``cls_dropout``) before the FC layer.
- **Segmentation agent S**: paper: "consecutive transposed convolutions with 2x2 stride
  and 2x2 kernel size followed by a partial attention block"; the decoder remaps features
  to maps "of same width and height as input". One stage per encoder level below the
  deepest, plus one more when ``stem_stride=2`` so that the last transposed convolution
  reaches the input size (no bilinear upsampling). Each upsampled map is cropped to the
  size of the level it reaches (odd sizes, as U-Net does), then gated.

PAG (paper Fig. 4, Eq. 3). For an upsampled map U, E_i takes part (switch on) only when
``a_i = min(h, w of E_i) / min(h, w of U) >= 1`` (paper: "only focuses on the encoder
feature maps with spatial resolutions equal or larger than that of the upsampling
outputs"); it is brought to U's size by a max-pool with kernel = stride = a_i when
a_i > 1 and the identity at a_i = 1. Ours: an adaptive max-pool to U's size when the
ratio is not an integer (odd input sizes; equal to the strided max-pool on exact
multiples). The final full-resolution stage has no E_i that large, so its switch is off
for every map. The paper describes no learned gate beyond this switch and pooling:
``pag_gate="none"`` (default) uses the pooled maps P_i as they are; ``"additive"`` (ours,
Attention U-Net style) multiplies each by ``sigmoid(psi(ReLU(theta(P_i) + phi(U))))``.
Ours, in both: U and the (gated) P_i are concatenated and a residual inception block
fuses them to the stage width. A 1x1 classifier follows the last stage.

``forward(x)`` returns ``{"out": segmentation logits, "cls": class logits}``;
``forward(x, task="seg")`` / ``task="cls"`` compute one agent's path only (what each
optimizer step needs). Taps: ``encoder`` (deepest encoder map) -> ``decoder.0`` ...
``decoder.N-1``; ``extra_channels`` is not supported.

:func:`timm_classifier` wraps a timm classifier (random init, offline) as a classifier
agent, for the paper's Table III baselines (VGG-19, Inception-v3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import PretrainedArg
from .deeplabv3plus import init_head
from .fcn import fit_to
from .inception import ResidualInception, conv_bn
from .taps import TapInfo, TappedNetwork, TapStream, run_taps
from .unet import EncoderFeatureInfo

TASKS = ("both", "seg", "cls")
PAG_GATES = ("none", "additive")


def _per_level(value: int | Sequence[int], levels: int, name: str) -> list[int]:
    values = [value] * levels if isinstance(value, int) else list(value)
    if len(values) != levels or min(values) < 0:
        raise ValueError(f"{name}: expected one non-negative int per level ({levels}), got {value}")
    return values


class JointSegEncoder(nn.Module):
    """The shared encoder M; returns the last map of every level, shallow to deep.

    It initialises itself (He fan-out, BN to identity: :func:`init_head`), so JointSeg and
    every baseline that wraps it (FCN-8s, U-Net) start from one init: built right after
    the same ``torch.manual_seed``, their encoders hold the same weights. (PyTorch's
    default conv init is ~2.5x smaller, which under AdamW changes the relative step size.)
    """

    def __init__(
        self,
        in_chans: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256, 512),
        blocks: int | Sequence[int] = 2,
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
        init_head([self])

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
    """PAG over the switched-on encoder maps, then fusion with the upsampled map U.

    ``gate="none"``: the paper's switch + max-pool only; ``"additive"`` (ours): each pooled
    map is also multiplied by a learned spatial gate. ``encoder_chs`` may be empty (no
    encoder map is as large as U): the block then fuses U alone.
    """

    def __init__(
        self, up_ch: int, encoder_chs: Sequence[int], out_ch: int, gate: str = "none"
    ) -> None:
        super().__init__()
        if gate not in PAG_GATES:
            raise ValueError(f"pag_gate must be one of {list(PAG_GATES)}, got {gate!r}")
        self.gate, self.encoder_chs = gate, list(encoder_chs)
        if gate == "additive":
            inter = max(min(up_ch, 64) // 2, 4)
            self.theta = nn.ModuleList(nn.Conv2d(c, inter, 1) for c in encoder_chs)
            self.phi = nn.ModuleList(nn.Conv2d(up_ch, inter, 1, bias=False) for _ in encoder_chs)
            self.psi = nn.ModuleList(nn.Conv2d(inter, 1, 1) for _ in encoder_chs)
        self.fuse = ResidualInception(up_ch + sum(encoder_chs), out_ch)

    def forward(self, up: torch.Tensor, encoder_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(encoder_maps) != len(self.encoder_chs):
            raise ValueError(
                f"PAG: expected {len(self.encoder_chs)} encoder maps, got {len(encoder_maps)}"
            )
        size = up.shape[-2:]
        parts = [up]
        for i, e in enumerate(encoder_maps):
            pooled = pag_pool(e, size)  # raises if the switch is off (E_i smaller than U)
            if self.gate == "additive":
                g = torch.sigmoid(self.psi[i](F.relu(self.theta[i](pooled) + self.phi[i](up))))
                pooled = g * pooled
            parts.append(pooled)
        return self.fuse(torch.cat(parts, 1))


class JointSeg(TappedNetwork):
    """Shared encoder + classifier agent + segmentation agent with PAG (see module doc)."""

    def __init__(
        self,
        num_classes: int = 11,
        num_cls_classes: int = 5,
        in_chans: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256, 512),
        blocks: int | Sequence[int] = 2,
        stem_stride: int = 2,
        decoder_channels: Sequence[int] | None = None,
        cls_width: int | None = None,
        cls_blocks: int = 2,
        cls_dropout: float = 0.2,
        pag_gate: str = "none",
        pretrained: PretrainedArg = False,
    ) -> None:
        super().__init__()
        if pretrained:
            raise ValueError(
                "jointseg has no pretrained weights: it is trained from random init (load a "
                "state dict into model.encoder to start from a pretrained encoder)"
            )
        if pag_gate not in PAG_GATES:
            raise ValueError(f"pag_gate must be one of {list(PAG_GATES)}, got {pag_gate!r}")
        widths = list(widths)
        if len(widths) < 2:
            raise ValueError(f"jointseg needs at least 2 encoder levels, got widths={widths}")
        self.in_chans = in_chans
        self.encoder = JointSegEncoder(in_chans, widths, blocks, stem_stride)
        strides = self.encoder.feature_info.reduction()
        # levels reached, deep to shallow; None: the input size (below a stride-2 stem)
        targets: list[int | None] = list(range(len(widths) - 2, -1, -1))
        default_dec = widths[-2::-1]
        if stem_stride > 1:
            targets.append(None)
            default_dec.append(widths[0])
        dec = list(decoder_channels) if decoder_channels is not None else default_dec
        if len(dec) != len(targets) or min(dec) < 1:
            raise ValueError(
                f"decoder_channels needs {len(targets)} positive widths, one per stage, got {dec}"
            )
        self.ups = nn.ModuleList()
        self.gates = nn.ModuleList()
        in_ch = widths[-1]
        for level, width in zip(targets, dec, strict=True):
            self.ups.append(nn.ConvTranspose2d(in_ch, width, 2, stride=2))
            attended = [] if level is None else widths[: level + 1]  # the maps with a_i >= 1
            self.gates.append(PartialAttentionGate(width, attended, width, pag_gate))
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
            self.tap_info[f"decoder.{n}"] = TapInfo(width, 1 if level is None else strides[level])

        # the encoder initialised itself, first: the same seed gives the baselines' weights
        init_head([*self.agent_modules("cls"), *self.agent_modules("seg")])

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
            if level is None:  # the last stage: the input size, no encoder map that large
                y = yield f"decoder.{n}", gate(fit_to(up(y), size), [])
            else:
                u = fit_to(up(y), maps[level].shape[-2:])
                y = yield f"decoder.{n}", gate(u, maps[: level + 1])
        logits = self.seg_classifier(y)
        if logits.shape[-2:] != size:  # stem_stride=1 ends at the input size too
            raise RuntimeError(
                f"jointseg decoder ended at {tuple(logits.shape[-2:])}, not {tuple(size)}"
            )
        return {"out": logits, **out}

    def forward(self, x: torch.Tensor, task: str = "both") -> dict[str, torch.Tensor]:
        return run_taps(self.forward_taps(x, task))


class ClassifierBaseline(nn.Module):
    """A plain image classifier dressed as a classifier agent (``forward(x, task="cls")``,
    ``agent_parameters("cls")``), so the joint trainer's ``tasks=("cls",)`` loop trains
    and evaluates it exactly like JointSeg's agent: the paper's Table III baselines."""

    def __init__(self, model: nn.Module, num_cls_classes: int) -> None:
        super().__init__()
        self.model, self.num_cls_classes = model, num_cls_classes

    def agent_parameters(self, agent: str, private_only: bool = False) -> list[nn.Parameter]:
        """Every parameter belongs to the classifier agent (there is no segmenter)."""
        if agent != "cls":
            raise ValueError(f"a classifier baseline has only the 'cls' agent, not {agent!r}")
        return list(self.model.parameters())

    def forward(self, x: torch.Tensor, task: str = "cls") -> dict[str, torch.Tensor]:
        if task != "cls":
            raise ValueError(f"a classifier baseline computes task 'cls' only, not {task!r}")
        return {"cls": self.model(x)}


def timm_classifier(
    name: str, num_cls_classes: int, in_chans: int = 3, **kwargs: object
) -> ClassifierBaseline:
    """``timm.create_model(name, pretrained=False, num_classes=...)`` as a classifier agent:
    random init (as JointSeg's agent starts), so nothing is downloaded."""
    import timm

    model = timm.create_model(
        name, pretrained=False, num_classes=num_cls_classes, in_chans=in_chans, **kwargs
    )
    return ClassifierBaseline(model, num_cls_classes)
