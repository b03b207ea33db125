"""Checkpoints: full training state (``.pt``) and shareable weights (``.safetensors``).

Both are written to a temporary file in the target folder and moved into place
with ``os.replace``, so a crash mid-write never leaves a truncated checkpoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..config import Config, config_from_dict, model_kwargs
from ..fileio import atomic_write
from ..models import TappedNetwork, create_model


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit; the message names the file."""


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda fh: torch.save(state, fh))


def load_training_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or foreign file
        raise CheckpointError(f"{path}: unreadable checkpoint ({err})") from err


def save_weights(
    path: Path, model: torch.nn.Module, cfg: Config, info: dict[str, Any] | None = None
) -> None:
    """Weights plus what is needed to rebuild and use the model (config, class names)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"config": json.dumps(cfg.to_dict())}
    for key, value in (info or {}).items():
        metadata[key] = json.dumps(value)
    atomic_write(path, lambda fh: fh.write(save(tensors, metadata=metadata)))


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[TappedNetwork, Config, dict[str, Any]]:
    """Rebuild a trained model from a ``.safetensors`` or ``.pt`` checkpoint.

    Returns the model (eval mode), its config, and the extra info saved with it
    (``class_names``, ``palette``, ``metrics`` where present).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            weights = load_file(str(path))
            info = {k: json.loads(v) for k, v in meta.items()}
            raw_cfg = info.pop("config", None)
        else:
            state = torch.load(path, map_location="cpu", weights_only=False)
            weights, raw_cfg, info = state["model"], state.get("config"), state.get("info", {})
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({err})") from err
    if raw_cfg is None:
        raise CheckpointError(f"{path}: holds no config; was it written by coopseg?")
    cfg = config_from_dict(raw_cfg)
    arch, kwargs = model_kwargs(cfg.model)
    kwargs["pretrained"] = False
    model = create_model(arch, **kwargs)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the {arch} model its config describes "
            f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})"
        )
    return model.to(device).eval(), cfg, info
