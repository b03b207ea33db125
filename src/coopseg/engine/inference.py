"""Inference: the path of an image tensor to class scores, shared by validation,
``coopseg eval``, ``predict`` (both backends), ``export``, ``report``, ``explain`` and the
demo.

* precision: :func:`amp_dtype` (``train.amp`` -> an autocast dtype, with the CPU check
  :func:`cpu_has_fast_bf16`) and :func:`autocast_context`;
* protocols: whole images, multi-scale and flip (:func:`predict_outputs`), sliding
  windows (:class:`SlideWindow`, :func:`slide_outputs`) and the centre region of
  ``eval.mode: center`` (:func:`center_crop`);
* outputs: a cooperative model's named outputs (:func:`segmentation_outputs`).

A file becomes such a tensor in :func:`coopseg.data.files.read_rgb` (EXIF orientation
applied) and the normalisation of the config or the graph; the mask is the argmax of
what :func:`predict_probs` returns. The evaluation loop over a data set lives in
:mod:`coopseg.engine.evaluate`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, EvalConfig
from ..data.base import IGNORE_INDEX


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Does this CPU compute bf16 natively (AMX or AVX512-BF16)? Without either, bf16
    autocast is emulated and slower than fp32 (measured 1.7x slower per DeepLabv3+ step)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {
        word for line in cpuinfo.splitlines() if line.startswith("flags") for word in line.split()
    }
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> autocast dtype (None: full precision). ``auto``: bf16 on CUDA
    (fp16 where bf16 is missing), full precision on a CPU (where bf16 pays depends on
    the model too; training measures it: engine/precision.py)."""
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.amp: fp16 autocast needs CUDA; use bf16 on the CPU")
        return torch.float16
    raise ConfigError(f"train.amp: expected none, auto, bf16 or fp16, got {amp!r}")


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class SlideWindow:
    """Sliding-window geometry: ``crop`` and ``stride`` as (height, width) in pixels.

    ``batch`` windows go through the model per forward pass, so memory stays
    bounded on full-resolution images (Cityscapes: 2048x1024) whatever the image
    or batch size.
    """

    crop: tuple[int, int]
    stride: tuple[int, int]
    batch: int = 4

    def __post_init__(self) -> None:
        for name, pair in (("crop_size", self.crop), ("stride", self.stride)):
            if len(pair) != 2 or any(isinstance(v, bool) or int(v) != v or v < 1 for v in pair):
                raise ConfigError(f"eval.{name}: expected [height, width], positive, got {pair}")
        if any(s > c for s, c in zip(self.stride, self.crop, strict=True)):
            raise ConfigError(
                f"eval.stride {list(self.stride)} is larger than eval.crop_size "
                f"{list(self.crop)}: pixels between windows would never be predicted"
            )
        if self.batch < 1:
            raise ConfigError(f"eval.window_batch: expected a positive integer, got {self.batch}")

    @classmethod
    def create(
        cls, crop: Sequence[int], stride: Sequence[int] | None = None, batch: int = 4
    ) -> SlideWindow:
        """``stride`` None: two thirds of the crop (windows overlap by a third)."""
        crop_t = tuple(int(c) for c in crop)
        if stride is None:
            stride = [max(1, round(c * 2 / 3)) for c in crop_t]
        return cls(crop_t, tuple(int(s) for s in stride), batch)  # type: ignore[arg-type]


def slide_window(eval_cfg: EvalConfig, default_crop: Sequence[int]) -> SlideWindow | None:
    """The window of ``eval.mode: slide`` (crop defaults to ``data.crop_size``); None: whole."""
    if eval_cfg.mode != "slide":
        return None
    return SlideWindow.create(
        eval_cfg.crop_size or default_crop, eval_cfg.stride, eval_cfg.window_batch
    )


def center_region(eval_cfg: EvalConfig, default_crop: Sequence[int]) -> tuple[int, int] | None:
    """The region ``eval.mode: center`` scores (crop defaults to ``data.crop_size``)."""
    if eval_cfg.mode != "center":
        return None
    crop = eval_cfg.crop_size or default_crop
    return int(crop[0]), int(crop[1])


