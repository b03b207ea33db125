"""Model cost: parameters, multiply-accumulates and latency.

MACs follow the convention behind the "GFLOPs" columns of most segmentation
papers: one multiply-accumulate of a convolution (transposed included), linear
layer or matrix product counts once. They are measured with
``torch.utils.flop_counter.FlopCounterMode`` on a real forward pass, which reports
2 FLOPs per multiply-accumulate for exactly those ops; we halve it. Not counted:
bias additions, elementwise ops and activations, batch/layer norm, pooling,
interpolation (resizing) and softmax. These are usually a few percent of the
total for convolutional networks.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "config_input_size",
    "cooperative_breakdown",
    "count_macs",
    "count_params",
    "measure_latency",
    "model_summary",
    "profile_model",
    "summary_title",
]

DeviceLike = torch.device | str | None
SizeLike = int | tuple[int, int] | list[int]


def count_params(model: nn.Module, trainable: bool = False) -> int:
    """Number of parameters (shared ones once); ``trainable=True`` counts only those
    with ``requires_grad``, e.g. to report what a frozen-backbone run actually trains."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def _hw(input_size: SizeLike) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    size = tuple(int(s) for s in input_size)
    if len(size) != 2:
        raise ValueError(f"input_size must be (H, W) or an int, got {input_size!r}")
    return size  # type: ignore[return-value]


def _model_device(model: nn.Module) -> torch.device:
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if len(devices) > 1:
        raise ValueError(f"model spans several devices {sorted(map(str, devices))}")
    return devices.pop() if devices else torch.device("cpu")


@contextlib.contextmanager
def _eval_on(model: nn.Module, device: DeviceLike) -> Iterator[torch.device]:
    """Eval mode (and ``device``, when given) for the measurement, then restore the
    model exactly: per-module training flags and the original device."""
    home = _model_device(model)
    target = home if device is None else torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    modes = {m: m.training for m in model.modules()}
    model.eval()
    moved = target != home
    if moved:
        model.to(target)
    try:
        yield target
    finally:
        if moved:
            model.to(home)
        for m, mode in modes.items():
            m.training = mode


