"""The JointSeg experiment in miniature (``coopseg bench jointseg``).

Per seed, with one budget (iterations, segmentation batch) for every segmenter:

- Tables I/II: JointSeg trained jointly from random init (the paper's headline: JointSeg
  66.1 vs U-Net 25.4 vs FCN-8s 15.3 mIoU, all from scratch) against FCN-8s and U-Net on
  the JointSeg encoder from random init; and, as the paper's pretrained comparison, the
  same two with a pretrained encoder: ImageNet ``tf_efficientnet_lite0`` (offline, from
  its weight package) and, in ``full``, the JointSeg encoder pretrained by the plain
  classifier below on the same scenes (paper: "initialized with a pre-trained model;
  trained on eyepacs classification set"). The U-Net decoder uses the residual inception
  block (paper: "we use the improved inception block for UNet").
- One JointSeg row with the paper's recipe at the same budget (same iterations; the
  paper's Nesterov SGD, classifier lr x30 and batch x32, with segmentation batch 1 as in
  ``configs/jointseg-fashionscenes.yaml`` so that a classifier step is 32 scenes).
- Tables III/IV: the classifier agent's top-1/top-2/binary accuracy against a plain
  classifier of the same encoder + classifier node trained alone and, in ``full``, timm
  classifiers from random init (the paper's VGG-19 and Inception-v3).
- Partial random labels: JointSeg's segmentation mIoU when 50 % and 80 % of the
  classifier's labels are random (paper: "around 20% of labeled samples ... and around
  80% samples with random labels").

Labels are the footwear-count grade (0..4, the paper's 5 DR levels; see
``coopseg.data.joint``); binary: grade 0 normal, grades >= 1 abnormal. Every run is one
process (``--jobs`` at once), cached like the other benches (``bench-result.json``); the
seeds pair the runs (same scenes, same batch order per seed), and the report gives
per-seed differences for the paper's claims.

Ours, to fit 2 CPU cores: small scenes and widths, fp32 (bf16 autocast is ~1.7x slower
on CPUs without AMX), AdamW for every row but the paper-recipe one, classifier lr x5 and
batch x2 (the paper: x30, x32). Augmentation is the paper's (flips both ways, random
padding, per-image standardisation; colour jitter for the classifier).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, config_from_dict
from . import runner
from .coop import LITE0
from .recipe import overlay_settings
from .stats import cost_columns, differences_markdown, mean_std, paired_by_seed

PLATEAU = 15.0  # % val mIoU under which a segmenter is still on the background plateau

MODES: dict[str, dict[str, Any]] = {
    # Sized in BENCHMARKS.md ("JointSeg in miniature"): <= 45 min for 3 seeds on 2 cores.
    "quick": {
        "iterations": 800,
        "scene_size": 48,
        "train_scenes": 2000,
        "val_scenes": 250,
        "batch_size": 8,
        "lr": 0.006,
        "pretrained_lr": 0.0015,
        "widths": [8, 16, 32, 64, 64],
        "blocks": 1,
        "cls_lr_ratio": 5.0,
        "cls_batch_ratio": 2,
        "rows": [
            "jointseg",
            "jointseg-paper",
            "jointseg-noise80",
            "classifier",
            "fcn8s",
            "unet",
            "fcn8s-imagenet",
            "unet-imagenet",
        ],
    },
    "full": {
        "iterations": 4000,
        "scene_size": 128,
        "train_scenes": 2000,
        "val_scenes": 250,
        "batch_size": 8,
        "lr": 0.006,
        "pretrained_lr": 0.0015,
        "widths": [16, 32, 64, 128, 256],
        "blocks": 2,  # the paper's "multiples"
        "cls_lr_ratio": 5.0,
        "cls_batch_ratio": 8,
        "rows": [
            "jointseg",
            "jointseg-paper",
            "jointseg-noise50",
            "jointseg-noise80",
            "classifier",
            "timm-vgg19",
            "timm-inception_v3",
            "fcn8s",
            "unet",
            "fcn8s-imagenet",
            "unet-imagenet",
            "fcn8s-classifier",
            "unet-classifier",
        ],
    },
}
SETTING_KEYS = (
    "iterations",
    "scene_size",
    "train_scenes",
    "val_scenes",
    "batch_size",
    "lr",
    "pretrained_lr",
)
# The paper's recipe (section III-C): Nesterov SGD with a poly schedule, the classifier's
# lr x30 and batch x32 the segmenter's; our segmentation batch 1 keeps x32 affordable.
PAPER_RECIPE = {
    "optimizer": "sgd",
    "nesterov": True,
    "momentum": 0.9,
    "lr": 0.01,
    "cls_lr_ratio": 30.0,
    "cls_batch_ratio": 32,
    "batch_size": 1,
}
# The paper's Table I (random init, its retinal data), mIoU %, for reference beside ours.
PAPER_TABLE1 = {"jointseg": 66.1, "unet": 25.4, "fcn8s": 15.3}


@dataclass(frozen=True)
class Row:
    """One row: what trains (``joint``: both agents; ``seg``/``cls``: one), which
    architecture (seg: ``fcn8s``/``unet``; cls: ``jointseg`` or a timm model name), its
    encoder's start (``random``, ``imagenet``, ``classifier``), label noise, recipe."""

    kind: str
    label: str
    arch: str = "jointseg"
    encoder: str = "random"
    noise: float = 0.0
    recipe: str = "ours"

    @property
    def segments(self) -> bool:
        return self.kind in ("joint", "seg")

    @property
    def classifies(self) -> bool:
        return self.kind in ("joint", "cls")


