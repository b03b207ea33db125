"""Backbones: timm ``features_only`` models plus honest pretrained-weight loading.

Every architecture asks for feature maps by *reduction* (stride w.r.t. the input),
not by layer name, so any timm CNN whose ``feature_info`` has the strides needed
works (resnet18/50/101, xception65, ...).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

PretrainedArg = bool | str | os.PathLike | None


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be had; the message says what to do."""


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_file(name: str) -> Path | None:
    """The already-downloaded weights of timm model ``name``, if the HF cache has them."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    hub_id = timm.get_pretrained_cfg(name).to_dict().get("hf_hub_id") if _known(name) else None
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _known(name: str) -> bool:
    try:
        return timm.get_pretrained_cfg(name) is not None
    except Exception:
        return False


def create_backbone(
    name: str,
    *,
    out_indices: tuple[int, ...] | None = None,
    output_stride: int = 32,
    pretrained: PretrainedArg = False,
    in_chans: int = 3,
) -> nn.Module:
    """A timm ``features_only`` backbone.

    ``pretrained``: ``False``/``None`` (random init), ``True`` (ImageNet weights through
    timm: taken from the local Hugging Face cache when present, downloaded otherwise,
    and a clear error within seconds when offline), or a path to a local ``.safetensors``
    / ``.pth`` file holding the timm model's state dict (classifier keys are ignored).
    """
    kwargs: dict = {"features_only": True, "in_chans": in_chans}
    if out_indices is not None:
        kwargs["out_indices"] = out_indices
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    if name not in timm.list_models():
        raise ValueError(
            f"unknown backbone {name!r}: not a timm model name (see timm.list_models())"
        )
    if pretrained is True:
        cached = _cached_hub_file(name)
        if cached is not None:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}, **kwargs
            )
        if not _hub_reachable():
            raise PretrainedWeightsError(
                f"ImageNet weights for backbone {name!r} are not in the local cache and the "
                "Hugging Face hub cannot be reached (offline or HF_HUB_OFFLINE=1). Download "
                "them on a connected machine, or pass pretrained='/path/to/weights.safetensors' "
                "(a timm state dict), or pretrained=false to start from random init."
            )
        return timm.create_model(name, pretrained=True, **kwargs)
    if pretrained:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(f"pretrained weights file {path} does not exist")
        if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
            raise PretrainedWeightsError(
                f"pretrained weights file {path}: expected .safetensors, .pth, .pt or .bin"
            )
        backbone = timm.create_model(name, pretrained=False, **kwargs)
        load_backbone_file(backbone, path, name)
        return backbone
    return timm.create_model(name, pretrained=False, **kwargs)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedWeightsError(
            f"pretrained weights file {path} is unreadable: {err}"
        ) from err
    for key in ("state_dict", "model"):  # common wrappers of training checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"pretrained weights file {path} holds no state dict")
    return state


def load_backbone_file(backbone: nn.Module, path: Path, name: str) -> None:
    """Load a timm state dict strictly: every backbone weight must come from the file.

    The classifier of the full model (absent from ``features_only``) is ignored; any
    other missing, unexpected or mis-shaped key means the file is for another network.
    """
    state = {k.removeprefix("module."): v for k, v in _read_state_dict(path).items()}
    classifier = timm.get_pretrained_cfg(name).to_dict().get("classifier") if _known(name) else None
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])
    state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in heads if h)}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mis_shaped:
        raise PretrainedWeightsError(
            f"pretrained weights file {path} does not fit backbone {name!r}: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:3]}, {len(mis_shaped)} mis-shaped keys {mis_shaped[:3]}"
        )
    backbone.load_state_dict(state, strict=True)


def feature_index(backbone: nn.Module, reduction: int) -> int:
    """Index of the deepest feature map whose stride equals ``reduction``."""
    reductions = backbone.feature_info.reduction()
    matches = [i for i, r in enumerate(reductions) if r == reduction]
    if not matches:
        raise ValueError(f"backbone has no feature map at stride {reduction} (has {reductions})")
    return matches[-1]


def resolve_encoder(
    encoder: str | nn.Module,
    *,
    pretrained: PretrainedArg = False,
    output_stride: int = 32,
) -> nn.Module:
    """An encoder from a timm model name (via ``create_backbone``) or a ready-made module.

    The encoder protocol that every architecture relies on, and that a timm
    ``features_only`` model already follows:

    - ``encoder(x)`` returns a list (or tuple) of feature maps, ordered shallow to deep;
    - ``encoder.feature_info.channels()`` and ``encoder.feature_info.reduction()`` each
      return one integer per map: its channel count and its stride w.r.t. the input.

    A module (e.g. JointSeg's shared encoder) is used as is: it owns its weights, so
    ``pretrained`` must be false, and ``output_stride`` is not applied to it. Its
    ``feature_info`` is checked here so a malformed encoder fails at construction.
    """
    if isinstance(encoder, str):
        return create_backbone(encoder, output_stride=output_stride, pretrained=pretrained)
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be a timm model name or an nn.Module, got {encoder!r}")
    if pretrained:
        raise ValueError(
            "pretrained applies to timm encoder names only; a module encoder brings its "
            "own weights (load them into it before passing it)"
        )
    info = getattr(encoder, "feature_info", None)
    if not all(callable(getattr(info, method, None)) for method in ("channels", "reduction")):
        raise TypeError(
            f"{type(encoder).__name__} is not an encoder: it needs a timm-style feature_info "
            "with .channels() and .reduction() (one int per returned feature map)"
        )
    channels, reductions = list(info.channels()), list(info.reduction())
    if not channels or len(channels) != len(reductions):
        raise ValueError(
            f"{type(encoder).__name__}.feature_info: channels {channels} and reductions "
            f"{reductions} must be non-empty and of equal length"
        )
    return encoder