def _input(batch: int, in_chans: int, hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    return torch.randn(batch, in_chans, *hw, device=device)


def count_macs(
    model: nn.Module,
    input_size: SizeLike = (512, 512),
    batch: int = 1,
    device: DeviceLike = None,
    in_chans: int = 3,
) -> int:
    """Multiply-accumulates of one eval-mode forward pass on a ``batch``×``in_chans``×H×W
    input (the whole batch; papers quote ``batch=1``). See the module docstring for
    what is and is not counted. ``device=None`` runs where the model lives; another
    device moves the model there for the pass and back afterwards."""
    hw = _hw(input_size)
    with _eval_on(model, device) as dev, torch.no_grad():
        x = _input(batch, in_chans, hw, dev)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
    return counter.get_total_flops() // 2


def _macs_by_module(model: nn.Module, hw: tuple[int, int], device: DeviceLike) -> dict[str, int]:
    """MACs of one batch-1 pass per module path ("" = the whole model)."""
    with _eval_on(model, device) as dev, torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            model(_input(1, 3, hw, dev))
    counts = counter.get_flop_counts()
    root = type(model).__name__
    out = {}
    for key, ops in counts.items():
        if key == root or key.startswith(root + "."):
            out[key[len(root) + 1 :]] = sum(ops.values()) // 2
    return out


def _subtree_macs(macs: dict[str, int], path: str) -> int:
    """A module's MACs from its outermost counted submodules (a cooperative member runs
    through ``forward_taps``, so no hook sees the member module itself)."""
    if path in macs:
        return macs[path]
    prefix = path + "."
    # The outermost counted modules under ``path``: those whose parent was not counted.
    return sum(
        v for k, v in macs.items() if k.startswith(prefix) and k.rpartition(".")[0] not in macs
    )


def cooperative_breakdown(model: nn.Module, input_size: SizeLike = (512, 512)) -> dict[str, Any]:
    """Where a cooperative model's cost goes: each member as built (its receiving
    layers widened), the same member alone (no links), and what the links add in
    total (widening plus the links' own reduction convs)."""
    from ..models import create_model

    hw = _hw(input_size)
    macs = _macs_by_module(model, hw, None)
    members: dict[str, Any] = {}
    alone_params = alone_macs = 0
    for name, member in model.members.items():
        spec = dict(model.member_specs[name])
        arch = spec.pop("arch")
        with torch.device("meta"):
            alone = create_model(arch, **{**spec, "pretrained": False})
        a_params, a_macs = count_params(alone), _macs_by_module(alone, hw, "meta").get("", 0)
        alone_params, alone_macs = alone_params + a_params, alone_macs + a_macs
        members[name] = {
            "params_m": count_params(member) / 1e6,
            "gmacs": _subtree_macs(macs, f"members.{name}") / 1e9,
            "alone_params_m": a_params / 1e6,
            "alone_gmacs": a_macs / 1e9,
        }
    total_params, total_macs = count_params(model), macs.get("", 0)
    return {
        "members": members,
        "links": {
            "count": len(model.links),
            "params_m": (total_params - alone_params) / 1e6,
            "gmacs": (total_macs - alone_macs) / 1e9,
        },
        "total": {"params_m": total_params / 1e6, "gmacs": total_macs / 1e9},
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    model: nn.Module,
    input_size: SizeLike = (512, 512),
    batch: int = 1,
    device: DeviceLike = None,
    warmup: int = 3,
    iters: int = 10,
    in_chans: int = 3,
) -> dict[str, Any]:
    """Wall-clock time of eval-mode forward passes under ``no_grad``, in milliseconds.

    The median is the number to quote (robust to a stray slow pass); warm-up passes
    absorb lazy initialisation and cuDNN autotuning. On CUDA each pass is bracketed by
    ``torch.cuda.synchronize`` so the time covers the kernels, not just their launch.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    hw = _hw(input_size)
    times: list[float] = []
    with _eval_on(model, device) as dev, torch.no_grad():
        x = _input(batch, in_chans, hw, dev)
        for _ in range(max(warmup, 0)):
            model(x)
        _sync(dev)
        for _ in range(iters):
            start = time.perf_counter()
            model(x)
            _sync(dev)
            times.append((time.perf_counter() - start) * 1000.0)
    return {
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "iters": iters,
        "batch": batch,
        "device": str(dev),
    }


def profile_model(
    model: nn.Module,
    input_size: SizeLike = (512, 512),
    batch: int = 1,
    device: DeviceLike = None,
    latency: bool = True,
    warmup: int = 3,
    iters: int = 10,
    in_chans: int | None = None,
) -> dict[str, Any]:
    """One summary for logs and tables (``in_chans`` default: the model's own).

    ``gmacs`` is per image (a batch-1 pass, the papers' "GFLOPs"); ``batch`` applies
    to the latency measurement only. Keys: ``params``, ``params_m``,
    ``trainable_params``, ``macs``, ``gmacs``, ``input_size``, and with
    ``latency=True`` also ``latency_ms`` (median) and ``latency`` (all statistics).
    """
    hw = _hw(input_size)
    in_chans = in_chans or int(getattr(model, "in_chans", 3))
    params = count_params(model)
    macs = count_macs(model, hw, batch=1, device=device, in_chans=in_chans)
    out: dict[str, Any] = {
        "params": params,
        "params_m": params / 1e6,
        "trainable_params": count_params(model, trainable=True),
        "macs": macs,
        "gmacs": macs / 1e9,
        "input_size": list(hw),
    }
    if latency:
        lat = measure_latency(
            model, hw, batch=batch, device=device, warmup=warmup, iters=iters, in_chans=in_chans
        )
        out["latency_ms"] = lat["median_ms"]
        out["latency"] = lat
    return out


def config_input_size(cfg: Any) -> tuple[tuple[int, int], str]:
    """The image size a config works at, and the key it came from: the evaluation crop
    (``eval.crop_size`` in slide/center mode), else the training crop ``data.crop_size``.
    ``profile`` and ``export`` default to it, so a 128x128 config is not costed at 512x512."""
    if getattr(cfg.eval, "mode", "whole") != "whole" and cfg.eval.crop_size:
        return _hw(cfg.eval.crop_size), "eval.crop_size"
    if cfg.data.crop_size == "auto":  # the data decides, up to 512x512: cost the largest
        from ..data.sizes import AUTO_CROP_MAX

        return (AUTO_CROP_MAX, AUTO_CROP_MAX), "data.crop_size auto (its largest)"
    return _hw(cfg.data.crop_size), "data.crop_size"


def _default_arg(arch: str, name: str) -> Any:
    import inspect

    from ..models import ARCHITECTURES

    param = inspect.signature(ARCHITECTURES[arch].__init__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def model_summary(section: dict[str, Any]) -> dict[str, Any]:
    """What a model section builds, for a one-line title: ``arch``, ``backbone`` (None for
    an architecture without one; the constructor's default when the section omits it)
    and, for a cooperative model, each member's ``{name: {arch, backbone}}`` and the preset."""
    from ..models.cooperative import default_member_names

    arch = section["arch"]
    if arch != "cooperative":
        backbone = section.get("backbone", _default_arg(arch, "backbone"))
        return {"arch": arch, "backbone": backbone if isinstance(backbone, str) else None}
    specs = list(section.get("members") or [])
    names = default_member_names(len(specs))
    members = {
        str(spec.get("name", names[i])): model_summary(
            {k: v for k, v in spec.items() if k != "name"}
        )
        for i, spec in enumerate(specs)
    }
    preset = section.get("preset", _default_arg("cooperative", "preset"))
    return {"arch": arch, "backbone": None, "preset": preset, "members": members}


def summary_title(summary: dict[str, Any]) -> str:
    """``deeplabv3plus (resnet101)``, ``jointseg``, ``cooperative cross: top
    deeplabv3plus (xception65), bottom deeplabv3plus (resnet101)``."""
    if "members" in summary:
        parts = [f"{name} {summary_title(m)}" for name, m in summary["members"].items()]
        return f"cooperative {summary['preset']}: {', '.join(parts)}"
    backbone = summary.get("backbone")
    return f"{summary['arch']} ({backbone})" if backbone else summary["arch"]
