"""How light is DF-DAM? Params, GMACs and latency of DF-DAM, DeepLabv3+ and DANet.

The DF-DAM paper presents itself as a light model; this puts it beside DeepLabv3+
(OS 16) and DANet (OS 8) on the same backbone and input (3x320x640, 19 classes, as in
the paper's size table). Latency is measured interleaved, round by round, so machine
noise hits every model alike; quote the ratios.

    python benchmarks/arch_latency.py [--backbone resnet18] [--size 320 640] [--rounds 5]
        [--iters 3] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from coopseg.engine.profile import count_macs, count_params
from coopseg.models import create_model

MODELS = {
    "dfdam": {"arch": "dfdam"},
    "deeplabv3plus": {"arch": "deeplabv3plus", "output_stride": 16},
    "danet": {"arch": "danet", "output_stride": 8},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, nargs=2, default=[320, 640])
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json")
    args = p.parse_args()

    device = torch.device(args.device)
    x = torch.randn(1, 3, *args.size, device=device)
    models = {}
    for name, spec in MODELS.items():
        spec = dict(spec)
        arch = spec.pop("arch")
        models[name] = (
            create_model(arch, backbone=args.backbone, num_classes=args.classes, **spec)
            .to(device)
            .eval()
        )
    rows = {
        name: {
            "params_m": count_params(m) / 1e6,
            "gmacs": count_macs(m, tuple(args.size), device=device) / 1e9,
            "ms": [],
        }
        for name, m in models.items()
    }
    with torch.no_grad():
        for m in models.values():
            m(x)  # warm-up
        for _ in range(args.rounds):
            for name, m in models.items():
                best = float("inf")
                for _ in range(args.iters):
                    start = time.perf_counter()
                    m(x)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    best = min(best, (time.perf_counter() - start) * 1000)
                rows[name]["ms"].append(best)
    base = statistics.median(rows["dfdam"]["ms"])
    print(
        f"{args.backbone}, 3x{args.size[0]}x{args.size[1]}, {args.classes} classes, batch 1, "
        f"{device}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; latency = median over rounds of the best of "
        f"{args.iters}"
    )
    print("| model | params (M) | GMACs | latency (ms) | latency vs DF-DAM |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        ms = statistics.median(r["ms"])
        r["latency_ms"] = ms
        print(f"| {name} | {r['params_m']:.2f} | {r['gmacs']:.2f} | {ms:.0f} | {ms / base:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
