"""The fine-tuning recipe every pretrained bench shares (the demo's, scaled to the
bench's budget): only the model section and the seed differ between a bench's runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def overlay_settings(
    modes: Mapping[str, Mapping[str, Any]],
    mode: str,
    settings: Mapping[str, Any] | None,
    keys: Sequence[str],
    ignore: Sequence[str] = (),
) -> dict[str, Any]:
    """A bench mode's settings with ``settings`` laid over them (None values and the
    ``ignore`` keys skipped); an unknown mode or key is an error naming it."""
    if mode not in modes:
        raise ValueError(f"mode must be one of {list(modes)}, got {mode!r}")
    extra = {k: v for k, v in (settings or {}).items() if v is not None and k not in ignore}
    unknown = sorted(set(extra) - set(keys))
    if unknown:
        raise ValueError(f"unknown bench setting {unknown[0]!r}; one of {list(keys)}")
    return {**modes[mode], **extra}


def fine_tune_sections(s: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``data`` and ``train`` sections for the bench settings ``s`` (scene size,
    scenes, batch per member, iterations, lr, warm-up, frozen stages)."""
    size = s["scene_size"]
    return {
        "data": {
            "dataset": "fashionscenes",
            "scene_size": size,
            "train_scenes": s["train_scenes"],
            "val_scenes": s["val_scenes"],
            "batch_size": s["batch_size"],  # per member: every member sees the same images
            "val_batch_size": 25,
            "crop_size": [size, size],
            "scale_range": [1.0, 1.0],
            "hflip": True,
        },
        "train": {
            "iterations": s["iterations"],
            "optimizer": "adamw",
            "lr": s["lr"],
            "weight_decay": 1e-4,
            "poly_power": 0.9,
            "warmup_iterations": s["warmup_iterations"],
            "frozen_stages": s["frozen_stages"],
            # fp32 on every machine: `auto` picks bf16 by CPU (and by a timed probe), and
            # a run's result must not depend on the machine that trained it
            "amp": "none",
            "channels_last": True,
            "val_interval": s.get("val_interval", 0),
            "checkpoint_interval": 0,
            "log_interval": 50,
        },
    }
