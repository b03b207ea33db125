"""``coopseg report``: one self-contained HTML page that shows what a run learned.

The page holds the resolved config, the learning curves (``log.jsonl``), the per-class
IoU table and chart (every output of a cooperative model side by side), the confusion
matrix, a prediction grid with an error column (and the members' disagreement), and the
attention of DANet / DF-DAM models. Every picture is a ``data:`` URI (PNG from Pillow or
matplotlib's Agg canvas, no pyplot state), the page has no script and loads nothing, so
it can be mailed, archived or opened offline. The metrics come from the run's
``eval.json`` (``coopseg eval``) or ``metrics.json`` (``coopseg demo``) when one was
written for this checkpoint; otherwise the checkpoint is evaluated on the val set here.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .explain import (
    FUSED,
    Explanation,
    analyse,
    attention_pictures,
    dafm_figure,
    display_scale,
    figure_png,
    png_bytes,
    who_is_right,
)
from .visualize import (
    DISAGREE_COLOUR,
    ERROR_COLOUR,
    NONE_RIGHT_COLOUR,
    SEVERAL_RIGHT_COLOUR,
    colorize,
    disagreement_map,
    display_rgb,
    error_map,
    member_colour,
    upscale,
)

CHECKPOINT_NAMES = ("best.safetensors", "final.safetensors")
METRICS_FILES = ("checkpoints/eval.json", "metrics.json", "eval.json")
MAX_SIDE = 384  # longest side of a picture in the page (larger scenes are shrunk)


def data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:`` URI, so the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def pct(value: float | None) -> str:
    """A fraction as the tables show it: percent with two decimals, "—" if undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100.0 * value:.2f}"


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint belongs to (``RUN/checkpoints/x`` -> ``RUN``)."""
    parent = Path(checkpoint).resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def find_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a report shows: best, else final weights of the run."""
    from .engine.checkpoint import CheckpointError

    for name in CHECKPOINT_NAMES:
        path = run_dir / "checkpoints" / name
        if path.is_file():
            return path
    raise CheckpointError(
        f"{run_dir}: no checkpoints/{' or '.join(CHECKPOINT_NAMES)}; is it a run folder? "
        "(pass --checkpoint to pick a file)"
    )


def read_log(path: Path) -> list[dict[str, Any]]:
    """``log.jsonl`` records; a resumed run logs some steps twice: the later one wins."""
    if not path.is_file():
        return []
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(rec, dict) and "kind" in rec and "step" in rec:
            records[(rec["kind"], rec["step"])] = rec
    return sorted(records.values(), key=lambda r: (r["step"], r.get("time", 0)))


def find_metrics(
    run_dir: Path, checkpoint: Path, explicit: Path | None = None
) -> tuple[dict[str, Any] | None, str]:
    """Saved metrics of ``checkpoint`` with a confusion matrix, and where they came from.

    A file for another checkpoint, one older than the checkpoint (written before the
    weights changed) or one without ``matrix`` is passed over (None: evaluate)."""
    if explicit is not None:
        return json.loads(explicit.read_text()), str(explicit)
    for name in METRICS_FILES:
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or "matrix" not in data:
            continue
        if Path(str(data.get("checkpoint", ""))).name != checkpoint.name:
            continue
        if path.stat().st_mtime < checkpoint.stat().st_mtime:
            continue
        return data, str(path)
    return None, ""


def evaluate_for_report(cfg: Any, model: torch.nn.Module, checkpoint: Path, val_set: Any, device):
    """The dict ``coopseg eval`` writes to ``eval.json``, computed in this process."""
    from .engine.distributed import DistInfo
    from .engine.evaluate import evaluation_report

    return evaluation_report(cfg, model, checkpoint, val_set, DistInfo(0, 1, 0, device))[0]


# --- charts -----------------------------------------------------------------------------


def output_colour(label: str, members: Sequence[str]) -> str:
    """One colour per output in every chart: members as in the pictures, fused grey."""
    if label in members:
        r, g, b = member_colour(members.index(label))
        return f"#{r:02x}{g:02x}{b:02x}"
    return "#444444" if label == FUSED else "#1f77b4"


