"""Checkpoints: full training state (``.pt``) and shareable weights (``.safetensors``).

Both are written to a temporary file in the target folder and moved into place
with ``os.replace``, so a crash mid-write never leaves a truncated checkpoint.

A ``.pt`` file is a pickle, and unpickling can run any code the file names, so
every ``.pt`` is read with ``torch.load(weights_only=True)``: tensors and plain
Python values only. What coopseg writes stays within that (the RNG states are
stored as tensors and lists, not numpy arrays and tuples), so no type needs to
be allow-listed with ``torch.serialization.add_safe_globals``. A file that needs
more, or that does not have the structure coopseg writes, is refused with a
:class:`CheckpointError` naming it.
"""

from __future__ import annotations

import json
import pickle
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..config import Config, ConfigError, config_from_dict, model_kwargs
from ..fileio import atomic_write
from ..models import TappedNetwork, create_model


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit; the message names the file."""


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, so a weights-only load accepts it."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": _python_rng_to_list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_rng_to_list(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (turning lists back into the tuples RNGs want)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["bit_generator"],
            np_state["key"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _one_line(err: BaseException) -> str:
    """The gist of an error on one line (torch's weights-only refusals span many)."""
    text = str(err)
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsupported:
        return f"it needs {unsupported.group(1)}, which a weights-only load does not allow"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line if len(line) <= 200 else line[:197] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _torch_load(path: Path) -> Any:
    """``torch.load`` that never unpickles arbitrary objects; refusals name the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err) or "WeightsUnpickler" in str(err):
            raise CheckpointError(
                f"{path}: refused to load: {_one_line(err)} "
                "(the .pt files coopseg writes need no such objects)"
            ) from err
        raise CheckpointError(f"{path}: unreadable checkpoint ({_one_line(err)})") from err
    except Exception as err:  # truncated, or not written by torch.save
        raise CheckpointError(
            f"{path}: unreadable checkpoint, truncated or not written by torch.save "
            f"({_one_line(err)})"
        ) from err


def _check_mapping(path: Path, state: Mapping[str, Any], key: str, what: str) -> Any:
    value = state.get(key)
    if not isinstance(value, Mapping):
        raise CheckpointError(
            f"{path}: not a coopseg checkpoint: {key!r} should be {what}, "
            f"got {type(value).__name__}"
        )
    return value


def _check_structure(path: Path, state: Any) -> dict[str, Any]:
    """The top level every coopseg ``.pt`` shares: a dict with a ``model`` of tensors."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: not a coopseg checkpoint: expected a dict with a 'model' entry, "
            f"got {type(state).__name__}"
        )
    weights = _check_mapping(path, state, "model", "a mapping of parameter names to tensors")
    bad = next(
        (k for k, v in weights.items() if not (isinstance(k, str) and torch.is_tensor(v))), None
    )
    if bad is not None:
        raise CheckpointError(
            f"{path}: not a coopseg checkpoint: 'model' entry {bad!r} is not a named tensor"
        )
    return state