ROWS: dict[str, Row] = {
    "jointseg": Row("joint", "JointSeg"),
    "jointseg-paper": Row("joint", "JointSeg, paper's recipe", recipe="paper"),
    "jointseg-noise50": Row("joint", "JointSeg, 50 % random labels", noise=0.5),
    "jointseg-noise80": Row("joint", "JointSeg, 80 % random labels", noise=0.8),
    "classifier": Row("cls", "plain classifier (same encoder + node)"),
    "fcn8s": Row("seg", "FCN-8s", "fcn8s"),
    "unet": Row("seg", "U-Net", "unet"),
    "fcn8s-imagenet": Row("seg", "FCN-8s, ImageNet lite0", "fcn8s", "imagenet"),
    "unet-imagenet": Row("seg", "U-Net, ImageNet lite0", "unet", "imagenet"),
    "fcn8s-classifier": Row("seg", "FCN-8s, classifier-pretrained", "fcn8s", "classifier"),
    "unet-classifier": Row("seg", "U-Net, classifier-pretrained", "unet", "classifier"),
}
TIMM_PREFIX = "timm-"
# (a, b, metric): per-seed differences a - b, the paper's claims.
COMPARISONS = (
    ("jointseg", "unet", "miou"),
    ("jointseg", "fcn8s", "miou"),
    ("unet", "fcn8s", "miou"),
    ("unet-imagenet", "unet", "miou"),
    ("fcn8s-imagenet", "fcn8s", "miou"),
    ("jointseg", "unet-imagenet", "miou"),
    ("unet-classifier", "unet", "miou"),
    ("jointseg", "jointseg-paper", "miou"),
    ("jointseg-noise50", "jointseg", "miou"),
    ("jointseg-noise80", "jointseg", "miou"),
    ("jointseg", "classifier", "top1"),
)
ENCODER_FILE = "encoder.safetensors"  # the plain classifier's encoder, kept for its users


def row_spec(row: str) -> Row:
    """The row's spec; ``timm-<name>`` is a timm classifier from random init."""
    if row in ROWS:
        return ROWS[row]
    if row.startswith(TIMM_PREFIX) and len(row) > len(TIMM_PREFIX):
        name = row[len(TIMM_PREFIX) :]
        return Row("cls", f"timm {name} (random init)", name)
    raise ValueError(
        f"unknown jointseg bench row {row!r}; one of {list(ROWS)} or timm-<timm model name>"
    )


