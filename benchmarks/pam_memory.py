"""DANet's position attention (PAM): peak memory and time, dense vs memory-bounded.

For each feature-map size, PAM implementation (``dense``, ``chunked``, ``sdpa``) and
pass (``fwd``: forward under no_grad; ``train``: forward + backward), this measures
the whole PAM module (Q/K/V projections, attention, residual) on a random map:

  peak  the peak memory the pass adds on top of its inputs and weights. CUDA:
        ``torch.cuda.max_memory_allocated``. CPU: each measurement runs in a fresh
        child process and reports its peak resident set (``ru_maxrss``) minus the
        resident set just before the pass, so allocator caches of earlier runs
        cannot hide or inflate anything.
  time  median wall time of ``--repeats`` passes after the measured one (the measured
        one when ``--repeats 0``). With ``--rounds R`` the implementations take turns
        R times (fresh processes on CPU), so load changes on a shared machine hit all
        alike; the table gives the median over rounds and the largest peak.

Also checks that every implementation's output matches dense (max abs difference).

    python benchmarks/pam_memory.py [--sizes 64x64 96x192] [--batch 2] [--channels 512]
        [--impls dense chunked sdpa] [--passes fwd train] [--repeats 1] [--rounds 3]
        [--device cpu|cuda] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from coopseg.models.danet import PositionAttention


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    impl: str, hw: tuple[int, int], batch: int, channels: int, pass_: str, repeats: int, device: str
) -> dict:
    """One (implementation, size, pass) measurement in this process."""
    dev = torch.device(device)
    torch.manual_seed(0)
    pam = PositionAttention(channels, impl=impl).to(dev)
    with torch.no_grad():
        pam.gamma.fill_(0.5)  # so the attention term is part of the output
    small = torch.randn(batch, channels, 8, 8, device=dev, requires_grad=pass_ == "train")
    x = torch.randn(batch, channels, *hw, device=dev, requires_grad=pass_ == "train")

    def run(x: torch.Tensor = x) -> torch.Tensor:
        if pass_ == "fwd":
            with torch.no_grad():
                return pam(x)
        out = pam(x)
        out.square().mean().backward()
        x.grad = None
        pam.zero_grad(set_to_none=True)
        return out.detach()

    run(small)  # libraries allocate their workspaces on first use: not PAM's memory
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = _rss_mib()
    start = time.perf_counter()
    out = run()
    _sync(dev)
    first = time.perf_counter() - start
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    times = []
    for _ in range(repeats):
        del out
        start = time.perf_counter()
        out = run()
        _sync(dev)
        times.append(time.perf_counter() - start)
    if impl == "dense":
        err = 0.0
    else:
        with torch.no_grad():
            pam.impl = "dense"
            ref = pam(x)
        err = (out - ref).abs().max().item()
    return {
        "impl": impl,
        "size": f"{hw[0]}x{hw[1]}",
        "pass": pass_,
        "peak_mib": round(peak, 1),
        "time_s": round(statistics.median(times) if times else first, 4),
        "max_abs_diff_vs_dense": err,
    }


def measure_isolated(args: argparse.Namespace, impl: str, size: str, pass_: str) -> dict:
    """CPU: run one measurement in a fresh interpreter (a clean peak RSS)."""
    cmd = [
        sys.executable,
        __file__,
        "--one",
        f"{impl},{size},{pass_}",
        "--batch",
        str(args.batch),
        "--channels",
        str(args.channels),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return {"impl": impl, "size": size, "pass": pass_, "error": tail[0]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _combine(runs: list[dict]) -> dict:
    """One row from the rounds of one implementation: median time, largest peak."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    return {
        **ok[0],
        "peak_mib": max(r["peak_mib"] for r in ok),
        "time_s": statistics.median(r["time_s"] for r in ok),
        "times_s": [r["time_s"] for r in ok],
        "max_abs_diff_vs_dense": max(r["max_abs_diff_vs_dense"] for r in ok),
    }


def parse_size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["64x64", "96x192"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--impls", nargs="+", default=["dense", "chunked", "sdpa"])
    parser.add_argument("--passes", nargs="+", default=["fwd", "train"], choices=["fwd", "train"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.one:
        impl, size, pass_ = args.one.split(",")
        row = measure(
            impl, parse_size(size), args.batch, args.channels, pass_, args.repeats, args.device
        )
        print(json.dumps(row))
        return

    rows = []
    for size in args.sizes:
        for pass_ in args.passes:
            runs: dict[str, list[dict]] = {impl: [] for impl in args.impls}
            for _ in range(args.rounds):
                for impl in args.impls:
                    if args.device == "cpu":
                        row = measure_isolated(args, impl, size, pass_)
                    else:
                        row = measure(
                            impl, parse_size(size), args.batch, args.channels, pass_,
                            args.repeats, args.device,
                        )  # fmt: skip
                    runs[impl].append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
            rows += [_combine(r) for r in runs.values()]

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine()
    print(
        f"\nPAM, batch {args.batch}, C={args.channels}, {args.device} ({device or 'cpu'}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"time: median over {args.rounds} round(s) of {max(args.repeats, 1)} pass(es)\n"
    )
    print("| map | H*W | pass | impl | peak MiB | time s | vs dense (peak, time) | max diff |")
    print("|---|---:|---|---|---:|---:|---|---:|")
    for row in rows:
        h, w = parse_size(row["size"])
        if "error" in row:
            print(f"| {row['size']} | {h * w} | {row['pass']} | {row['impl']} | "
                  f"failed: {row['error']} | | | |")  # fmt: skip
            continue
        dense = next(
            (r for r in rows if r["size"] == row["size"] and r["pass"] == row["pass"]
             and r["impl"] == "dense" and "error" not in r),
            None,
        )  # fmt: skip
        ratio = (
            f"{row['peak_mib'] / max(dense['peak_mib'], 1e-9):.2f}x, "
            f"{row['time_s'] / dense['time_s']:.2f}x"
            if dense
            else "-"
        )
        print(
            f"| {row['size']} | {h * w} | {row['pass']} | {row['impl']} | {row['peak_mib']:.0f} "
            f"| {row['time_s']:.3f} | {ratio} | {row['max_abs_diff_vs_dense']:.1e} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
