"""The JointSeg experiment in miniature (``coopseg bench jointseg``).

Per seed, with one budget (iterations, segmentation batch, optimizer) for every row:

- Tables I/II: JointSeg trained jointly from random init (the paper's headline: JointSeg
  66.1 vs U-Net 25.4 vs FCN-8s 15.3 mIoU, all from scratch) against FCN-8s and U-Net on
  the JointSeg encoder from random init; in ``full`` also the same two with a pretrained
  encoder: ImageNet ``tf_efficientnet_lite0`` (offline) and the JointSeg encoder
  pretrained by the plain classifier below (paper: "initialized with a pre-trained model;
  trained on eyepacs classification set"). The U-Net decoder uses the residual inception
  block (paper: "we use the improved inception block for UNet").
- Tables III/IV: the classifier agent's top-1/top-2/binary accuracy against a plain
  classifier of the same encoder + classifier node trained alone (same data, batch, lr)
  and, in ``full``, timm classifiers from random init (the paper's VGG-19, Inception-v3).
- Partial random labels: JointSeg's segmentation mIoU when 50 % and 80 % of the
  classifier's labels are random (paper: "around 20% of labeled samples ... and around
  80% samples with random labels").
- ``jointseg-paper`` (``full``): JointSeg with the paper's whole x32 classifier batch.

Protocol (issue 19; docs/jointseg.md gives the reasons):

- One init: :class:`~coopseg.models.jointseg.JointSegEncoder` initialises itself (He
  fan-out) and every row builds its model right after ``torch.manual_seed(seed)``, so the
  JointSeg, plain-classifier, FCN-8s and U-Net rows of a seed start from the same encoder
  weights (tested).
- The classifier's label is defined by what the segmenter segments: the ``area`` grade,
  the share of object pixels (all 10 classes) binned into 5 grades (64 px, 2000 train /
  500 val / 8000 classifier scenes: 39/15/15/15/16 %, 41/13/15/15/16 %, 40/15/14/16/16 %;
  binary: grade 0 normal).
- ``cls_data: separate``: the classifier agent trains on its own ``cls_scenes_ratio`` x
  larger set of unmasked scenes (generator seed ``scene_seed + 1``: no scene in common
  with the segmenter's train or val split, tested); paper: 25K classification vs 3.5K
  segmentation images.
- The paper's optimizer for every row: Nesterov SGD (momentum 0.9), poly lr 0.01,
  classifier lr x30; segmentation batch 8 (BN over a sane batch); the classifier batch
  x4 (32 scenes) instead of x32 (256 scenes: a JointSeg step costs ~3x; ``jointseg-paper``
  keeps x32).
- 64-px scenes, a stride-2 stem and 3 further halvings: the deepest map is 4x4 (FCN-8s
  fuses the encoder's three deepest maps, strides 4/8/16, rather than a 2x2 stride 32).
- Every run validates every ``val_interval`` iterations (5 passes); ``train_row`` returns
  ``scores = {seg, cls_top1, cls_top2, cls_binary: {"final", "best"}}`` in % (best: over
  the passes, as the papers keep the best checkpoint).

Recipe check (seed 0, one thread, <= 1 min each, 64 px, batch 8, 2026-12-03; e.g.
``python -c "..."`` around ``train_row(bench_config("unet", 0, "quick", out,
{"iterations": 300, "val_interval": 100, "lr": 0.05}))``; val mIoU % at iteration 300):
U-Net stays on the background plateau (6.4-6.7) under SGD lr 0.01, 0.05 and 0.2 and under
AdamW 0.006 alike, so probes this short cannot rank recipes for it; FCN-8s starts to
leave it under each (SGD 0.01: 7.6, 0.05: 9.5; AdamW 0.006: 10.7). JointSeg, 80
iterations: at lr 0.05 the x30 classifier (lr 1.5) answers grade 0 for every scene
(40.6 % top-1, the majority), at 0.01 (classifier 0.3) it has started to learn (44.8 %);
both stable. The plain classifier, 150 iterations: 40.6 % (the majority) at 0.05 x 30,
43.4 % top-1 and 53.6 % binary at 0.01 x 30. So every row trains with SGD at lr 0.01.
Whether U-Net and JointSeg leave the plateau at 1000 iterations is not measured here:
run seed 0 of every row first (the register keeps it) and read it before the others.

Sizing. CPU seconds per iteration on one thread (a 40- minus a 10-iteration run; CPU
time, since the box was shared, load 4-10 on 2 cores, and its wall times varied 2-3x):
FCN-8s 0.02, U-Net 0.065, the plain classifier 0.125 (x4), JointSeg 0.32 (x4; 1.0 at
the paper's x32; a x8 pair read 0.31 for JointSeg and 0.40 for the classifier alone, the
noise of a shared box); start-up plus one validation pass (500 + 500 scenes) 1-2 s.
The five claim rows (jointseg, jointseg-noise80, classifier, fcn8s, unet) thus cost
~0.85 s per iteration per seed plus ~40 s (5 passes, start-up). 60 min of 2-core
wall time (two one-thread runs at once; ~6000 s of run time after the parallel
slow-down) holds S x (0.85 I + 40) s: **1000 iterations x 6 seeds** (~5300 s), on a
quiet box; with the box shared as today (wall ~1.5x CPU) 1000 x 4. Claims and their
read-out: JointSeg - U-Net and JointSeg - FCN-8s (``seg`` best; the paper's +40.7 and
+50.8 from random init, Table II), the classifier agent - the plain classifier
(``cls_top1`` best; Table III: 85.1 vs Inception-v3 84.3), 80 % random labels - clean
(``seg`` best, non-inferiority: the 95 % interval's low end above **-2.0 points**, a
tenth of a 20 %-mIoU segmenter and within the issue-14 segmenters' seed spread, std
0.2-3.0; the paper: "without effecting the performance"). With 6 seeds the interval is +-2.57 s
/ sqrt(6) (s: the paired differences' std): +-0.7 needs s <= 0.67; wider contrasts read
"inconclusive at 1000 iterations on 64-px scenes". ``quick`` (users): the five claim
rows, 300 iterations, 3 seeds: ~3 x (0.85 x 300 + 40) s / 2 jobs ~ 8 min of CPU, <= 20
min on a shared box.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, config_from_dict
from ..data.joint import AREA_EDGES
from . import runner
from .coop import LITE0
from .recipe import overlay_settings
from .stats import cost_columns, differences_markdown, mean_std, paired_by_seed

PLATEAU = 15.0  # % val mIoU under which a segmenter is still on the background plateau

# The recipe every row shares (the paper's section III-C): Nesterov SGD with a poly
# schedule; the classifier's lr x30 its segmenter's. Sized in the module docstring.
# the rows the JointSeg claims compare (the register's), in both modes
CLAIM_ROWS = ["jointseg", "jointseg-noise80", "classifier", "fcn8s", "unet"]
LR = 0.01  # the segmenter's SGD lr (the classifier's: x30): the recipe check in the docstring
MODES: dict[str, dict[str, Any]] = {
    # users: the five claim rows, 3 seeds in <= 20 min on 2 cores (sized in the docstring)
    "quick": {
        "iterations": 300,
        "scene_size": 64,
        "train_scenes": 2000,
        "val_scenes": 500,
        "cls_scenes_ratio": 4,
        "batch_size": 8,
        "lr": LR,
        "pretrained_lr": LR,
        "widths": [8, 16, 32, 64],
        "blocks": 1,
        "cls_lr_ratio": 30.0,
        "cls_batch_ratio": 4,
        "val_interval": 60,
        "rows": CLAIM_ROWS,
    },
}
# the claims register's budget (docstring: 1000 iterations x 6 seeds in ~60 min)
MODES["full"] = {
    **MODES["quick"],
    "iterations": 1000,
    "val_interval": 200,
    "rows": [
        *CLAIM_ROWS,
        "jointseg-paper",
        "jointseg-noise50",
        "timm-vgg19",
        "timm-inception_v3",
        "fcn8s-imagenet",
        "unet-imagenet",
        "fcn8s-classifier",
        "unet-classifier",
    ],
}
# The claims register (``coopseg bench register``): the full budget on the claim rows.
MODES["register"] = {**MODES["full"], "rows": list(CLAIM_ROWS)}
SETTING_KEYS = (
    "iterations",
    "scene_size",
    "train_scenes",
    "val_scenes",
    "cls_scenes_ratio",
    "batch_size",
    "lr",
    "pretrained_lr",
    "cls_lr_ratio",
    "cls_batch_ratio",
    "val_interval",
)
# The paper's optimizer (section III-C), for every row: Nesterov momentum, poly lr.
OPTIMIZER = {"optimizer": "sgd", "nesterov": True, "momentum": 0.9}
# The paper-recipe row: the paper's full x32 classifier batch (the other rows scale it).
PAPER_RECIPE = {**OPTIMIZER, "cls_lr_ratio": 30.0, "cls_batch_ratio": 32}
# The paper's Table II (random init, its retinal data), mIoU %, for reference beside ours.
PAPER_TABLE2 = {"jointseg": 66.1, "unet": 25.4, "fcn8s": 15.3}
CLS_SCENE_SEED_OFFSET = 1  # the classifier's scenes: data.scene_seed + this (no overlap)


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
    "jointseg-paper": Row("joint", "JointSeg, the paper's x32 classifier batch", recipe="paper"),
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
    """One run's config. Every row shares the data (segmentation scenes and the classifier's
    own, separate scenes), the budget, the optimizer and the augmentation; the model
    section is the one the run trains (ImageNet rows: FCN-8s/U-Net on lite0)."""
    spec = row_spec(row)
    s = mode_settings(mode, settings)
    size = s["scene_size"]
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
        model |= segmenter_options(spec.arch, len(s["widths"]), s["widths"][-1])
    cls_batch_ratio = PAPER_RECIPE["cls_batch_ratio"] if spec.recipe == "paper" else None
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
            "scene_seed": 0,
            "batch_size": s["batch_size"],
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
            **OPTIMIZER,
            "lr": s["lr"] if spec.encoder == "random" else s["pretrained_lr"],
            "weight_decay": 0.0001,
            "poly_power": 0.9,
            "amp": "none",  # fp32: bf16 autocast is ~1.7x slower on CPUs without AMX
            "val_interval": s["val_interval"],  # every pass is a "best" candidate
            "checkpoint_interval": 0,
            "log_interval": 50,
        },
        "joint": {
            "cls_lr_ratio": s["cls_lr_ratio"],
            "cls_batch_ratio": cls_batch_ratio or s["cls_batch_ratio"],
            # the grade is defined by what the segmenter segments: the object-pixel share
            "cls_label": "area",
            "area_edges": list(area_edges_for(size)),
            "binary_normal": [0],
            # paper: hue, contrast and saturation changes for the classifier; ranges ours
            "cls_hue": 0.05,
            "cls_contrast": 0.3,
            "cls_saturation": 0.3,
            "cls_label_noise": spec.noise,
            # the paper's classifier has its own, larger set (25K vs 3.5K segmentation)
            "cls_data": "separate",
            "cls_scenes": s["cls_scenes_ratio"] * s["train_scenes"],
            "cls_scene_seed": CLS_SCENE_SEED_OFFSET,
        },
    }
    return config_from_dict(raw, list(overrides))


# Area-grade edges by scene size (the 40/55/70/85 % quantiles of the object-pixel share on
# the 2000-scene build; objects keep their pixel size up to 128 px, so the share shrinks).
AREA_EDGES_BY_SIZE = {64: AREA_EDGES, 128: (0.09, 0.12, 0.15, 0.19)}


def area_edges_for(size: int) -> tuple[float, ...]:
    """The measured area-grade edges of a scene size (others: the nearest measured size's)."""
    nearest = min(AREA_EDGES_BY_SIZE, key=lambda k: abs(k - size))
    return AREA_EDGES_BY_SIZE[nearest]


def fcn_strides(levels: int) -> list[int]:
    """The three maps FCN-8s fuses on a JointSeg encoder of ``levels`` levels (stem stride
    2): its three deepest, so that no map is smaller than the encoder's deepest."""
    deepest = 2**levels
    return [deepest // 4, deepest // 2, deepest]


def segmenter_options(arch: str, levels: int, deepest_width: int) -> dict[str, Any]:
    """FCN-8s / U-Net head options shared by every encoder: an FCN head twice the
    deepest JointSeg width on the encoder's three deepest maps, the inception U-Net
    decoder."""
    if arch == "fcn8s":
        strides = fcn_strides(levels)
        return {"head_channels": 2 * deepest_width, "dropout": 0.1, "strides": strides}
    if arch == "unet":
        return {"decoder_block": "inception"}
    raise ValueError(f"arch must be 'fcn8s' or 'unet', got {arch!r}")


def baseline_segmenter(
    arch: str,
    widths: Sequence[int],
    encoder_state: Mapping[str, torch.Tensor] | None = None,
    blocks: int = 2,
) -> torch.nn.Module:
    """FCN-8s or U-Net (inception decoder blocks) on a JointSeg encoder, from its own init
    (the one JointSeg's encoder gets) or from ``encoder_state`` (the plain classifier's)."""
    from ..models import JointSegEncoder, create_model

    encoder = JointSegEncoder(widths=widths, blocks=blocks)
    if encoder_state is not None:
        encoder.load_state_dict(encoder_state)
    options = segmenter_options(arch, len(widths), widths[-1])
    return create_model(arch, backbone=encoder, num_classes=11, **options)


def row_of(cfg: Config) -> str:
    """The bench row a run belongs to (its name is ``<row>-seed<seed>``)."""
    return cfg.name.rsplit("-seed", 1)[0]


def classifier_encoder_file(cfg: Config) -> Path:
    """Where the plain classifier of ``cfg``'s seed keeps its encoder."""
    return cfg.run_dir.parent / f"classifier-seed{cfg.seed}" / ENCODER_FILE


def _model_for(spec: Row, cfg: Config) -> torch.nn.Module:
    """The model a row trains, built right after ``torch.manual_seed(cfg.seed)`` so that
    every row's JointSeg encoder (JointSeg, the plain classifier, FCN-8s, U-Net) starts
    from the same weights."""
    from safetensors.torch import load_file

    from ..config import model_kwargs
    from ..models import create_model
    from ..models.jointseg import timm_classifier

    torch.manual_seed(cfg.seed)
    if spec.kind == "joint" or (spec.kind == "cls" and spec.arch == "jointseg"):
        arch, kwargs = model_kwargs(cfg.model)
        return create_model(arch, **kwargs)
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


# score name -> the validation record's key (``TrainResult.history``): ``seg`` is the val
# mIoU, ``cls_*`` the classifier's top-1/top-2/binary accuracy
SCORE_KEYS = {
    "seg": "miou",
    "cls_top1": "cls_top1",
    "cls_top2": "cls_top2",
    "cls_binary": "cls_binary",
}


def train_row(cfg: Config, keep_checkpoints: bool = False) -> dict[str, Any]:
    """Train one bench run (the runner's ``work``): val mIoU of the segmenter and/or the
    classifier's top-1/top-2/binary at the last pass, ``scores`` (final and best pass, in
    %), parameters, GMACs, training time."""
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
    result["scores"] = runner.scores_from_history(outcome.history, SCORE_KEYS)
    result["val_iterations"] = [r["iteration"] for r in outcome.history]
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
        f"Recipe (every row, the paper's optimizer): Nesterov SGD (momentum 0.9), poly lr "
        f"{s['lr']} from random init ({s['pretrained_lr']} for a pretrained encoder), "
        f"segmentation batch {s['batch_size']}; classifier lr ×{s['cls_lr_ratio']:g} and "
        f"batch ×{s['cls_batch_ratio']} on its own {s['cls_scenes_ratio']}× larger set of "
        f"scenes (the paper-recipe row: ×{PAPER_RECIPE['cls_batch_ratio']}); JointSeg "
        f"widths {s['widths']}, {s['blocks']} residual inception block(s) per level. "
        f"Validation every {s['val_interval']} iterations; the tables give the final pass.",
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
    paper = ", ".join(f"{k} {v}" for k, v in PAPER_TABLE2.items())
    lines += ["", f"Paper, Table II (random init, retinal images): {paper}.", ""]
    flat = [r for r, v in table.items() if v["plateau"]]
    if flat:
        lines += [
            f"Still on the background plateau (< {plateau:g} % mIoU in some seed): "
            f"{', '.join(flat)}. Their differences are not evidence either way.",
            "",
        ]
    lines += [
        "### Tables III/IV: classifier accuracy % (object-area grades 0..4; binary: 0 normal)",
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
    from ..engine.joint import classifier_scenes_root

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
        if jobs > 1:  # build the scenes once, before parallel workers race to
            runner.prepare_fashionscenes(configs[0])
            classifier_scenes_root(configs[0])
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