def _check_rng(path: Path, rng: Any) -> None:
    """The RNG states :func:`rng_state` writes, so a bad one fails here and not mid-restore."""
    np_state = rng.get("numpy") if isinstance(rng, Mapping) else None
    py_state = rng.get("python") if isinstance(rng, Mapping) else None
    ok = (
        isinstance(rng, Mapping)
        and torch.is_tensor(rng.get("torch"))
        and isinstance(np_state, Mapping)
        and torch.is_tensor(np_state.get("key"))
        and all(isinstance(np_state.get(k), int) for k in ("pos", "has_gauss"))
        and isinstance(np_state.get("gauss"), float)
        and isinstance(np_state.get("bit_generator"), str)
        and isinstance(py_state, list | tuple)
        and len(py_state) == 3
        and isinstance(py_state[1], list | tuple)
    )
    if not ok:
        raise CheckpointError(
            f"{path}: 'rng' does not hold the RNG states coopseg writes "
            "(a checkpoint from another program, or from an older coopseg)"
        )


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept (``last.pt`` -> ``last.prev.pt``)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``last.pt``, keeping the one it replaces as ``last.prev.pt`` until the new one
    is whole and in place: a crash at any moment leaves at least one good checkpoint,
    and a newest one that turns out corrupt still has a predecessor to fall back on."""
    try:
        atomic_write(path, lambda fh: torch.save(state, fh), previous_checkpoint(path))
    except OSError as err:
        raise CheckpointError(f"could not save the training state: {err.strerror}") from err


def resume_state(checkpoint: Path, mode: bool | str) -> tuple[dict[str, Any] | None, str]:
    """The training state to resume from, and a line saying which file it came from.

    ``mode`` True: there must be one; ``"auto"``: start fresh (None) when there is none,
    so one command line serves the first start and every restart. The newest readable
    of ``last.pt`` and ``last.prev.pt`` wins; an unreadable newest one is named and
    skipped. Refused when files exist but none can be read (nothing is overwritten).
    """
    candidates = [p for p in (checkpoint, previous_checkpoint(checkpoint)) if p.exists()]
    if not candidates:
        if mode == "auto":
            return None, f"no checkpoint at {checkpoint}: starting a new run"
        raise CheckpointError(f"no checkpoint to resume from at {checkpoint}")
    problems: list[str] = []
    for path in candidates:
        try:
            state = load_training_state(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        note = f"resuming from {path} (iteration {state['iteration']})"
        if problems:
            note += "; skipped " + "; ".join(problems)
        return state, note
    raise CheckpointError("no readable checkpoint to resume from: " + "; ".join(problems))


def load_training_state(path: Path) -> dict[str, Any]:
    """A ``last.pt`` for ``--resume``: loaded weights-only and checked for its structure."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}")
    state = _check_structure(path, _torch_load(path))
    config = _check_mapping(path, state, "config", "the run's config")
    if not isinstance(config.get("model"), Mapping):
        raise CheckpointError(f"{path}: its config has no model section")
    if not isinstance(state.get("history", []), list):
        raise CheckpointError(f"{path}: 'history' should be a list")
    for key in ("iteration", "best_iteration"):
        if not isinstance(state.get(key), int):
            raise CheckpointError(f"{path}: {key!r} should be an integer, got {state.get(key)!r}")
    if not isinstance(state.get("best_miou"), float | int):
        raise CheckpointError(f"{path}: 'best_miou' should be a number")
    if "optimizer" in state and "optimizers" not in state:
        raise CheckpointError(
            f"{path}: written by an older coopseg (one optimizer entry), so it cannot be "
            "resumed; start from its weights with --set train.init_from=" + str(path)
        )
    agents = state.get("agents")
    if not isinstance(agents, list) or not all(isinstance(a, str) for a in agents):
        raise CheckpointError(f"{path}: 'agents' should be a list of agent names")
    for key in ("optimizers", "schedulers", "scalers"):  # one state dict per agent
        per_agent = _check_mapping(path, state, key, "a mapping of agents to state dicts")
        if sorted(per_agent) != sorted(agents):
            raise CheckpointError(f"{path}: {key!r} holds {sorted(per_agent)}, not {agents}")
    _check_rng(path, state.get("rng"))
    return state


