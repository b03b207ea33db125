"""Checkpoints load weights-only: a crafted ``.pt`` runs no code and is refused in one line."""

from __future__ import annotations

import pathlib
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coopseg.cli import main
from coopseg.engine.checkpoint import (
    CheckpointError,
    load_model,
    load_training_state,
    rng_state,
    set_rng_state,
)


class _TouchOnLoad:
    """Unpickling this calls ``Path.touch(marker)``: code run by merely loading a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    """A ``.pt`` shaped like a coopseg checkpoint whose unpickling creates ``marker``."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"model": _TouchOnLoad(marker), "config": {}, "info": {}}, path)
    return path, marker


def test_the_crafted_file_does_run_code_when_fully_unpickled(crafted) -> None:
    """Proves the payload is live, so the refusals below mean something."""
    path, marker = crafted
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("loader", [load_model, load_training_state])
def test_a_crafted_checkpoint_is_refused_without_running_code(crafted, loader) -> None:
    path, marker = crafted
    with pytest.raises(CheckpointError) as info:
        loader(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused to load") and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_cli_refuses_a_crafted_checkpoint_in_one_line(crafted, tmp_path, capsys, command) -> None:
    path, marker = crafted
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    if command == "predict":
        argv = ["predict", str(image), "--checkpoint", str(path), "--out", str(tmp_path / "o")]
    else:
        argv = ["eval", "--checkpoint", str(path), "--json", str(tmp_path / "m.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("coopseg: error: ") and str(path) in err
    assert not marker.exists()


def test_a_checkpoint_with_numpy_objects_is_refused(tmp_path) -> None:
    """The numpy RNG state older checkpoints pickled needs more than weights-only allows."""
    path = tmp_path / "old.pt"
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}}, path)
    with pytest.raises(CheckpointError, match=r"old\.pt: refused to load: it needs numpy"):
        load_training_state(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ([1, 2, 3], r"expected a dict with a 'model' entry, got list"),
        ({"config": {}}, r"'model' should be a mapping of parameter names to tensors"),
        ({"model": [torch.zeros(1)]}, r"'model' should be a mapping"),
        ({"model": {"w": 1}}, r"'model' entry 'w' is not a named tensor"),
    ],
)
def test_wrong_structures_are_refused_naming_the_file(tmp_path, content, expected) -> None:
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    pattern = rf"^{re.escape(str(path))}: not a coopseg checkpoint: {expected}"
    for loader in (load_model, load_training_state):
        with pytest.raises(CheckpointError, match=pattern):
            loader(path)


def test_a_training_state_without_rng_or_optimizer_is_refused(tmp_path) -> None:
    path = tmp_path / "last.pt"
    base = {
        "model": {"w": torch.zeros(2)},
        "config": {"model": {"arch": "fcn"}},
        "iteration": 3,
        "best_iteration": 0,
        "best_miou": -1.0,
        "agents": ["seg"],
        "optimizers": {"seg": {}},
        "schedulers": {"seg": {}},
        "scalers": {"seg": {}},
        "rng": rng_state(),
    }
    torch.save(base, path)
    assert load_training_state(path)["iteration"] == 3
    torch.save({**base, "optimizers": None}, path)
    with pytest.raises(CheckpointError, match="'optimizers' should be a mapping of agents"):
        load_training_state(path)
    torch.save({**base, "schedulers": {"cls": {}}}, path)
    with pytest.raises(CheckpointError, match=r"'schedulers' holds \['cls'\], not \['seg'\]"):
        load_training_state(path)
    old = {k: v for k, v in base.items() if k not in ("optimizers", "agents")}
    torch.save({**old, "optimizer": {}}, path)  # one optimizer: an older coopseg
    with pytest.raises(CheckpointError, match="older coopseg .* train.init_from="):
        load_training_state(path)
    torch.save({**base, "rng": {"torch": torch.get_rng_state()}}, path)
    with pytest.raises(CheckpointError, match="'rng' does not hold the RNG states"):
        load_training_state(path)


def test_a_truncated_checkpoint_is_one_line(tmp_path) -> None:
    path = tmp_path / "cut.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"cut\.pt: unreadable checkpoint") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = (random.random(), np.random.standard_normal(), torch.rand(3).tolist())
    set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.standard_normal(), torch.rand(3).tolist()) == expected
