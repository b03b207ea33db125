"""Is the JointSeg register's background plateau a width choice?

The register's U-Net and JointSeg segmenters (encoder widths 8/16/32/64, decoders as
narrow as the encoder) stay on the background plateau at 1000 and 4000 iterations, while
FCN-8s on the same encoder (a 128-channel head) leaves it. This probe trains seed 0 at the
register's recipe (Nesterov SGD 0.01, 1000 iterations) with one width changed at a time:

- ``unet-double-conv``: U-Net with plain double-conv decoder blocks instead of inception;
- ``unet-wide-decoder`` / ``jointseg-wide-decoder``: decoder stages 64/32/32(/32);
- ``unet-wide-encoder`` / ``fcn8s-wide-encoder``: encoder widths doubled (16/32/64/128).

    python benchmarks/jointseg_capacity.py            # all five, one after another

One seed: a diagnosis, not a comparison. Appends to
``benchmarks/results/jointseg-recipe.json`` (variant ``capacity:<name>``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jointseg_recipe import record  # the sibling probe: one results file, one entry shape

from coopseg.bench import jointseg, runner

ITERATIONS = 1000
WIDE_ENCODER = ["model.widths=[16, 32, 64, 128]"]
# name: (row, U-Net head options replacing the register's, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "unet-double-conv": ("unet", {"decoder_block": "double_conv"}, []),
    "unet-wide-decoder": ("unet", {"decoder_channels": [64, 32, 32]}, []),
    "jointseg-wide-decoder": ("jointseg", {}, ["model.decoder_channels=[64, 32, 32, 32]"]),
    "unet-wide-encoder": ("unet", {}, WIDE_ENCODER),
    "fcn8s-wide-encoder": ("fcn8s", {}, WIDE_ENCODER),
}


def run_variant(name: str, out: Path) -> dict[str, Any]:
    """Train one variant in this process; the U-Net head options go through
    ``jointseg.segmenter_options``, which every random-init baseline is built with."""
    row, unet_options, overrides = VARIANTS[name]
    register_options = jointseg.segmenter_options

    def options(arch: str, levels: int, deepest: int) -> dict[str, Any]:
        base = dict(register_options(arch, levels, deepest))
        return base | unet_options if arch == "unet" else base

    settings = {"iterations": ITERATIONS, "val_interval": ITERATIONS // 5}
    cfg = jointseg.bench_config(row, 0, "register", out / name, settings, overrides)
    runner.prepare_fashionscenes(cfg)
    jointseg.segmenter_options = options
    try:
        result = jointseg.train_row(cfg)
    finally:
        jointseg.segmenter_options = register_options
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="runs/jointseg-capacity")
    args = parser.parse_args()
    for name in args.variants:
        result = run_variant(name, Path(args.out))
        record(VARIANTS[name][0], f"capacity:{name}", ITERATIONS, result)


if __name__ == "__main__":
    main()
