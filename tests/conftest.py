"""Shared fixtures: a tiny FashionScenes build and tiny configs, so the suite stays fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Test the checkout the tests live in (a git worktree beside an editable install of
# another one included), in this process and in the subprocesses the tests start.
_SRC = str(Path(__file__).resolve().parents[1] / "src")
if sys.path[0] != _SRC:
    sys.path.insert(0, _SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_SRC, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _SRC]]
)

from coopseg.config import Config, config_from_dict  # noqa: E402 (after the path above)

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64x64 FashionScenes, 48 train / 16 val scenes, built once per session."""
    from coopseg.data import build_fashionscenes

    root = tmp_path_factory.mktemp("fashionscenes")
    return build_fashionscenes(root, size=64, train=48, val=16, seed=0)


def tiny_config(root: Path, out_dir: Path, **sections: Any) -> Config:
    """A config small enough to train a few iterations in seconds on 2 cores."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "out_dir": str(out_dir),
        "device": "cpu",
        "model": {
            "arch": "deeplabv3plus",
            "backbone": "resnet18",
            "num_classes": 11,
            "aspp_channels": 32,
            "decoder_channels": 32,
            "low_level_channels": 16,
        },
        "data": {
            "root": str(root),
            "scene_size": 64,
            "train_scenes": 48,
            "val_scenes": 16,
            "batch_size": 4,
            "val_batch_size": 8,
            "crop_size": [48, 48],
        },
        "train": {"iterations": 6, "val_interval": 3, "checkpoint_interval": 3, "log_interval": 1},
    }
    for key, value in sections.items():
        if key == "model" and isinstance(value, dict) and "arch" in value:
            raw[key] = value  # another architecture: its own section, not a merge
        elif isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    return config_from_dict(raw)


TINY_MEMBER = {
    "arch": "deeplabv3plus",
    "backbone": "resnet18",
    "aspp_channels": 16,
    "decoder_channels": 16,
    "low_level_channels": 8,
}


def tiny_cooperative(preset: str = "cross", **extra: Any) -> dict[str, Any]:
    """The model section of a tiny cooperative pair (FashionScenes' 11 classes)."""
    return {
        "arch": "cooperative",
        "preset": preset,
        "num_classes": 11,
        "members": [dict(TINY_MEMBER), dict(TINY_MEMBER)],
        **extra,
    }


@pytest.fixture
def make_config(tiny_scenes: Path, tmp_path: Path):
    def factory(**sections: Any) -> Config:
        return tiny_config(tiny_scenes, tmp_path / "runs", **sections)

    return factory


def trained_weights(trainer: Any) -> dict[str, torch.Tensor]:
    """A copy of a trainer's model weights (to compare runs after training)."""
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Two state dicts bit-equal, key by key (resume and pre-emption equality)."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
