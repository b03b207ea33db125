"""Val mIoU against wall time: the demo recipe from random init vs ImageNet-pretrained.

Runs ``coopseg demo``'s config back to back (one at a time: 2 cores) with only the
backbone and its weights changed, validating every ``--val-interval`` iterations, and
prints one Markdown table of val mIoU at each validation with the seconds since the
run's start (validation passes included, equally for every variant).

    python benchmarks/pretrained_demo.py [--variants resnet18:random tf_efficientnet_lite0 ...]
        [--val-interval 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coopseg.config import PACKAGED_CONFIGS, load_config
from coopseg.engine.train import train

DEFAULT_VARIANTS = [
    "resnet18:random",
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "tf_efficientnet_lite2",
]


def run_variant(spec: str, val_interval: int, workdir: str, extra: list[str]) -> dict:
    backbone, _, init = spec.partition(":")
    pretrained = "false" if init == "random" else "true"
    overrides = [
        f"name={backbone}-{init or 'imagenet'}",
        f"out_dir={workdir}",
        f"model.backbone={backbone}",
        f"model.pretrained={pretrained}",
        f"train.val_interval={val_interval}",
        *extra,
    ]
    cfg = load_config(PACKAGED_CONFIGS / "demo.yaml", overrides)
    start = time.time()
    result = train(cfg, show_progress=False)
    records = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    curve = [
        {"iteration": r["step"], "seconds": round(r["time"] - start, 1), "miou": r["miou"]}
        for r in records
        if r["kind"] == "val"
    ]
    return {
        "variant": spec,
        "iterations": result.iteration,
        "wall_s": round(time.time() - start, 1),
        "best_miou": result.best_miou,
        "final_miou": curve[-1]["miou"] if curve else None,
        "curve": curve,
        "per_class_iou": [float(v) for v in result.last_metrics.iou] if result.last_metrics else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--val-interval", type=int, default=100)
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for spec in args.variants:
            results.append(run_variant(spec, args.val_interval, workdir, args.overrides))
            r = results[-1]
            print(
                f"{spec}: {r['iterations']} it, {r['wall_s']} s, final mIoU "
                f"{100 * (r['final_miou'] or 0):.1f}",
                flush=True,
            )
    print("\n| variant | iterations | wall s | val mIoU at (s) ... | final mIoU | min class IoU |")
    print("|---|---|---|---|---|---|")
    for r in results:
        curve = ", ".join(f"{100 * c['miou']:.1f} ({c['seconds']:.0f})" for c in r["curve"])
        low = min(r["per_class_iou"]) if r["per_class_iou"] else float("nan")
        print(
            f"| {r['variant']} | {r['iterations']} | {r['wall_s']} | {curve} | "
            f"{100 * (r['final_miou'] or 0):.1f} | {100 * low:.1f} |"
        )
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(meta, fh, indent=1)


if __name__ == "__main__":
    main()
