"""DF-DAM's Table 1 in miniature (``coopseg bench dfdam``).

Rows: DF-DAM with ``fusion=sum`` (the paper's baseline: plain sums replace both
modules), ``dafm`` (+ the dual attention fusion module) and ``dafm+2dpam`` (the full
model), and DeepLabv3+ on the same backbone, all trained with one recipe and budget --
the ``bench coop`` quick recipe (DeepLabv3+'s row is its single network's recipe) -- for
several seeds: val mIoU (mean ± std, paired differences), parameters, GMACs and latency
side by side.

Backbone: the paper uses ResNet-18/50/101; only EfficientNet-Lite weights are available
offline, so every row runs on ImageNet-pretrained ``tf_efficientnet_lite0``. DF-DAM
picks its inputs by stride, not by layer name (``models/dfdam.py``: the deepest feature
map at strides 4, 16 and 32), so on lite0 ``blocks.1`` (stride 4, 24 channels) plays
ResNet's layer1 (the spatial information X^SI), ``blocks.4`` (stride 16, 112 channels)
layer3 and ``blocks.6`` (stride 32, 320 channels) layer4 (the context information);
each is projected to the paper's 128 channels. The Markdown states the mapping as read
from the built model. The paper's aux losses (0.4 context, 0.1 spatial) are kept.

Sizing (measured like ``bench coop``'s, one thread, rows interleaved, 64×64, frozen
stages 2): DeepLabv3+ 0.158 s per step, DF-DAM sum 1.01x, dafm 1.02x, dafm+2dpam 1.12x,
so 4 rows x 3 seeds x 800 iterations is ~12 x 800 x 0.165 s = ~27 min of one-thread
steps, ~15-20 min with two runs at once (the default): inside the 30 minutes. Latency:
batch 1, eval mode, at the paper's 320×640 (Tables 4/6), measured in this process after
training, rows interleaved round by round (median of the rounds' medians); GMACs at the
scene size and at 320×640.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import Config, config_from_dict
from . import runner
from .claims import CLAIMS
from .coop import LITE0, PLATEAU, SETTING_KEYS
from .coop import MEMBER as DEEPLAB
from .coop import MODES as COOP_MODES
from .recipe import fine_tune_sections, overlay_settings
from .stats import cost_columns, differences_markdown, mean_std, paired_by_seed

ROWS: dict[str, dict[str, Any]] = {
    "deeplabv3plus": dict(DEEPLAB),
    "sum": {"arch": "dfdam", "backbone": LITE0, "fusion": "sum", "pretrained": True},
    "dafm": {"arch": "dfdam", "backbone": LITE0, "fusion": "dafm", "pretrained": True},
    "dafm+2dpam": {"arch": "dfdam", "backbone": LITE0, "fusion": "dafm+2dpam", "pretrained": True},
}
DEFAULT_ROWS = tuple(ROWS)
# (a, b): per-seed differences a - b in mIoU points: the claims register's Table 1 steps,
# then the full model against the plain sums and against DeepLabv3+.
COMPARISONS = (
    *((c.a.row, c.b.row) for c in CLAIMS if c.a.bench == "dfdam"),
    ("dafm+2dpam", "sum"),
    ("dafm+2dpam", "deeplabv3plus"),
)
# The paper's Table 1 (PASCAL VOC 2012 val, mIoU %), for reference beside ours.
PAPER_TABLE1 = {
    "ResNet-50": {"sum": 68.2, "dafm": 73.7, "dafm+2dpam": 74.6},
    "ResNet-101": {"sum": 72.9, "dafm": 76.8, "dafm+2dpam": 77.9},
}
# The cooperative bench's protocol (one recipe for every miniature); at its 128-px scenes
# DF-DAM's context maps are 8x8 (stride 16) and 4x4 (stride 32), not the 2x2 of 64 px.
PAIR_ONLY = ("fuse", "link_init")
MODES = {m: {k: v for k, v in s.items() if k not in PAIR_ONLY} for m, s in COOP_MODES.items()}
LATENCY_SIZE = (320, 640)  # the paper's Table 4/6 input (3x320x640)


def mode_settings(mode: str, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The mode's settings with ``settings`` (None values ignored) laid over them."""
    return overlay_settings(MODES, mode, settings, SETTING_KEYS, ignore=PAIR_ONLY)