def center_crop(
    images: torch.Tensor, masks: torch.Tensor, size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The central ``size`` region of a batch and its masks. A side shorter than the
    crop is padded on both sides (image with 0, the mean colour once normalised; mask
    with the ignore label), so the padding is never scored."""
    h, w = images.shape[-2:]
    ch, cw = int(size[0]), int(size[1])
    pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
    if pad_h or pad_w:
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        images = F.pad(images, pads)
        masks = F.pad(masks, pads, value=IGNORE_INDEX)
        h, w = images.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return (
        images[..., top : top + ch, left : left + cw],
        masks[..., top : top + ch, left : left + cw],
    )


def segmentation_outputs(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The eval-mode outputs that are per-pixel class scores: a cooperative model's
    named ones (``"fused.out"``, ``"<member>.out"``; its selected output comes first),
    else the model's ``"out"``. The first is the model's prediction."""
    named = {k: v for k, v in outputs.items() if k.endswith(".out")}
    return named or {"out": outputs["out"]}


def output_label(key: str) -> str:
    """Column name in tables and JSON: ``out``, or ``fused`` / a member's name."""
    return key.removesuffix(".out")


def first(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's prediction among :func:`segmentation_outputs` (the first)."""
    return next(iter(scores.values()))


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window origins along one axis: every ``stride`` pixels, the last flush with the border.

    A side no longer than ``crop`` gets one window at 0 (the image is padded).
    """
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


def slide_probs(
    model: nn.Module,
    images: torch.Tensor,
    window: SlideWindow,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Softmax over the image from overlapping windows, averaged pixel-wise by a count map
    (the model's prediction; :func:`slide_outputs` gives every output)."""
    return first(slide_outputs(model, images, window, amp_dtype))


def slide_outputs(
    model: nn.Module,
    images: torch.Tensor,
    window: SlideWindow,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`slide_probs` for every segmentation output of the model.

    An image smaller than the crop is zero-padded (the mean colour once normalised)
    at the bottom/right; the padded pixels' predictions are dropped, never averaged.
    """
    b, _, h, w = images.shape
    (ch, cw), (sh, sw) = window.crop, window.stride
    channels_last = images.is_contiguous(memory_format=torch.channels_last)
    if h < ch or w < cw:
        images = F.pad(images, (0, max(cw - w, 0), 0, max(ch - h, 0)))
    ys, xs = window_starts(h, ch, sh), window_starts(w, cw, sw)
    count = torch.zeros((h, w), device=images.device)
    for y in ys:
        for x in xs:
            count[y : y + ch, x : x + cw] += 1
    windows = [(i, y, x) for i in range(b) for y in ys for x in xs]
    totals: dict[str, torch.Tensor] = {}
    ctx = autocast_context(images.device, amp_dtype)
    for start in range(0, len(windows), window.batch):
        group = windows[start : start + window.batch]
        crops = torch.stack([images[i, :, y : y + ch, x : x + cw] for i, y, x in group])
        if channels_last:
            crops = crops.contiguous(memory_format=torch.channels_last)
        with ctx:
            outputs = segmentation_outputs(model(crops))
        for key, logits in outputs.items():
            logits = logits.float()
            if logits.shape[-2:] != (ch, cw):
                logits = F.interpolate(logits, size=(ch, cw), mode="bilinear", align_corners=False)
            probs = logits.softmax(1)
            if key not in totals:
                totals[key] = probs.new_zeros((b, probs.shape[1], h, w))
            total = totals[key]
            for p, (i, y, x) in zip(probs, group, strict=True):
                vh, vw = min(ch, h - y), min(cw, w - x)  # the part inside the image
                total[i, :, y : y + vh, x : x + vw] += p[:, :vh, :vw]
    return {key: total / count for key, total in totals.items()}


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
    slide: SlideWindow | None = None,
) -> torch.Tensor:
    """Class scores at the input's size: softmax averaged over scales and flips.

    With one scale of 1.0, no flip and no ``slide`` this returns the raw logits
    (same argmax, one forward pass): plain inference. With ``slide`` each scaled
    (and flipped) view is covered by windows (:func:`slide_probs`), and its
    probabilities are resized to the input size before averaging.
    """
    return first(predict_outputs(model, images, scales, flip, amp_dtype, slide))


@torch.no_grad()
def predict_outputs(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
    slide: SlideWindow | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`predict_probs` for every segmentation output at once (a cooperative
    model's fused and member outputs come from the same forward passes)."""
    size = images.shape[-2:]
    ctx = autocast_context(images.device, amp_dtype)
    if list(scales) == [1.0] and not flip and slide is None:
        with ctx:
            outputs = segmentation_outputs(model(images))
        return {key: value.float() for key, value in outputs.items()}
    totals: dict[str, torch.Tensor] = {}
    for scale in scales:
        if scale == 1.0:
            scaled = images
        else:
            new = [max(1, round(s * scale)) for s in size]
            scaled = F.interpolate(images, size=new, mode="bilinear", align_corners=False)
        views = [False, True] if flip else [False]
        for flipped in views:
            inp = scaled.flip(-1) if flipped else scaled
            if slide is not None:
                view = slide_outputs(model, inp, slide, amp_dtype)
            else:
                with ctx:
                    view = segmentation_outputs(model(inp))
            for key, scores in view.items():
                scores = scores.float()
                if flipped:
                    scores = scores.flip(-1)
                if scores.shape[-2:] != size:
                    scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
                probs = scores if slide is not None else scores.softmax(1)
                totals[key] = probs if key not in totals else totals[key] + probs
    views_total = len(scales) * (2 if flip else 1)
    return {key: total / views_total for key, total in totals.items()}