def mode_settings(mode: str, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The mode's settings with ``settings`` (None values ignored) laid over them."""
    return overlay_settings(MODES, mode, settings, SETTING_KEYS)


def bench_config(
    row: str,
    seed: int,
    mode: str = "quick",
    out_dir: str | Path = "runs/bench-jointseg/runs",
    settings: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """One run's config. Every row shares the data, the budget and the augmentation;
    the model section is the one the run trains (ImageNet rows: FCN-8s/U-Net on lite0)."""
    spec = row_spec(row)
    s = mode_settings(mode, settings)
    size = s["scene_size"]
    paper = spec.recipe == "paper"
    model: dict[str, Any] = {
        "arch": "jointseg",
        "num_classes": 11,
        "num_cls_classes": 5,
        "widths": list(s["widths"]),
        "blocks": s["blocks"],
        "cls_blocks": 2,  # paper: "multiples" blocks in the classifier node too
        "cls_dropout": 0.0,
    }
    if spec.encoder == "imagenet":
        model = {"arch": spec.arch, "backbone": LITE0, "pretrained": True, "num_classes": 11}
        model |= segmenter_options(spec.arch, s["widths"])
    raw = {
        "name": f"{row}-seed{seed}",
        "seed": seed,
        "device": "auto",
        "out_dir": str(out_dir),
        "model": model,
        "data": {
            "dataset": "fashionscenes",
            "scene_size": size,
            "train_scenes": s["train_scenes"],
            "val_scenes": s["val_scenes"],
            "batch_size": PAPER_RECIPE["batch_size"] if paper else s["batch_size"],
            "val_batch_size": 50,
            "crop_size": [size, size],
            "scale_range": [1.0, 1.0],
            # the paper's augmentation: flips both ways, random padding (ours: 1/12 of the
            # side), per-image standardisation
            "hflip": True,
            "vflip": True,
            "random_pad": size // 12,
            "normalize": "image",
        },
        "train": {
            "iterations": s["iterations"],
            "optimizer": "adamw",
            # measured at 48 px (seed 0): from random init lr 0.006 learns fastest (U-Net at
            # 1200 iterations: 19.9 %; 11.3 % at 0.002, 17.6 % at 0.015); a pretrained encoder
            # prefers the fine-tuning lr (FCN-8s on lite0, 800 iterations: 41.7 % at 0.0015,
            # 39.4 % at 0.006)
            "lr": s["lr"] if spec.encoder == "random" else s["pretrained_lr"],
            "weight_decay": 0.0001,
            "poly_power": 0.9,
            "amp": "none",  # fp32: bf16 autocast is ~1.7x slower on CPUs without AMX
            "val_interval": 0,
            "checkpoint_interval": 0,
            "log_interval": 50,
        },
        "joint": {
            "cls_lr_ratio": s["cls_lr_ratio"],
            "cls_batch_ratio": s["cls_batch_ratio"],
            "cls_label": "count",
            "binary_normal": [0],
            # paper: hue, contrast and saturation changes for the classifier; ranges ours
            "cls_hue": 0.05,
            "cls_contrast": 0.3,
            "cls_saturation": 0.3,
            "cls_label_noise": spec.noise,
        },
    }
    if paper:
        raw["train"] |= {k: PAPER_RECIPE[k] for k in ("optimizer", "nesterov", "momentum", "lr")}
        raw["joint"] |= {k: PAPER_RECIPE[k] for k in ("cls_lr_ratio", "cls_batch_ratio")}
    return config_from_dict(raw, list(overrides))


def segmenter_options(arch: str, widths: Sequence[int]) -> dict[str, Any]:
    """FCN-8s / U-Net head options shared by every encoder: an FCN head twice the
    deepest JointSeg width, the inception U-Net decoder."""
    if arch == "fcn8s":
        return {"head_channels": 2 * widths[-1], "dropout": 0.1}
    if arch == "unet":
        return {"decoder_block": "inception"}
    raise ValueError(f"arch must be 'fcn8s' or 'unet', got {arch!r}")


def baseline_segmenter(
    arch: str,
    widths: Sequence[int],
    encoder_state: Mapping[str, torch.Tensor] | None = None,
    blocks: int = 2,
) -> torch.nn.Module:
    """FCN-8s or U-Net (inception decoder blocks) on a JointSeg encoder, from random init
    or from ``encoder_state`` (the plain classifier's encoder)."""
    from ..models import JointSegEncoder, create_model

    encoder = JointSegEncoder(widths=widths, blocks=blocks)
    if encoder_state is not None:
        encoder.load_state_dict(encoder_state)
    return create_model(arch, backbone=encoder, num_classes=11, **segmenter_options(arch, widths))


def row_of(cfg: Config) -> str:
    """The bench row a run belongs to (its name is ``<row>-seed<seed>``)."""
    return cfg.name.rsplit("-seed", 1)[0]


def classifier_encoder_file(cfg: Config) -> Path:
    """Where the plain classifier of ``cfg``'s seed keeps its encoder."""
    return cfg.run_dir.parent / f"classifier-seed{cfg.seed}" / ENCODER_FILE


def _model_for(spec: Row, cfg: Config) -> torch.nn.Module | None:
    """The model a row trains (None: the trainer builds JointSeg from ``cfg.model``)."""
    from safetensors.torch import load_file

    from ..models import create_model
    from ..models.jointseg import timm_classifier

    torch.manual_seed(cfg.seed)
    if spec.kind == "joint" or (spec.kind == "cls" and spec.arch == "jointseg"):
        return None
    if spec.kind == "cls":
        return timm_classifier(spec.arch, num_cls_classes=5)
    if spec.encoder == "imagenet":
        kwargs = dict(cfg.model)
        return create_model(kwargs.pop("arch"), **kwargs)
    state = None
    if spec.encoder == "classifier":
        path = classifier_encoder_file(cfg)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the classifier row of seed {cfg.seed} must run before {cfg.name}"
            )
        state = load_file(str(path))
    return baseline_segmenter(spec.arch, cfg.model["widths"], state, cfg.model["blocks"])


def train_row(cfg: Config, keep_checkpoints: bool = False) -> dict[str, Any]:
    """Train one bench run (the runner's ``work``): val mIoU of the segmenter and/or the
    classifier's top-1/top-2/binary, parameters, GMACs, training time."""
    from safetensors.torch import save_file

    from ..engine.joint import AGENTS, JointTrainer

    spec = row_spec(row_of(cfg))
    tasks = {"joint": AGENTS, "seg": ("seg",), "cls": ("cls",)}[spec.kind]

    def make_trainer() -> JointTrainer:
        model = _model_for(spec, cfg)  # after the folder is emptied: it may read a file
        return JointTrainer(cfg, show_progress=False, model=model, tasks=tasks)

    trainer, outcome, result = runner.train_measured(cfg, make_trainer)
    if spec.segments and outcome.last_metrics is not None:
        result["miou"] = outcome.last_metrics.miou
        result["iou"] = list(outcome.last_metrics.iou)
    if spec.classifies and outcome.last_cls is not None:
        result |= {k: outcome.last_cls[k] for k in ("top1", "top2", "binary")}
    if row_of(cfg) == "classifier":
        state = trainer.model.encoder.state_dict()
        save_file(
            {k: v.detach().contiguous() for k, v in state.items()}, str(cfg.run_dir / ENCODER_FILE)
        )
    return runner.finish_run(cfg, result, keep_checkpoints)


METRICS = ("miou", "top1", "top2", "binary")


def summarise(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], plateau: float = PLATEAU
) -> dict[str, dict[str, Any]]:
    """Per row: mean ± std (in %) of each metric it has, costs, and the plateau flag."""
    table: dict[str, dict[str, Any]] = {}
    for row, results in runs.items():
        entry: dict[str, Any] = {
            k: mean_std([100 * r[k] for r in results]) for k in METRICS if k in results[0]
        }
        low = [r.get("seed") for r in results if "miou" in r and 100 * r["miou"] < plateau]
        entry |= {
            "plateau": bool(low),
            "plateau_seeds": low,
            **cost_columns(results),
        }
        table[row] = entry
    return table


