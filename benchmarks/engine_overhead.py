"""Engine overhead: coopseg's training step vs a bare PyTorch loop vs smp's DeepLabV3+.

For each backbone, in one process and interleaved round by round (so machine noise
hits every variant alike), this times:

  (a) ``Trainer.step`` of the coopseg engine (loss, autocast context, grad scaler,
      scheduler) on an in-memory batch,
  (b) a bare loop on the *same* model: forward, cross-entropy, backward, SGD step,
  (c) segmentation_models_pytorch's ``DeepLabV3Plus`` with the same encoder, bare loop,

plus eval-mode inference latency of each model. GMAC/s uses the forward MACs per
image x batch (x3 for a training step: forward + two backward products).

    python benchmarks/engine_overhead.py [--backbones resnet18 resnet50] [--size 256]
        [--batch 4] [--rounds 5] [--steps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from coopseg.config import config_from_dict
from coopseg.engine.profile import count_macs
from coopseg.engine.train import Trainer


def make_trainer(backbone: str, size: int, batch: int, workdir: str) -> Trainer:
    cfg = config_from_dict(
        {
            "name": f"bench-{backbone}",
            "out_dir": workdir,
            "device": "cpu",
            "model": {"arch": "deeplabv3plus", "backbone": backbone, "num_classes": 11},
            "data": {
                "root": os.path.join(workdir, "scenes"),
                "train_scenes": 16,
                "val_scenes": 4,
                "batch_size": batch,
                "crop_size": [size, size],
            },
            "train": {"iterations": 10_000, "lr": 1e-3},
        }
    )
    return Trainer(cfg, show_progress=False)


def bare_step(model, optimizer, images, masks) -> None:
    out = model(images)
    logits = out["out"] if isinstance(out, dict) else out
    loss = F.cross_entropy(logits, masks, ignore_index=255)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1000.0


@torch.no_grad()
def infer(model, images) -> None:
    model(images)


def run(backbone: str, size: int, batch: int, rounds: int, steps: int, workdir: str) -> dict:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size)
    masks = torch.randint(0, 11, (batch, size, size))
    trainer = make_trainer(backbone, size, batch, workdir)
    ours = trainer.model
    bare_opt = torch.optim.SGD(ours.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    theirs = smp.DeepLabV3Plus(encoder_name=backbone, encoder_weights=None, classes=11)
    their_opt = torch.optim.SGD(theirs.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    variants = {
        "coopseg_engine": lambda: trainer.step(images, masks),
        "coopseg_bare": lambda: bare_step(ours, bare_opt, images, masks),
        "smp_bare": lambda: bare_step(theirs, their_opt, images, masks),
    }
    for fn in variants.values():  # warm-up
        fn()
    train_ms: dict[str, list[float]] = {k: [] for k in variants}
    infer_ms: dict[str, list[float]] = {"coopseg": [], "smp": []}
    for _ in range(rounds):
        for name, fn in variants.items():
            ours.train()
            theirs.train()
            train_ms[name].append(timed(fn, steps))
        ours.eval()
        theirs.eval()
        infer_ms["coopseg"].append(timed(lambda: infer(ours, images), steps))
        infer_ms["smp"].append(timed(lambda: infer(theirs, images), steps))

    macs = {
        "coopseg": count_macs(ours, (size, size)) / 1e9,
        "smp": count_macs(theirs, (size, size)) / 1e9,
    }
    median = {k: statistics.median(v) for k, v in train_ms.items()}
    inf = {k: statistics.median(v) for k, v in infer_ms.items()}
    result = {
        "backbone": backbone,
        "train_ms": median,
        "infer_ms": inf,
        "gmacs_per_image": macs,
        "train_gmac_per_s": {
            "coopseg_engine": 3 * macs["coopseg"] * batch / (median["coopseg_engine"] / 1000),
            "coopseg_bare": 3 * macs["coopseg"] * batch / (median["coopseg_bare"] / 1000),
            "smp_bare": 3 * macs["smp"] * batch / (median["smp_bare"] / 1000),
        },
        "infer_gmac_per_s": {k: macs[k] * batch / (inf[k] / 1000) for k in inf},
        "engine_overhead": median["coopseg_engine"] / median["coopseg_bare"] - 1.0,
        "params_m": {
            "coopseg": sum(p.numel() for p in ours.parameters()) / 1e6,
            "smp": sum(p.numel() for p in theirs.parameters()) / 1e6,
        },
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, input {args.batch}x3x{args.size}x{args.size}"
    )
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for backbone in args.backbones:
            r = run(backbone, args.size, args.batch, args.rounds, args.steps, workdir)
            results.append(r)
            t, i, g = r["train_ms"], r["infer_ms"], r["train_gmac_per_s"]
            print(
                f"\n## DeepLabV3+ {backbone}  (params: coopseg {r['params_m']['coopseg']:.2f} M, "
                f"smp {r['params_m']['smp']:.2f} M; GMACs/image: coopseg "
                f"{r['gmacs_per_image']['coopseg']:.2f}, smp {r['gmacs_per_image']['smp']:.2f})"
            )
            print("| variant | train ms/step | train GMAC/s | infer ms/batch | infer GMAC/s |")
            print("|---|---|---|---|---|")
            print(
                f"| coopseg engine | {t['coopseg_engine']:.0f} | {g['coopseg_engine']:.0f} | "
                f"{i['coopseg']:.0f} | {r['infer_gmac_per_s']['coopseg']:.0f} |"
            )
            print(
                f"| coopseg model, bare loop | {t['coopseg_bare']:.0f} | {g['coopseg_bare']:.0f} "
                "| | |"
            )
            print(
                f"| smp DeepLabV3Plus, bare loop | {t['smp_bare']:.0f} | {g['smp_bare']:.0f} | "
                f"{i['smp']:.0f} | {r['infer_gmac_per_s']['smp']:.0f} |"
            )
            print(f"engine overhead: {100 * r['engine_overhead']:+.1f} %")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