def curves_figure(records: Sequence[dict[str, Any]], members: Sequence[str]) -> bytes | None:
    """Loss, learning rate and validation mIoU over iterations (None: nothing logged)."""
    from matplotlib.figure import Figure

    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    if not train and not val:
        return None
    fig = Figure(figsize=(12, 3.2), layout="constrained")
    ax_loss, ax_lr, ax_val = fig.subplots(1, 3)
    steps = [r["step"] for r in train]
    parts = sorted({k for r in train for k in r if k.startswith("loss_")})
    if train:
        ax_loss.plot(steps, [r.get("loss") for r in train], label="loss", color="black")
        for key in parts:
            ax_loss.plot(steps, [r.get(key, np.nan) for r in train], lw=0.8, ls="--", label=key[5:])
        ax_lr.plot(steps, [r.get("lr") for r in train], color="tab:green")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if parts:
        ax_loss.legend(fontsize=7)
    ax_loss.set_title("training loss", fontsize=10)
    ax_lr.set_title("learning rate", fontsize=10)
    if val:
        vsteps = [r["step"] for r in val]
        ax_val.plot(vsteps, [100 * r["miou"] for r in val], "o-", color="black", label="mIoU")
        keys = sorted({k for r in val for k in r if k.startswith("miou_")})
        for key in keys:
            label = key[5:]
            ax_val.plot(
                vsteps,
                [100 * r.get(key, np.nan) for r in val],
                "o--",
                ms=3,
                lw=1,
                color=output_colour(label, members),
                label=label,
            )
        ax_val.legend(fontsize=7)
    ax_val.set_title("validation mIoU %", fontsize=10)
    for ax in (ax_loss, ax_lr, ax_val):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    return figure_png(fig)


