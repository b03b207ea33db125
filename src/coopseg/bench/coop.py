"""The cooperative experiment in miniature: every preset, one budget, several seeds.

Each preset trains pairs of small DeepLabv3+ members (one member for ``single``) on
FashionScenes with the same iterations and the same batch per member, then every
member's output and the fused output are evaluated on the validation scenes. The
table reports mean ± std over seeds, with parameters, GMACs and training time, in
Markdown and JSON.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import Config, config_from_dict
from ..engine.profile import count_macs, count_params
from ..engine.train import Trainer

PRESET_ROWS = (
    "single",
    "ensemble",
    "oneway-same",
    "oneway-multiple",
    "cross",
    "cross-detach",
    "cross-no-paths",
)
# Rows that are a preset plus model keys: the gradient ablation (the papers' "trains two
# CNNs separately at the same time" may mean no gradient flows back into the sender).
ROW_MODEL_KEYS: dict[str, tuple[str, dict[str, Any]]] = {
    "cross-detach": ("cross", {"detach": True}),
}

MEMBER = {
    "arch": "deeplabv3plus",
    "backbone": "resnet18",
    "output_stride": 16,
    "aspp_channels": 64,
    "decoder_channels": 64,
    "low_level_channels": 24,
    "pretrained": False,
}

MODES: dict[str, dict[str, Any]] = {
    # ~15 minutes on 2 CPU cores (0.19 s per member step): 5 trained presets x 3 seeds.
    "quick": {"iterations": 170, "scene_size": 64, "train_scenes": 1000, "val_scenes": 100},
    # The documented full run (see BENCHMARKS.md for its runtime): 128x128 scenes.
    "full": {"iterations": 2000, "scene_size": 128, "train_scenes": 2000, "val_scenes": 250},
}


def bench_config(
    preset: str, seed: int, mode: str, out_dir: Path, iterations: int | None = None
) -> Config:
    """The config of one bench run: only the preset and the seed vary."""
    m = {**MODES[mode], **({"iterations": iterations} if iterations else {})}
    row = preset
    preset, model_keys = ROW_MODEL_KEYS.get(row, (row, {}))
    members = 1 if preset == "single" else 2
    size = m["scene_size"]
    raw = {
        "name": f"{row}-seed{seed}",
        "seed": seed,
        "device": "auto",
        "out_dir": str(out_dir),
        "model": {
            "arch": "cooperative",
            "preset": preset,
            "num_classes": 11,
            "members": [dict(MEMBER) for _ in range(members)],
            **model_keys,
        },
        "data": {
            "dataset": "fashionscenes",
            "scene_size": size,
            "train_scenes": m["train_scenes"],
            "val_scenes": m["val_scenes"],
            "batch_size": 8,  # per member: every member sees the same 8 images
            "val_batch_size": 25,
            "crop_size": [size, size],
        },
        "train": {
            "iterations": m["iterations"],
            "optimizer": "adamw",
            "lr": 0.003,
            "weight_decay": 0.0001,
            "amp": "bf16",
            "channels_last": True,
            "val_interval": 0,
            "checkpoint_interval": 0,
            "log_interval": 50,
        },
    }
    return config_from_dict(raw)


def run_one(cfg: Config) -> dict[str, Any]:
    trainer = Trainer(cfg, show_progress=False)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    model = trainer.model
    metrics = trainer.output_metrics  # the final validation: fused and every member
    size = cfg.data.scene_size
    device = next(model.parameters()).device
    return {
        # A one-member model has only "out": its prediction goes in the fused column.
        "miou": {("fused" if name == "out" else name): m.miou for name, m in metrics.items()},
        "params_m": count_params(model) / 1e6,
        "gmacs": count_macs(model.eval(), (size, size), device=device) / 1e9,
        "train_s": train_s,
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for preset, results in runs.items():
        outputs = sorted({k for r in results for k in r["miou"]}, key=_output_order)
        row = {name: _mean_std([100 * r["miou"][name] for r in results]) for name in outputs}
        table[preset] = {
            "miou": {k: {"mean": v[0], "std": v[1]} for k, v in row.items()},
            "params_m": results[0]["params_m"],
            "gmacs": results[0]["gmacs"],
            "train_s": _mean_std([r["train_s"] for r in results])[0],
            "seeds": len(results),
        }
    return table


def _output_order(name: str) -> tuple[int, str]:
    return ({"fused": 0, "top": 1, "bottom": 2}.get(name, 3), name)


def markdown(table: dict[str, Any], mode: str, seeds: Sequence[int]) -> str:
    lines = [
        f"FashionScenes, mode `{mode}`, seeds {list(seeds)}: val mIoU % (mean ± std)",
        "",
        "| preset | fused | top | bottom | params (M) | GMACs | train time (s) |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(row: dict[str, Any], name: str) -> str:
        value = row["miou"].get(name)
        return "—" if value is None else f"{value['mean']:.1f} ± {value['std']:.1f}"

    for preset, row in table.items():
        lines.append(
            f"| {preset} | {cell(row, 'fused')} | {cell(row, 'top')} | {cell(row, 'bottom')} "
            f"| {row['params_m']:.2f} | {row['gmacs']:.2f} | {row['train_s']:.0f} |"
        )
    lines += [
        "",
        "fused = mean of the members' softmax probabilities (single: the one network's "
        "output); top/bottom = each member's own output. The papers report each network's "
        "own output for linked presets (the bottom one for one-way) and fused for the "
        "ensemble.",
    ]
    return "\n".join(lines) + "\n"


def run_coop_bench(
    mode: str = "quick",
    seeds: Sequence[int] = (0, 1, 2),
    presets: Sequence[str] = PRESET_ROWS,
    out_dir: str | Path = "runs/bench-coop",
    iterations: int | None = None,
) -> dict[str, Any]:
    """Train every preset for every seed; write ``coop.md`` and ``coop.json`` in ``out_dir``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    out_dir = Path(out_dir)
    runs: dict[str, list[dict[str, Any]]] = {}
    for preset in presets:
        for seed in seeds:
            if preset == "cross-no-paths" and "ensemble" in runs:
                # No links: the very model `ensemble` builds (same seed, same batches),
                # so the same numbers; training it again would only cost time.
                done = runs.setdefault(preset, [])
                done.append(dict(runs["ensemble"][len(done)]))
                continue
            cfg = bench_config(preset, seed, mode, out_dir / "runs", iterations)
            result = run_one(cfg)
            runs.setdefault(preset, []).append(result)
            shown = ", ".join(f"{k} {100 * v:.1f}" for k, v in result["miou"].items())
            print(f"[bench coop] {preset} seed {seed}: {shown} ({result['train_s']:.0f} s)")
    table = summarise(runs)
    settings = {**MODES[mode], **({"iterations": iterations} if iterations else {})}
    report = {"mode": mode, "seeds": list(seeds), "config": settings, "member": MEMBER}
    report |= {"table": table, "runs": runs}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "coop.json").write_text(json.dumps(report, indent=2))
    text = markdown(table, mode, seeds)
    (out_dir / "coop.md").write_text(text)
    print(text)
    return report
