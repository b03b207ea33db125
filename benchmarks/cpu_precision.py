"""fp32 vs bf16 autocast step time of the demo model on this CPU (issue 21).

The measurement ``train.amp: auto`` makes at the start of a run (engine/precision.py:
the same step on a copy of the model, fp32 and bf16 interleaved), with more steps, to
say whether the probe is worth its seconds here:

    python benchmarks/cpu_precision.py [--steps 12] [--threads 2] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from coopseg.config import PACKAGED_CONFIGS, load_config
from coopseg.engine.precision import choose_precision, precision_name, probe_precision
from coopseg.engine.train import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps per precision")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"out_dir={out}", "train.amp=none", *args.overrides]
        trainer = Trainer(
            load_config(PACKAGED_CONFIGS / "demo.yaml", overrides), show_progress=False
        )
        _, fp32_s, bf16_s = probe_precision(trainer.probe_step(), steps=args.steps, warmup=2)
    print(
        f"{args.threads} threads, medians of {args.steps} steps: fp32 {1000 * fp32_s:.0f} ms, "
        f"bf16 {1000 * bf16_s:.0f} ms, bf16/fp32 {bf16_s / fp32_s:.2f} -> amp auto takes "
        f"{precision_name(choose_precision(fp32_s, bf16_s))}"
    )


if __name__ == "__main__":
    main()
