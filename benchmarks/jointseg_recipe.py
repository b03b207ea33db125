"""Which recipe lets the JointSeg register's segmenters leave the background plateau?

At the register's budget (1000 iterations, Nesterov SGD lr 0.01, 64-px scenes, random
init) every segmenter of seed 0 stayed on the plateau (U-Net 6.4 %, FCN-8s 9.8 %,
JointSeg 6.7 % val mIoU), so the JointSeg segmentation claims get no verdict. This probe
trains the claim rows of seed 0 under other learning rates, optimizers and lengths and
prints each run's best validation mIoU, so that the next register protocol is chosen
from measurements (one seed: a recipe check, not a comparison).

    python benchmarks/jointseg_recipe.py --rows unet fcn8s jointseg \\
        --variants sgd:0.05 sgd:0.1 adamw:0.006 --iterations 1000

Writes ``benchmarks/results/jointseg-recipe.json`` (appending to what is there).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from coopseg.bench import jointseg, runner

RESULTS = Path("benchmarks/results/jointseg-recipe.json")


def variant_config(row: str, variant: str, iterations: int, out: Path):
    """Seed 0 of ``row`` under ``optimizer:lr``; the classifier's lr stays x30 (SGD) --
    AdamW takes the issue-14 recipe's x5, since x30 on an Adam step is x30 the step size."""
    optimizer, lr = variant.split(":")
    overrides = []
    settings = {"iterations": iterations, "lr": float(lr), "val_interval": iterations // 5}
    if optimizer == "adamw":
        overrides = ["train.optimizer=adamw", "train.nesterov=false"]
        settings["cls_lr_ratio"] = 5.0
    folder = out / f"{optimizer}-{lr}-{iterations}"
    return jointseg.bench_config(row, 0, "register", folder, settings, overrides)


def record(row: str, variant: str, iterations: int, result: dict[str, Any]) -> None:
    """Append one probe run to ``RESULTS`` (written at once, so a later crash keeps it)
    and print its best and final val mIoU (and classifier top-1, where there is one)."""
    table = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    entry = {
        "row": row,
        "variant": variant,
        "iterations": iterations,
        "scores": result["scores"],
        "train_s": result.get("train_s"),
    }
    RESULTS.write_text(json.dumps([*table, entry], indent=1) + "\n")
    nan = {"best": float("nan"), "final": float("nan")}
    seg = result["scores"].get("seg", nan)
    cls = result["scores"].get("cls_top1", nan)
    print(
        f"{variant:>22} {row:>10}: seg best {seg['best']:.1f} "
        f"(final {seg['final']:.1f}), cls_top1 {cls['best']:.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["unet", "fcn8s", "jointseg"])
    parser.add_argument("--variants", nargs="+", default=["sgd:0.05", "sgd:0.1", "adamw:0.006"])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default="runs/jointseg-recipe")
    args = parser.parse_args()
    configs = [
        variant_config(row, v, args.iterations, Path(args.out))
        for v in args.variants
        for row in args.rows
    ]
    runner.prepare_fashionscenes(configs[0])
    runner.run_configs(configs, jobs=args.jobs, threads=args.threads, work=jointseg.train_row)
    for cfg in configs:
        result = runner.cached_result(cfg)  # by folder: every variant's run has one name
        assert result is not None, cfg.run_dir
        record(jointseg.row_of(cfg), Path(cfg.out_dir).name, args.iterations, result)


if __name__ == "__main__":
    main()
