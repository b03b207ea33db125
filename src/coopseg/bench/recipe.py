"""The fine-tuning recipe every pretrained bench shares (the demo's, scaled to the
bench's budget): only the model section and the seed differ between a bench's runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


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
            "amp": "auto",
            "channels_last": True,
            "val_interval": 0,
            "checkpoint_interval": 0,
            "log_interval": 50,
        },
    }
