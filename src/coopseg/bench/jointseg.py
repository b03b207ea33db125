"""The JointSeg experiment in miniature (``coopseg bench jointseg``).

Per seed, with one budget (iterations, segmentation batch) for every segmenter:

- Tables I/II: FCN-8s and U-Net on the JointSeg encoder, from random init and from an
  encoder pretrained by classification on the same scenes (the "plain classifier"
  below; paper: "initialized with a pre-trained model; trained on eyepacs classification
  set"), against JointSeg trained jointly from random init. The U-Net decoder uses the
  residual inception block (paper: "we use the improved inception block for UNet").
- Table III and IV: the classifier agent's top-1/top-2/binary accuracy against a plain
  classifier of the same encoder + classifier node trained alone (ours: the paper
  compares VGG-19 and Inception-v3), and against timm classifiers from random init
  (``timm_classifiers``: none in ``quick``, the paper's ``vgg19`` and ``inception_v3`` in
  ``full``); same iterations, batch, lr and labels.
- Partial random labels: JointSeg's segmentation mIoU when 0 %, 50 % and 80 % of the
  classifier's labels are random (paper: "around 20% of labeled samples ... and around
  80% samples with random labels").

Labels are the footwear-count grade (0..4, the paper's 5 DR levels; see
``coopseg.data.joint``), binary: grade 0 normal, grades >= 1 abnormal (paper: "DR level
higher than or equal to 1 as abnormal and DR level 0 as normal"). Reports mean ± std
over seeds in Markdown and JSON.

Ours, to fit 2 CPU cores (the paper's recipe is in ``jointseg-fashionscenes``): small
scenes and widths, AdamW at lr 0.002 for every run, classifier lr x5 and batch x2 (quick)
/ x8 (full) where the paper uses Nesterov SGD, x30 and x32. Augmentation is the paper's
(flips, random padding, per-image standardisation; colour jitter for classifiers).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import Config, config_from_dict
from ..engine.joint import JointTrainer
from ..models import JointSegEncoder, create_model
from ..models.jointseg import timm_classifier

MODES: dict[str, dict[str, Any]] = {
    # 8 runs x 3 seeds on 48x48 scenes, with OMP_NUM_THREADS=1 (the step time is per-layer
    # overhead of many small convs; with a busy second core, two threads per process are
    # several times slower than one). Measured at 13 minutes on 2 CPU cores with one
    # residual inception block per level; with the paper's "multiples" (2, the default)
    # and the decoder's last stage at input size a JointSeg run takes about 1.6x as long
    # (timed over 30 iterations), so expect about 20 minutes.
    "quick": {
        "iterations": 300,
        "scene_size": 48,
        "train_scenes": 400,
        "val_scenes": 50,
        "widths": [8, 16, 32, 64, 64],
        "cls_batch_ratio": 2,
        "timm_classifiers": [],
    },
    "full": {
        "iterations": 2000,
        "scene_size": 128,
        "train_scenes": 2000,
        "val_scenes": 250,
        "widths": [16, 32, 64, 128, 256],
        "cls_batch_ratio": 8,
        "timm_classifiers": ["vgg19", "inception_v3"],  # the paper's Table III rows
    },
}
NOISE_LEVELS = (0.0, 0.5, 0.8)
ROWS = ("fcn8s", "unet", "fcn8s-pretrained", "unet-pretrained", "jointseg")


def bench_config(mode: str, seed: int, out_dir: Path, name: str, noise: float = 0.0) -> Config:
    """One run's config; only the seed, the run name and the label noise vary."""
    m = MODES[mode]
    size = m["scene_size"]
    raw = {
        "name": f"{name}-seed{seed}",
        "seed": seed,
        "device": "auto",
        "out_dir": str(out_dir),
        "model": {
            "arch": "jointseg",
            "num_classes": 11,
            "num_cls_classes": 5,
            "widths": m["widths"],
            "cls_blocks": 2,  # paper: "multiples" blocks in the classifier node too
            "cls_dropout": 0.0,
        },
        "data": {
            "dataset": "fashionscenes",
            "scene_size": size,
            "train_scenes": m["train_scenes"],
            "val_scenes": m["val_scenes"],
            "batch_size": 8,
            "val_batch_size": 50,
            "crop_size": [size, size],
            # the paper's augmentation: flips both ways, random padding (ours: 1/12 of the
            # side), per-image standardisation
            "vflip": True,
            "random_pad": size // 12,
            "normalize": "image",
        },
        "train": {
            "iterations": m["iterations"],
            "optimizer": "adamw",
            "lr": 0.002,
            "weight_decay": 0.0001,
            "amp": "bf16",
            "val_interval": 0,
            "checkpoint_interval": 0,
            "log_interval": 50,
        },
        "joint": {
            "cls_lr_ratio": 5.0,
            "cls_batch_ratio": m["cls_batch_ratio"],
            "cls_label": "count",
            "binary_normal": [0],
            # paper: hue, contrast and saturation changes for the classifier; ranges ours
            "cls_hue": 0.05,
            "cls_contrast": 0.3,
            "cls_saturation": 0.3,
            "cls_label_noise": noise,
        },
    }
    return config_from_dict(raw)