def iou_figure(
    class_names: Sequence[str], ious: dict[str, list[float | None]], members: Sequence[str]
) -> bytes:
    """Per-class IoU bars, one bar per output and class."""
    from matplotlib.figure import Figure

    k, n = len(class_names), len(ious)
    fig = Figure(figsize=(max(6.0, 0.3 * k * n + 1.5), 3.6), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / n
    xs = np.arange(k)
    for i, (label, values) in enumerate(ious.items()):
        heights = [100 * v if v is not None else 0.0 for v in values]
        ax.bar(
            xs + (i - (n - 1) / 2) * width,
            heights,
            width,
            label=label,
            color=output_colour(label, members),
        )
    ax.set_xticks(
        xs, list(class_names), rotation=45 if k > 6 else 0, ha="right" if k > 6 else "center"
    )
    ax.set_ylabel("IoU %")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    if n > 1:
        ax.legend(fontsize=8, ncols=n)
    return figure_png(fig)


def confusion_figure(matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> bytes:
    """Row-normalised confusion matrix (rows: ground truth, so the diagonal is recall)."""
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    k = len(class_names)
    side = max(4.5, 0.42 * k + 2.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(100 * norm, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(k), list(class_names), rotation=90)
    ax.set_yticks(range(k), list(class_names))
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if norm[i, j] >= 0.005:
                    ax.text(
                        j,
                        i,
                        f"{100 * norm[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="% of the class's pixels")
    return figure_png(fig)


# --- pictures ---------------------------------------------------------------------------


def shrink(image: np.ndarray, max_side: int = MAX_SIDE, nearest: bool = True) -> np.ndarray:
    """A picture no larger than ``max_side`` (keeps small scenes as they are)."""
    from PIL import Image

    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    f = max_side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize(size, resample))


@dataclass
class Sample:
    """One val image with its prediction analysis."""

    name: str
    rgb: np.ndarray
    target: np.ndarray
    expl: Explanation


def analyse_samples(
    model: torch.nn.Module, val_set: Any, cfg: Any, device: torch.device, count: int
) -> list[Sample]:
    """The first ``count`` val images through the model (plain single-scale inference),
    with the attention recorded; query pixels are chosen on the ground truth. The
    pictures use the raw image, whatever normalisation the model input had."""
    out = []
    for i in range(min(count, len(val_set))):
        x, y = val_set[i]
        target = y.numpy().astype(np.uint8)
        expl = analyse(model, x[None].to(device), target)
        rgb = np.ascontiguousarray(display_rgb(val_set.load(i)[0], cfg.data.rgb_bands))
        out.append(Sample(val_set.sample_name(i), rgb, target, expl))
    return out


def grid_section(samples: Sequence[Sample], palette: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Columns image | ground truth | every output | errors | (disagreement)."""
    if not samples:
        return {}
    expl = samples[0].expl
    outputs = list(expl.predictions)
    members = expl.members
    columns = ["image", "ground truth", *outputs, f"errors ({expl.headline})"]
    if members:
        columns.append("members disagree: who is right")
    rows = []
    counts: dict[str, int] = {}
    for s in samples:
        pictures = [s.rgb, colorize(s.target, palette)]
        pictures += [colorize(s.expl.predictions[o], palette) for o in outputs]
        pictures.append(error_map(s.rgb, s.target, s.expl.predictions[s.expl.headline]))
        if members:
            preds = [s.expl.predictions[m] for m in members]
            pictures.append(disagreement_map(s.rgb, preds, s.target))
            for key, n in who_is_right(preds, s.target, members).items():
                counts[key] = counts.get(key, 0) + n
        h, w = shrink(s.rgb).shape[:2]
        rows.append(
            {
                "name": s.name,
                "cells": [data_uri(png_bytes(shrink(p))) for p in pictures],
                "width": w * max(1, 160 // max(h, w)),  # small scenes: shown enlarged
            }
        )
    legend = [("wrong pixel", ERROR_COLOUR)]
    if members:
        legend += [(f"only {m} right", member_colour(i)) for i, m in enumerate(members)]
        legend += [("several right", SEVERAL_RIGHT_COLOUR), ("none right", NONE_RIGHT_COLOUR)]
    return {
        "columns": columns,
        "rows": rows,
        "legend": [{"label": label, "colour": "rgb({},{},{})".format(*c)} for label, c in legend],
        "who_is_right": counts,
    }


def attention_section(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Per attention owner: DAFM weights over the shown images, β and PAM pictures."""
    if not samples:
        return []
    owners: dict[str, dict[str, Any]] = {}
    labels = [s.name for s in samples]
    first = samples[0].expl
    for owner in first.alpha_high:
        owners.setdefault(owner, {"owner": owner, "kinds": [], "chart": None, "pictures": []})
        owners[owner]["kinds"].append("DF-DAM")
        owners[owner]["chart"] = data_uri(
            dafm_figure(
                np.stack([s.expl.alpha_high[owner] for s in samples]),
                np.stack([s.expl.alpha_low[owner] for s in samples]),
                labels,
            )
        )
    for s in samples:
        size = s.rgb.shape[:2]
        shown = shrink(upscale(s.rgb, display_scale(size, 192)), nearest=False)
        for pic in attention_pictures(s.expl, shown, size, dafm=False):
            owner = owners.setdefault(
                pic.group, {"owner": pic.group, "kinds": [], "chart": None, "pictures": []}
            )
            kind = "DANet" if pic.name.startswith("pam_") else "DF-DAM"
            if kind not in owner["kinds"]:
                owner["kinds"].append(kind)
            owner["pictures"].append(
                {"uri": data_uri(pic.png), "caption": f"{s.name}: {pic.caption}"}
            )
    return list(owners.values())


# --- the page ---------------------------------------------------------------------------


def _template():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("coopseg", "templates"),
        autoescape=select_autoescape(("html", "j2")),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2")


def class_table(metrics: dict[str, Any]) -> dict[str, Any]:
    """Rows of the per-class table: IoU of every output, accuracy and pixel counts of the
    headline one, then mIoU / pixel accuracy / mean accuracy."""
    outputs = metrics.get("outputs") or {metrics.get("output", "out"): metrics}
    labels = list(outputs)
    names = list(metrics["classes"])
    rows = []
    for name in names:
        c = metrics["classes"][name]
        rows.append(
            {
                "name": name,
                "ious": [pct(outputs[o]["classes"][name]["iou"]) for o in labels],
                "acc": pct(c.get("acc")),
                "gt_pixels": f"{c.get('gt_pixels', 0):,}",
                "pred_pixels": f"{c.get('pred_pixels', 0):,}",
            }
        )
    totals = [
        {"name": title, "values": [pct(outputs[o].get(key)) for o in labels]}
        for title, key in (("mIoU", "miou"), ("pixel acc", "pixel_acc"), ("mean acc", "mean_acc"))
    ]
    ious = {o: [outputs[o]["classes"][n]["iou"] for n in names] for o in labels}
    return {"outputs": labels, "rows": rows, "totals": totals, "ious": ious, "names": names}


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    checkpoint: str | Path | None = None,
    metrics_path: str | Path | None = None,
    cfg: Any = None,
    output: str | None = None,
    device: str = "auto",
    rows: int = 4,
    attention_rows: int = 2,
) -> Path:
    """Write the HTML report of a run folder (default ``RUN_DIR/report.html``); return it.

    ``checkpoint``: the weights shown (default best, else final). ``metrics_path``: a
    metrics JSON to use as is (``coopseg eval --report`` passes the one it wrote).
    ``cfg``: the config to read data and eval settings from (default: the checkpoint's).
    ``output``: a cooperative model's headline output (default: the checkpoint's).
    """
    from .data import build_dataset
    from .data.base import DataError
    from .engine.checkpoint import load_model
    from .engine.distributed import resolve_device

    run = Path(run_dir)
    ckpt = Path(checkpoint) if checkpoint else find_checkpoint(run)
    dev = resolve_device(device)
    model, ckpt_cfg, info = load_model(ckpt, dev)
    if output is not None:
        from .models.cooperative import select_output

        select_output(model, output)
    cfg = cfg or ckpt_cfg
    palette = info.get("palette") or [[0, 0, 0]]
    notes: list[str] = []

    metrics, source = find_metrics(run, ckpt, Path(metrics_path) if metrics_path else None)
    val_set = None
    try:
        val_set = build_dataset(cfg.data, "val")
    except DataError as err:
        if metrics is None:
            raise
        notes.append(f"no prediction grid or attention: the val set is not readable ({err})")
    if metrics is None:
        metrics = evaluate_for_report(cfg, model, ckpt, val_set, dev)
        source = "computed for this report (no eval.json for this checkpoint)"
    if "matrix" not in metrics and val_set is not None:
        metrics = evaluate_for_report(cfg, model, ckpt, val_set, dev)
        source += "; confusion matrix computed for this report"

    samples = analyse_samples(model, val_set, cfg, dev, rows) if val_set is not None else []
    members = samples[0].expl.members if samples else []
    if not members and isinstance(metrics.get("outputs"), dict):
        members = [o for o in metrics["outputs"] if o != FUSED]
    table = class_table(metrics)
    headline = metrics.get("output") or table["outputs"][0]

    config_path = run / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else ckpt_cfg.to_yaml()
    records = read_log(run / "log.jsonl")
    curves = curves_figure(records, members)
    grid = grid_section(samples, palette)
    attention = attention_section(samples[:attention_rows])
    from . import __version__

    model_section = cfg.model
    context = {
        "title": f"coopseg report: {cfg.name}",
        "run_name": cfg.name,
        "run_dir": str(run),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "version": __version__,
        "arch": model_section.get("arch"),
        "backbone": model_section.get("backbone")
        or ", ".join(
            f"{m.get('name', f'net{i}')}: {m.get('arch')} ({m.get('backbone')})"
            for i, m in enumerate(model_section.get("members", []))
        ),
        "checkpoint": str(ckpt),
        "iteration": info.get("iteration"),
        "dataset": cfg.data.dataset,
        "val_images": len(val_set) if val_set is not None else None,
        "metrics_source": source,
        "eval_options": (
            f"scales {metrics.get('scales', [1.0])}, flip {'on' if metrics.get('flip') else 'off'}"
            f", {metrics.get('mode', 'whole')} image"
        ),
        "headline": headline,
        "summary": [
            ("mIoU", pct(metrics.get("miou"))),
            ("pixel accuracy", pct(metrics.get("pixel_acc"))),
            ("mean accuracy", pct(metrics.get("mean_acc"))),
        ],
        "config_text": config_text,
        "curves": data_uri(curves) if curves else None,
        "table": table,
        "iou_chart": data_uri(iou_figure(table["names"], table["ious"], members)),
        "confusion": (
            data_uri(confusion_figure(metrics["matrix"], table["names"]))
            if "matrix" in metrics
            else None
        ),
        "pixels": f"{metrics.get('pixels', 0):,}",
        "grid": grid,
        "members": members,
        "member_colours": ["rgb({},{},{})".format(*member_colour(i)) for i in range(len(members))],
        "disagree_colour": "rgb({},{},{})".format(*DISAGREE_COLOUR),
        "attention": attention,
        "notes": notes,
    }
    html = _template().render(**context)
    path = Path(out) if out else run / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