def save_weights(
    path: Path, model: torch.nn.Module, cfg: Config, info: dict[str, Any] | None = None
) -> None:
    """Weights plus what is needed to rebuild and use the model (config, class names)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"config": json.dumps(cfg.to_dict())}
    for key, value in (info or {}).items():
        metadata[key] = json.dumps(value)
    try:
        atomic_write(path, lambda fh: fh.write(save(tensors, metadata=metadata)))
    except OSError as err:
        raise CheckpointError(f"could not save weights: {err.strerror}") from err


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[TappedNetwork, Config, dict[str, Any]]:
    """Rebuild a trained model from a ``.safetensors`` or ``.pt`` checkpoint, or from a
    model folder written by ``save_pretrained`` (or a Hub repo id of one, see
    :mod:`coopseg.hub`).

    Returns the model (eval mode), its config, and the extra info saved with it
    (``class_names``, ``palette``, ``metrics`` where present).
    """
    path = Path(path)
    if path.is_dir() or not path.exists():
        from ..hub import is_repo_id, read_folder, resolve

        if path.is_dir() or is_repo_id(str(path)):
            folder = resolve(path)
            weights_path, raw_cfg, info = read_folder(folder)
            weights = _read_safetensors(weights_path)[0]
            return _build_model(folder, weights, raw_cfg, info, device)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        weights, info = _read_safetensors(path)
        raw_cfg = info.pop("config", None)
    else:  # a .pt: weights-only, then the structure coopseg writes
        state = _check_structure(path, _torch_load(path))
        weights, raw_cfg, info = state["model"], state.get("config"), state.get("info", {})
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: 'info' should be a mapping, got {type(info).__name__}")
    return _build_model(path, weights, raw_cfg, info, device)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and JSON metadata of a ``.safetensors`` file; unreadable: one line."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        return load_file(str(path)), {k: json.loads(v) for k, v in meta.items()}
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({_one_line(err)})") from err


def _build_model(
    path: Path,
    weights: Mapping[str, torch.Tensor],
    raw_cfg: Any,
    info: dict[str, Any],
    device: str | torch.device,
) -> tuple[TappedNetwork, Config, dict[str, Any]]:
    """The model ``raw_cfg`` describes (``create_model``), with ``weights`` loaded strictly."""
    if raw_cfg is None:
        raise CheckpointError(f"{path}: holds no config; was it written by coopseg?")
    try:
        cfg = config_from_dict(raw_cfg)
        arch, kwargs = model_kwargs(cfg.model)
        kwargs["pretrained"] = False
        model = create_model(arch, **kwargs)
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its config does not describe a model: {err}") from err
    model.coopseg_config = dict(cfg.model)  # as configured (``pretrained`` included)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shapes that do not fit
        raise CheckpointError(
            f"{path}: weights do not fit the {arch} model its config describes ({_one_line(err)})"
        ) from err
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the {arch} model its config describes "
            f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})"
        )
    if isinstance(info.get("output"), str):  # best-<output>.safetensors: that output
        from ..models.cooperative import select_output

        try:
            select_output(model, info["output"])
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from err
    return model.to(device).eval(), cfg, info


def _names(keys: list[str]) -> str:
    """At most five names, then how many more: one readable line for any mismatch."""
    shown = ", ".join(keys[:5])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > 5 else shown


def init_model_from(model: torch.nn.Module, path: str | Path) -> None:
    """Overwrite every weight of ``model`` with those of a coopseg checkpoint
    (``train.init_from``: a ``.safetensors`` or a ``last.pt``), before training starts.

    Whole-model initialisation, e.g. DF-DAM's fine-tune on VOC trainval from its
    train_aug run. Read safely (safetensors, or ``torch.load(weights_only=True)``) and
    all or nothing: a missing file, a missing or extra parameter, or a shape that
    differs is refused with one line naming the file, before the model is touched.
    BatchNorm's ``num_batches_tracked`` counters may be absent on either side (frozen BN
    has none; they do not affect the outputs).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there to initialise the model from")
    if path.suffix == ".safetensors":
        try:
            weights: Mapping[str, torch.Tensor] = load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{path}: unreadable checkpoint ({_one_line(err)})") from err
    else:  # a .pt: weights-only, then the structure coopseg writes
        weights = _check_structure(path, _torch_load(path))["model"]
    own = model.state_dict()

    def counter(key: str) -> bool:
        return key.endswith("num_batches_tracked")

    missing = [k for k in own if k not in weights and not counter(k)]
    unexpected = [k for k in weights if k not in own and not counter(k)]
    if missing or unexpected:
        parts = [f"missing {_names(missing)}" if missing else ""]
        parts.append(f"unexpected {_names(unexpected)}" if unexpected else "")
        raise CheckpointError(
            f"{path}: weights do not fit the model to initialise "
            f"({'; '.join(p for p in parts if p)}); is it a checkpoint of the same model?"
        )
    wrong = [
        f"{k} {tuple(weights[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckpointError(
            f"{path}: weights do not fit the model to initialise: {wrong[0]}{more}"
        )
    model.load_state_dict(dict(weights), strict=False)