def _run(trainer: JointTrainer) -> dict[str, Any]:
    start = time.perf_counter()
    result = trainer.train()
    out: dict[str, Any] = {"train_s": time.perf_counter() - start}
    if result.last_metrics is not None:
        out["miou"] = result.last_metrics.miou
    if result.last_cls is not None:
        out |= {k: result.last_cls[k] for k in ("top1", "top2", "binary")}
    return out


def baseline_segmenter(
    arch: str, widths: Sequence[int], encoder_state: dict[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """FCN-8s or U-Net (inception decoder blocks) on a JointSeg encoder, from random init
    or from ``encoder_state`` (the plain classifier's encoder)."""
    encoder = JointSegEncoder(widths=widths)
    if encoder_state is not None:
        encoder.load_state_dict(encoder_state)
    if arch == "fcn8s":
        extra: dict[str, Any] = {"head_channels": 2 * widths[-1], "dropout": 0.1}
    elif arch == "unet":
        extra = {"decoder_block": "inception"}
    else:
        raise ValueError(f"arch must be 'fcn8s' or 'unet', got {arch!r}")
    return create_model(arch, backbone=encoder, num_classes=11, **extra)


def run_seed(
    mode: str, seed: int, out_dir: Path, timm_classifiers: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Every row of every table for one seed (``timm_classifiers``: None = the mode's)."""
    results: dict[str, dict[str, Any]] = {}
    widths = MODES[mode]["widths"]
    if timm_classifiers is None:
        timm_classifiers = MODES[mode]["timm_classifiers"]

    def cfg(name: str, noise: float = 0.0) -> Config:
        config = bench_config(mode, seed, out_dir, name, noise)
        shutil.rmtree(config.run_dir, ignore_errors=True)  # the bench's own folder: rerunnable
        return config

    for noise in NOISE_LEVELS:
        name = "jointseg" if noise == 0 else f"jointseg-noise{round(100 * noise)}"
        results[name] = _run(JointTrainer(cfg(name, noise), show_progress=False))
    plain = JointTrainer(cfg("classifier"), show_progress=False, tasks=("cls",))
    results["classifier"] = _run(plain)
    for name in timm_classifiers:
        torch.manual_seed(seed)
        model = timm_classifier(name, num_cls_classes=5)
        trainer = JointTrainer(
            cfg(f"timm-{name}"), show_progress=False, model=model, tasks=("cls",)
        )
        results[f"timm-{name}"] = _run(trainer)
    pretrained = {k: v.detach().clone() for k, v in plain.model.encoder.state_dict().items()}
    for arch in ("fcn8s", "unet"):
        for init in ("random", "pretrained"):
            torch.manual_seed(seed)
            model = baseline_segmenter(arch, widths, pretrained if init == "pretrained" else None)
            name = arch if init == "random" else f"{arch}-pretrained"
            trainer = JointTrainer(cfg(name), show_progress=False, model=model, tasks=("seg",))
            results[name] = _run(trainer)
    return results


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    return {"mean": mean, "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per row, mean ± std (in %) of every metric it has."""
    table: dict[str, dict[str, Any]] = {}
    for row in runs[0]:
        metrics = sorted({k for r in runs for k in r[row]})
        table[row] = {
            k: _mean_std([(1 if k == "train_s" else 100) * r[row][k] for r in runs])
            for k in metrics
        }
    return table


def markdown(table: dict[str, dict[str, Any]], mode: str, seeds: Sequence[int]) -> str:
    def cell(row: str, key: str) -> str:
        v = table.get(row, {}).get(key)
        return "—" if v is None else f"{v['mean']:.1f} ± {v['std']:.1f}"

    head = f"FashionScenes, mode `{mode}`, seeds {list(seeds)}; mean ± std over seeds"
    recipe = (
        f"Recipe (ours, scaled down): AdamW lr 0.002, classifier lr x5, batch "
        f"x{MODES[mode]['cls_batch_ratio']} (paper: Nesterov SGD, x30, x32)"
    )
    lines = [head, "", recipe, "", "Tables I/II: segmentation, val mIoU %", ""]
    lines += ["| method | random init | classification-pretrained encoder |", "|---|---|---|"]
    for arch in ("fcn8s", "unet"):
        lines.append(f"| {arch} | {cell(arch, 'miou')} | {cell(arch + '-pretrained', 'miou')} |")
    lines.append(f"| jointseg | {cell('jointseg', 'miou')} | — (needs none) |")
    title = "Tables III/IV: classifier accuracy % (footwear-count grades 0..4; binary: 0 normal)"
    lines += ["", title, ""]
    lines += ["| method | top-1 | top-2 | binary |", "|---|---|---|---|"]
    rows = [("classifier", "plain classifier (same encoder + node)")]
    rows += [(row, f"timm {row[5:]}") for row in table if row.startswith("timm-")]
    rows.append(("jointseg", "jointseg agent"))
    for row, label in rows:
        cells = " | ".join(cell(row, k) for k in ("top1", "top2", "binary"))
        lines.append(f"| {label} | {cells} |")
    lines += ["", "Partial random labels: JointSeg with random classifier labels", ""]
    lines += ["| random labels | seg mIoU % | cls top-1 % |", "|---|---|---|"]
    for noise in NOISE_LEVELS:
        row = "jointseg" if noise == 0 else f"jointseg-noise{round(100 * noise)}"
        lines.append(f"| {round(100 * noise)} % | {cell(row, 'miou')} | {cell(row, 'top1')} |")
    times = ", ".join(f"{row} {v['train_s']['mean']:.0f}" for row, v in table.items())
    lines += ["", f"Training time per run (s): {times}"]
    return "\n".join(lines) + "\n"


def run_jointseg_bench(
    mode: str = "quick",
    seeds: Sequence[int] = (0, 1, 2),
    out_dir: str | Path = "runs/bench-jointseg",
    timm_classifiers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run every row for every seed; write ``jointseg.md`` and ``jointseg.json``.
    ``timm_classifiers`` (timm model names, random init) replace the mode's Table III rows."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    out_dir = Path(out_dir)
    runs = []
    for seed in seeds:
        runs.append(run_seed(mode, seed, out_dir / "runs", timm_classifiers))
        shown = ", ".join(
            f"{row} {100 * r.get('miou', r.get('top1', float('nan'))):.1f}"
            for row, r in runs[-1].items()
        )
        print(f"[bench jointseg] seed {seed}: {shown}", flush=True)
    table = summarise(runs)
    report = {"mode": mode, "seeds": list(seeds), "config": MODES[mode], "table": table}
    report["runs"] = runs
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "jointseg.json").write_text(json.dumps(report, indent=2))
    text = markdown(table, mode, seeds)
    (out_dir / "jointseg.md").write_text(text)
    print(text)
    return report
