"""Val mIoU against wall time for the demo recipe: precision x schedule, then one lever at
a time (issue 21).

Runs ``coopseg demo``'s config back to back, one variant at a time (2 cores), each
with its ``--set`` overrides, and writes every result to a JSON file as soon as it is
done plus a Markdown table beside it. A variant whose result is in the JSON already is
skipped, so an interrupted pass continues where it stopped (a full pass is ~5 min per
variant; ``--variants`` picks some, ``--redo`` runs them again).

    python benchmarks/demo_budget.py [--variants fp32-iterations fp32-time ...]
        [--json benchmarks/results/demo_budget.json] [--val-interval 0] [--redo]
        [--set KEY=VALUE ...]
    python benchmarks/demo_budget.py --smoke --redo    # checks it runs (JSON in $TMPDIR)

Variants (all: the demo's max_time_s cap of 285 s; "time": its 265-s time budget):
``fp32|bf16-iterations`` the old demo, 780 iterations; ``fp32|bf16-time`` the time
budget, no precise BN; ``fp32-time+precise_bn`` / ``+ema`` / ``+workers1`` one lever on
top of ``fp32-time``; ``demo`` the config as it shipped first (amp auto, precise BN),
``demo+ema`` with the EMA on top (the demo as shipped since that pass). Wall time
is the training call's (data, probe, training, checkpoints, precise BN, the final
validation); ``train_s`` is the time schedule's clock (training steps only).
``--smoke`` shrinks every variant to a few iterations on 64 scenes: its figures mean
nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from coopseg.config import PACKAGED_CONFIGS, load_config
from coopseg.engine.train import train

DEFAULT_JSON = Path(__file__).parent / "results" / "demo_budget.json"
SETTINGS = {"iterations": 780, "precise_bn": 40, "ema": 0.995}
SMOKE = {"iterations": 3, "precise_bn": 2, "ema": 0.5}
SMOKE_SET = [
    "data.train_scenes=64",
    "data.val_scenes=16",
    "train.time_budget_s=4",
    "train.checkpoint_interval_s=0",
]


def variants(s: dict) -> dict[str, list[str]]:
    """Name -> ``--set`` overrides of the demo config."""
    plain = "train.precise_bn_batches=0"
    iters = ["train.schedule=iterations", f"train.iterations={s['iterations']}", plain]
    return {
        "fp32-iterations": ["train.amp=none", *iters],
        "bf16-iterations": ["train.amp=bf16", *iters],
        "fp32-time": ["train.amp=none", plain],
        "bf16-time": ["train.amp=bf16", plain],
        "fp32-time+precise_bn": ["train.amp=none", f"train.precise_bn_batches={s['precise_bn']}"],
        "fp32-time+ema": ["train.amp=none", plain, f"train.ema_decay={s['ema']}"],
        "fp32-time+workers1": ["train.amp=none", plain, "data.num_workers=1"],
        "demo": [f"train.precise_bn_batches={s['precise_bn']}"],
        "demo+ema": [f"train.precise_bn_batches={s['precise_bn']}", f"train.ema_decay={s['ema']}"],
    }


def machine() -> dict:
    """CPU name and the flags that decide bf16, threads, torch: every figure's context."""
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split())
    return {
        "cpu": name,
        "bf16_flags": sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16"}),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def run_variant(name: str, overrides: list[str], val_interval: int, workdir: str) -> dict:
    cfg = load_config(
        PACKAGED_CONFIGS / "demo.yaml",
        [f"name={name}", f"out_dir={workdir}", f"train.val_interval={val_interval}", *overrides],
    )
    start = time.time()
    result = train(cfg, show_progress=False)
    wall = time.time() - start
    log = result.run_dir / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    first = next(r for r in records if r["kind"] == "start")
    curve = [
        {
            "iteration": r["step"],
            "wall_s": round(r["time"] - start, 1),
            "train_s": round(r.get("train_s", 0.0), 1),
            "miou": r["miou"],
        }
        for r in records
        if r["kind"] == "val"
    ]
    iou = [float(v) for v in result.last_metrics.iou] if result.last_metrics else []
    return {
        "variant": name,
        "overrides": overrides,
        "schedule": cfg.train.schedule,
        "precision": first.get("precision"),
        "amp_probe": first.get("amp_probe"),
        "iterations": result.iteration,
        "train_s": round(result.train_s, 1),
        "wall_s": round(wall, 1),
        "final_miou": curve[-1]["miou"] if curve else None,
        "min_object_iou": min(iou[1:]) if len(iou) > 1 else None,
        "per_class_iou": iou,
        "curve": curve,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def markdown(results: dict[str, dict], meta: dict) -> str:
    """The results as a table, in the variants' order (then any other names)."""
    order = [*variants(SETTINGS), *results]
    results = {name: results[name] for name in dict.fromkeys(order) if name in results}
    lines = [
        f"Machine: {meta['cpu']} (bf16 flags: {', '.join(meta['bf16_flags']) or 'none'}), "
        f"{meta['cores']} cores, {meta['threads']} threads, torch {meta['torch']}.",
        "",
        "| variant | precision | schedule | iterations | train s | wall s | val mIoU % "
        "| lowest object IoU % | mIoU at (wall s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        curve = ", ".join(f"{100 * c['miou']:.1f} ({c['wall_s']:.0f})" for c in r["curve"])
        pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
        lines.append(
            f"| {r['variant']} | {r['precision']} | {r['schedule']} | {r['iterations']} | "
            f"{r['train_s']} | {r['wall_s']} | {pct(r['final_miou'])} | "
            f"{pct(r['min_object_iou'])} | {curve} |"
        )
    return "\n".join(lines) + "\n"


def save(path: Path, data: dict) -> None:
    """Atomically: a pass killed mid-write keeps the results it had."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", help="default: all, in the order above")
    p.add_argument("--json", help=f"results (default {DEFAULT_JSON}; --smoke: a temp file)")
    p.add_argument("--val-interval", type=int, default=0, help="also validate every N its")
    p.add_argument("--redo", action="store_true", help="run the chosen variants again")
    p.add_argument("--smoke", action="store_true", help="a few iterations each: checks it runs")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    table = variants(SMOKE if args.smoke else SETTINGS)
    chosen = args.variants or list(table)
    unknown = [v for v in chosen if v not in table]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; one of {list(table)}")
    extra = [*(SMOKE_SET if args.smoke else []), *args.overrides]
    smoke_json = Path(tempfile.gettempdir()) / "demo_budget_smoke.json"
    path = Path(args.json) if args.json else (smoke_json if args.smoke else DEFAULT_JSON)
    data = json.loads(path.read_text()) if path.is_file() else {"results": {}}
    data["machine"] = machine()
    for name in chosen:
        if name in data["results"] and not args.redo:
            print(f"{name}: done already ({path}), skipped", flush=True)
            continue
        with tempfile.TemporaryDirectory() as workdir:
            r = run_variant(name, [*table[name], *extra], args.val_interval, workdir)
        data["results"][name] = r
        save(path, data)
        print(
            f"{name}: {r['precision']}, {r['iterations']} it, {r['train_s']} s training, "
            f"{r['wall_s']} s wall, val mIoU {100 * (r['final_miou'] or 0):.1f}",
            flush=True,
        )
    md = markdown(data["results"], data["machine"])
    path.with_suffix(".md").write_text(md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