def comparisons(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Paired per-seed differences of ``COMPARISONS`` (rows present with shared seeds)."""
    out = []
    for a_row, b_row, metric in COMPARISONS:
        if a_row in runs and b_row in runs:
            a = {r.get("seed"): 100 * r[metric] for r in runs[a_row] if metric in r}
            b = {r.get("seed"): 100 * r[metric] for r in runs[b_row] if metric in r}
            label = f"{a_row} − {b_row}" + (f" ({metric})" if metric != "miou" else "")
            diff = paired_by_seed(a, b, label)
            out += [diff] if diff else []
    return out


def _cell(table: Mapping[str, Any], row: str, key: str) -> str:
    v = table.get(row, {}).get(key)
    return "—" if v is None else f"{v['mean']:.1f} ± {v['std']:.1f}"


def markdown(report: Mapping[str, Any]) -> str:
    """The Markdown page of a ``bench jointseg`` report (``jointseg.md``)."""
    table, s = report["table"], report["settings"]
    plateau = report["plateau"]
    lines = [
        "## JointSeg in miniature (`coopseg bench jointseg`)",
        "",
        f"FashionScenes {s['scene_size']}×{s['scene_size']}, {s['train_scenes']} train / "
        f"{s['val_scenes']} val scenes; mode `{report['mode']}`, seeds {report['seeds']}; "
        f"mean ± std over seeds. Every row: {s['iterations']} iterations, fp32.",
        "",
        f"Recipe (ours): AdamW lr {s['lr']} from random init, {s['pretrained_lr']} for a "
        f"pretrained encoder, segmentation batch {s['batch_size']}, classifier "
        f"lr ×{s['cls_lr_ratio']:g} and batch ×{s['cls_batch_ratio']}; JointSeg widths "
        f"{s['widths']}, {s['blocks']} residual inception block(s) per level. The paper's "
        f"recipe row: Nesterov SGD (momentum 0.9, lr {PAPER_RECIPE['lr']}), classifier lr "
        f"×{PAPER_RECIPE['cls_lr_ratio']:g} and batch ×{PAPER_RECIPE['cls_batch_ratio']} at "
        f"segmentation batch {PAPER_RECIPE['batch_size']}.",
        "",
        "### Tables I/II: segmentation, val mIoU %",
        "",
        "| method | random init | ImageNet lite0 encoder | classifier-pretrained encoder |",
        "|---|---|---|---|",
    ]
    for arch, label in (("fcn8s", "FCN-8s"), ("unet", "U-Net")):
        cells = [_cell(table, r, "miou") for r in (arch, f"{arch}-imagenet", f"{arch}-classifier")]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines.append(f"| JointSeg | {_cell(table, 'jointseg', 'miou')} | — | — (needs none) |")
    if "jointseg-paper" in table:
        paper_row = _cell(table, "jointseg-paper", "miou")
        lines.append(f"| JointSeg, paper's recipe | {paper_row} | — | — |")
    paper = ", ".join(f"{k} {v}" for k, v in PAPER_TABLE1.items())
    lines += ["", f"Paper, Table I (random init, retinal images): {paper}.", ""]
    flat = [r for r, v in table.items() if v["plateau"]]
    if flat:
        lines += [
            f"Still on the background plateau (< {plateau:g} % mIoU in some seed): "
            f"{', '.join(flat)}. Their differences are not evidence either way.",
            "",
        ]
    lines += [
        "### Tables III/IV: classifier accuracy % (footwear-count grades 0..4; binary: 0 normal)",
        "",
        "| method | top-1 | top-2 | binary |",
        "|---|---|---|---|",
    ]
    for row in table:
        spec = row_spec(row)
        if spec.kind == "cls" or row in ("jointseg", "jointseg-paper"):
            label = "JointSeg's classifier agent" if row == "jointseg" else spec.label
            cells = " | ".join(_cell(table, row, k) for k in ("top1", "top2", "binary"))
            lines.append(f"| {label} | {cells} |")
    lines += [
        "",
        "### Partial random labels: JointSeg with random classifier labels",
        "",
        "| random labels | seg mIoU % | cls top-1 % |",
        "|---|---|---|",
    ]
    for row, share in (("jointseg", 0), ("jointseg-noise50", 50), ("jointseg-noise80", 80)):
        if row in table:
            miou, top1 = _cell(table, row, "miou"), _cell(table, row, "top1")
            lines.append(f"| {share} % | {miou} | {top1} |")
    lines += [
        "",
        "### Cost per run",
        "",
        "| row | params (M) | GMACs | train time (s) | s / iteration |",
        "|---|---|---|---|---|",
    ]
    for row, v in table.items():
        lines.append(
            f"| {row} | {v['params_m']:.2f} | {v['gmacs']:.3f} | {v['train_s']['mean']:.0f} | "
            f"{v['step_s']['mean']:.3f} |"
        )
    lines.append("")
    if report.get("chart"):
        lines += [f"![JointSeg bench: val mIoU]({report['chart']})", ""]
    lines += differences_markdown(
        report["comparisons"], "### Paired per-seed differences (points; same seed, same scenes)"
    )
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> str:
    """Write ``jointseg.json``, ``jointseg.png`` and ``jointseg.md``; return the Markdown."""
    table = report["table"]
    groups = [r for r, v in table.items() if "miou" in v]
    series = {"val mIoU": [table[r]["miou"] for r in groups]}
    title = f"JointSeg bench, {len(report['seeds'])} seeds: mean ± std"
    return runner.save_report(out_dir, "jointseg", report, series, groups, title, markdown)


def _progress(cfg: Config, result: Mapping[str, Any], reused: bool) -> None:
    how = "reused" if reused else f"{result['train_s']:.0f} s"
    shown = ", ".join(f"{k} {100 * result[k]:.1f}" for k in METRICS if k in result)
    print(f"[bench jointseg] {cfg.name}: {shown} ({how})", flush=True)


def run_jointseg_bench(
    mode: str = "quick",
    seeds: Sequence[int] = (0, 1, 2),
    out_dir: str | Path = "runs/bench-jointseg",
    rows: Sequence[str] | None = None,
    *,
    settings: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    jobs: int = 1,
    threads: int | None = None,
    plateau: float = PLATEAU,
    keep_checkpoints: bool = False,
    rerun: bool = False,
    work: Callable[[Config, bool], dict[str, Any]] = train_row,
) -> dict[str, Any]:
    """Train every row (None: the mode's) for every seed and write ``jointseg.md``,
    ``jointseg.json`` and ``jointseg.png`` in ``out_dir``. Rows that start from the
    plain classifier's encoder run after it. Finished runs are reused."""
    s = mode_settings(mode, settings)
    rows = list(rows if rows is not None else s["rows"])
    specs = {row: row_spec(row) for row in rows}
    needs = [r for r in rows if specs[r].encoder == "classifier"]
    if needs and "classifier" not in rows:
        raise ValueError(f"rows {needs} start from the classifier row's encoder: add 'classifier'")
    out_dir = Path(out_dir)

    def build(row: str, seed: int) -> Config:
        return bench_config(row, seed, mode, out_dir / "runs", settings, overrides)

    cost = {"joint": 3, "cls": 1, "seg": 2}  # joint rows first: parallel jobs end together
    order = sorted((r for r in rows if r not in needs), key=lambda r: -cost[specs[r].kind])
    results: dict[str, dict[str, Any]] = {}
    for phase in (order, needs):
        configs = [build(row, seed) for seed in seeds for row in phase]
        if not configs:
            continue
        if jobs > 1:
            runner.prepare_fashionscenes(configs[0])
        results |= runner.run_configs(
            configs,
            jobs=jobs,
            threads=threads,
            keep_checkpoints=keep_checkpoints,
            rerun=rerun,
            on_result=_progress,
            work=work,
        )
    runs = {
        row: [results[build(row, seed).name] | {"seed": seed} for seed in seeds] for row in rows
    }
    report: dict[str, Any] = {
        "bench": "jointseg",
        "mode": mode,
        "seeds": list(seeds),
        "settings": {k: v for k, v in s.items() if k != "rows"},
        "paper_recipe": PAPER_RECIPE,
        "overrides": list(overrides),
        "plateau": plateau,
        "rows": {row: asdict(specs[row]) for row in rows},
        "table": summarise(runs, plateau),
        "comparisons": comparisons(runs),
        "runs": runs,
    }
    text = write_report(report, out_dir)
    print(text)
    return report
