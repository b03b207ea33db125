"""Cost of cooperation: train-step time of ``ensemble`` and ``cross`` pairs vs one member.

In one process, interleaved round by round (machine noise hits every variant alike),
this times a full training step (forward, summed cross-entropy, backward, SGD step)
of: one member alone, an ``ensemble`` pair, a ``cross`` pair (Connection 1 and 2 on),
and a ``cross`` pair without the two extra connections -- identical members. It also
reports each variant's forward MACs, so a step-time ratio can be read against the
compute the variant really adds: a cross link *widens* the receiving layers (the
paper's design), which costs MACs that no implementation can avoid. ``overhead`` is
step-time ratio / MAC ratio: 1.0 means the link machinery itself costs nothing.

    python benchmarks/coop_overhead.py [--backbone resnet18] [--size 256] [--batch 4]
        [--rounds 5] [--steps 3] [--device cpu|cuda] [--amp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from coopseg.engine.profile import count_macs
from coopseg.models import create_model


def member(backbone: str) -> dict:
    return {"arch": "deeplabv3plus", "backbone": backbone, "output_stride": 16}


def build(variant: str, backbone: str, classes: int) -> torch.nn.Module:
    if variant == "single":
        return create_model("deeplabv3plus", backbone=backbone, num_classes=classes)
    preset, extra = {
        "ensemble": ("ensemble", {}),
        "cross": ("cross", {}),
        "cross-no-c1c2": ("cross", {"connection1": False, "connection2": False}),
    }[variant]
    return create_model(
        "cooperative",
        members=[member(backbone), member(backbone)],
        preset=preset,
        num_classes=classes,
        **extra,
    )


def step_fn(model, images, masks, amp: bool):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    ctx = torch.autocast(images.device.type, dtype=torch.bfloat16) if amp else nullcontext()

    def step() -> None:
        with ctx:
            out = model(images)
        loss = sum(
            F.cross_entropy(v.float(), masks, ignore_index=255)
            for k, v in out.items()
            if k == "out" or k.endswith(".out")
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if images.device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--json")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    masks = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)
    variants = ["single", "ensemble", "cross", "cross-no-c1c2"]
    models = {v: build(v, args.backbone, args.classes).to(device).train() for v in variants}
    macs = {
        v: count_macs(m.eval(), (args.size, args.size), device=device) / 1e9
        for v, m in models.items()
    }
    steps = {v: step_fn(m.train(), images, masks, args.amp) for v, m in models.items()}
    for fn in steps.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, fn in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[v].append((time.perf_counter() - start) / args.steps * 1000.0)
    median = {v: statistics.median(t) for v, t in times.items()}
    rows = {}
    for v in variants:
        t_ratio = median[v] / median["single"]
        m_ratio = macs[v] / macs["single"]
        rows[v] = {
            "step_ms": median[v],
            "gmacs": macs[v],
            "time_ratio": t_ratio,
            "mac_ratio": m_ratio,
            "overhead": t_ratio / m_ratio,
        }
    print(
        f"{args.backbone}, {args.size}x{args.size}, batch {args.batch}, {device}, "
        f"amp={'bf16' if args.amp else 'off'}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| variant | step (ms) | GMACs/img | time ratio | MAC ratio | time/MAC ratio |")
    print("|---|---|---|---|---|---|")
    for v, r in rows.items():
        print(
            f"| {v} | {r['step_ms']:.0f} | {r['gmacs']:.2f} | {r['time_ratio']:.2f}x "
            f"| {r['mac_ratio']:.2f}x | {r['overhead']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