def bench_config(
    row: str,
    seed: int,
    mode: str = "quick",
    out_dir: str | Path = "runs/bench-dfdam/runs",
    settings: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """One run's config: only the model section and the seed vary between runs."""
    if row not in ROWS:
        raise ValueError(f"unknown dfdam bench row {row!r}; one of {list(ROWS)}")
    s = mode_settings(mode, settings)
    model = {**ROWS[row], "num_classes": 11}
    if model["arch"] == "deeplabv3plus":  # DF-DAM's strides are fixed by its design
        model |= {"output_stride": s["output_stride"], "aspp_rates": s["aspp_rates"]}
    raw = {
        "name": f"{row}-seed{seed}",
        "seed": seed,
        "device": "auto",
        "out_dir": str(out_dir),
        "model": model,
        **fine_tune_sections(s),
    }
    return config_from_dict(raw, list(overrides))


def stage_roles(backbone: str = LITE0) -> dict[str, dict[str, Any]]:
    """Which backbone feature maps DF-DAM reads, in the paper's ResNet terms:
    ``{"layer1": {"module", "stride", "channels"}, "layer3": …, "layer4": …}``."""
    from ..models import create_model

    with torch.device("meta"):
        model = create_model("dfdam", backbone=backbone, num_classes=11, pretrained=False)
    info = model.backbone.feature_info
    names, strides, channels = info.module_name(), info.reduction(), info.channels()
    roles = {"layer1": model.spatial_index, "layer3": model.low_index, "layer4": model.high_index}
    return {
        role: {"module": names[i], "stride": strides[i], "channels": channels[i]}
        for role, i in roles.items()
    }


def measure_costs(
    rows: Sequence[str],
    scene_size: int,
    latency_size: Sequence[int] = LATENCY_SIZE,
    rounds: int = 3,
    iters: int = 5,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """Params, GMACs (scene size and ``latency_size``) and median latency (ms, batch 1,
    ``latency_size``) of each row's model, rows interleaved round by round."""
    from ..engine.profile import count_macs, count_params, measure_latency
    from ..models import create_model

    models = {}
    for row in rows:
        spec = {k: v for k, v in ROWS[row].items() if k != "arch"}
        torch.manual_seed(0)
        model = create_model(ROWS[row]["arch"], **{**spec, "num_classes": 11, "pretrained": False})
        models[row] = model.to(device).eval()
    hw = (int(latency_size[0]), int(latency_size[1]))
    out = {
        row: {
            "params_m": count_params(m) / 1e6,
            "gmacs_scene": count_macs(m, (scene_size, scene_size)) / 1e9,
            "gmacs_paper": count_macs(m, hw) / 1e9,
        }
        for row, m in models.items()
    }
    medians: dict[str, list[float]] = {row: [] for row in rows}
    for _ in range(rounds):
        for row, model in models.items():
            lat = measure_latency(model, hw, batch=1, warmup=1, iters=iters)
            medians[row].append(lat["median_ms"])
    for row in rows:
        out[row]["latency_ms"] = statistics.median(medians[row])
    return out


def summarise(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], plateau: float = PLATEAU
) -> dict[str, Any]:
    """Per row: val mIoU mean ± std (%), train time, and the plateau flag."""
    table = {}
    for row, results in runs.items():
        values = [100 * r["miou"]["out"] for r in results]
        low = [r.get("seed") for r, v in zip(results, values, strict=True) if v < plateau]
        table[row] = {
            "miou": mean_std(values),
            "plateau": bool(low),
            "plateau_seeds": low,
            **cost_columns(results),
        }
    return table


def comparisons(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Paired per-seed differences of ``COMPARISONS`` (rows present with shared seeds)."""
    out = []
    for a_row, b_row in COMPARISONS:
        if a_row in runs and b_row in runs:
            a = {r.get("seed"): 100 * r["miou"]["out"] for r in runs[a_row]}
            b = {r.get("seed"): 100 * r["miou"]["out"] for r in runs[b_row]}
            diff = paired_by_seed(a, b, f"{a_row} − {b_row}")
            out += [diff] if diff else []
    return out


def _label(row: str) -> str:
    return "DeepLabv3+" if row == "deeplabv3plus" else f"DF-DAM {row}"


def markdown(report: Mapping[str, Any]) -> str:
    """The Markdown page of a ``bench dfdam`` report (``dfdam.md``)."""
    s, table, costs = report["settings"], report["table"], report.get("costs", {})
    size = s["scene_size"]
    lat = "×".join(str(v) for v in report["latency_size"])
    roles = report["stage_roles"]
    mapping = ", ".join(
        f"`{v['module']}` (stride {v['stride']}, {v['channels']} ch) as {role}"
        for role, v in roles.items()
    )
    lines = [
        "## DF-DAM's Table 1 in miniature (`coopseg bench dfdam`)",
        "",
        "**Backbone changed:** ImageNet-pretrained `tf_efficientnet_lite0` for every row "
        "instead of the paper's ResNet-50/101 — only EfficientNet-Lite weights are available "
        f"offline. DF-DAM reads the deepest feature map at strides 4, 16 and 32: {mapping} "
        "(layer1 is the spatial information X^SI, layer3 and layer4 the context information), "
        "each projected to 128 channels as in the paper.",
        "",
        f"FashionScenes {size}×{size} ({s['train_scenes']} train / {s['val_scenes']} val), "
        f"mode `{report['mode']}`, seeds {report['seeds']}. **Equal budget for every row:** "
        f"{s['iterations']} iterations, batch {s['batch_size']}, AdamW lr {s['lr']:g}, poly "
        f"0.9, {s['frozen_stages']} frozen backbone stages, the same batches per seed, "
        "validation once at the end. DF-DAM keeps its two auxiliary losses (0.4, 0.1); "
        "DeepLabv3+ is the demo's (OS 32, 64-channel head).",
        "",
        f"| row | val mIoU % | params (M) | GMACs ({size}×{size}) | GMACs ({lat}) "
        f"| latency ms ({lat}, batch 1) | train time (s) | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, v in table.items():
        c = costs.get(row, {})
        check = "ok"
        if v["plateau"]:
            check = f"**on the plateau** (< {report['plateau']:g} %: seeds {v['plateau_seeds']})"

        def num(key: str, fmt: str, c: Mapping[str, float] = c) -> str:
            return format(c[key], fmt) if key in c else "—"

        lines.append(
            f"| {_label(row)} | {v['miou']['mean']:.1f} ± {v['miou']['std']:.1f} "
            f"| {v['params_m']:.2f} | {v['gmacs']:.3f} | {num('gmacs_paper', '.2f')} "
            f"| {num('latency_ms', '.1f')} | {v['train_s']['mean']:.0f} | {check} |"
        )
    paper = "; ".join(
        f"{net}: sum {t['sum']}, DAFM {t['dafm']}, DAFM + 2DPAM {t['dafm+2dpam']}"
        for net, t in PAPER_TABLE1.items()
    )
    lines += [
        "",
        f"The paper's Table 1 (PASCAL VOC 2012 val, mIoU %): {paper}.",
        "",
        "Params include DF-DAM's two auxiliary classifiers (the paper counts its training "
        "network). Latency: eval-mode forward, median over interleaved rounds, measured "
        f"after training on `{report.get('latency_device', 'cpu')}` with "
        f"{report.get('latency_threads', '?')} torch thread(s).",
        "",
    ]
    lines += differences_markdown(
        report["comparisons"], "### Paired differences (mIoU points, per seed: a − b)"
    )
    if report.get("chart"):
        lines += [f"![val mIoU per row]({report['chart']})", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> str:
    """Write ``dfdam.json``, ``dfdam.png`` and ``dfdam.md``; return the Markdown."""
    table = report["table"]
    series = {"val mIoU": [v["miou"] for v in table.values()]}
    title = f"DF-DAM ablation on lite0, {len(report['seeds'])} seeds: mean ± std"
    groups = [_label(r) for r in table]
    return runner.save_report(out_dir, "dfdam", report, series, groups, title, markdown)


def _progress(cfg: Config, result: Mapping[str, Any], reused: bool) -> None:
    how = "reused" if reused else f"{result['train_s']:.0f} s"
    print(f"[bench dfdam] {cfg.name}: {100 * result['miou']['out']:.1f} ({how})", flush=True)


def run_dfdam_bench(
    mode: str = "quick",
    seeds: Sequence[int] = (0, 1, 2),
    rows: Sequence[str] = DEFAULT_ROWS,
    out_dir: str | Path = "runs/bench-dfdam",
    *,
    settings: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    jobs: int = 1,
    threads: int | None = None,
    plateau: float = PLATEAU,
    keep_checkpoints: bool = False,
    rerun: bool = False,
    latency: bool = True,
    latency_size: Sequence[int] = LATENCY_SIZE,
    latency_threads: int | None = None,
) -> dict[str, Any]:
    """Train every row for every seed, measure each model's cost, and write
    ``dfdam.md``, ``dfdam.json`` and ``dfdam.png`` in ``out_dir``. Latency runs with
    ``latency_threads`` torch threads (None: one per CPU core, as a deployed model would)."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown dfdam bench row {unknown[0]!r}; one of {list(ROWS)}")
    out_dir = Path(out_dir)
    s = mode_settings(mode, settings)
    configs = [
        bench_config(row, seed, mode, out_dir / "runs", s, overrides)
        for seed in seeds
        for row in rows
    ]
    if jobs > 1 and configs:
        runner.prepare_fashionscenes(configs[0])
    results = runner.run_configs(
        configs,
        jobs=jobs,
        threads=threads,
        keep_checkpoints=keep_checkpoints,
        rerun=rerun,
        on_result=_progress,
    )
    runs: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
    for cfg in configs:
        row = cfg.name.rsplit("-seed", 1)[0]
        runs[row].append({**results[cfg.name], "seed": cfg.seed})
    torch.set_num_threads(latency_threads or os.cpu_count() or 1)
    costs = measure_costs(rows, s["scene_size"], latency_size) if latency else {}
    report: dict[str, Any] = {
        "bench": "dfdam",
        "mode": mode,
        "seeds": list(seeds),
        "settings": s,
        "overrides": list(overrides),
        "plateau": plateau,
        "rows": {row: ROWS[row] for row in rows},
        "stage_roles": stage_roles(LITE0),
        "latency_size": list(latency_size),
        "latency_device": "cpu",
        "latency_threads": torch.get_num_threads(),
        "costs": costs,
        "table": summarise(runs, plateau),
        "comparisons": comparisons(runs),
        "runs": runs,
    }
    text = write_report(report, out_dir)
    print(text)
    return report
