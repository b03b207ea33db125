"""Is the exported graph worth deploying? ONNX Runtime vs eager PyTorch on the CPU.

Batch-1 latency of DeepLabv3+ R18, a cross pair of DeepLabv3+ R18s, DANet R18 and
DF-DAM R18 (19 classes, default 3x512x512): eager PyTorch fp32, eager bf16 autocast,
and ONNX Runtime on the graph ``coopseg export`` writes (every graph is checked against
PyTorch by the export itself). ORT runs with graph optimisation ``all`` (the default)
and ``extended``, each at ``--threads`` threads, and ``all`` at 1 thread for the
thread scaling. Variants are interleaved round by round, so machine noise hits them
alike: quote the ratios (target: ORT >= 1.5x faster than eager fp32 for every model).

    python benchmarks/onnx_latency.py [--size 512 512] [--threads 2] [--rounds 5]
        [--iters 3] [--models deeplabv3plus cross danet dfdam] [--dynamic]
        [--json benchmarks/results/onnx_latency.json]
    python benchmarks/onnx_latency.py --quick     # 64x64, one round: checks it runs

Latency = median over rounds of the best of ``--iters`` passes. ``--quick`` writes
no JSON unless ``--json`` is given (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from coopseg.config import config_from_dict, model_kwargs
from coopseg.engine.evaluate import cpu_has_fast_bf16
from coopseg.engine.export import export_model
from coopseg.engine.profile import count_macs, count_params
from coopseg.models import create_model

R18 = {"arch": "deeplabv3plus", "backbone": "resnet18"}
MODELS = {
    "deeplabv3plus": {**R18, "output_stride": 16},
    "cross": {"arch": "cooperative", "preset": "cross", "members": [dict(R18), dict(R18)]},
    "danet": {"arch": "danet", "backbone": "resnet18", "output_stride": 8},
    "dfdam": {"arch": "dfdam", "backbone": "resnet18"},
}
DEFAULT_JSON = Path(__file__).parent / "results" / "onnx_latency.json"
TARGET = 1.5


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ort_session(path: Path, threads: int, level: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def best_ms(run: Callable[[], object], iters: int) -> float:
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - start) * 1000)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--dynamic", action="store_true", help="benchmark dynamic-shape graphs")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast variant")
    p.add_argument("--quick", action="store_true", help="64x64, 1 round, 1 iter: a smoke run")
    p.add_argument("--json", help=f"output JSON (default {DEFAULT_JSON}; none with --quick)")
    p.add_argument("--keep", help="folder to keep the exported graphs in")
    args = p.parse_args()
    if args.quick:
        args.size, args.rounds, args.iters = [64, 64], 1, 1
    json_path = Path(args.json) if args.json else (None if args.quick else DEFAULT_JSON)

    torch.set_num_threads(args.threads)
    hw = tuple(args.size)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    x_np = x.numpy()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="onnx-latency-"))
    folder.mkdir(parents=True, exist_ok=True)

    rows: dict[str, dict] = {}
    runners: dict[str, dict[str, Callable[[], object]]] = {}
    for name in args.models:
        section = {**MODELS[name], "num_classes": args.classes}
        cfg = config_from_dict({"model": section, "data": {"crop_size": list(hw)}})
        arch, kwargs = model_kwargs(cfg.model)
        torch.manual_seed(0)
        model = create_model(arch, **kwargs).eval()
        start = time.perf_counter()
        report = export_model(model, folder / f"{name}.onnx", cfg, dynamic=args.dynamic)
        export_s = time.perf_counter() - start
        print(f"{name}: exported in {export_s:.0f} s; {report.summary()}", flush=True)
        rows[name] = {
            "params_m": count_params(model) / 1e6,
            "gmacs": count_macs(model, hw) / 1e9,
            "export_s": export_s,
            "check": {
                "max_abs_diff": report.max_abs_diff,
                "limit": report.limit,
                "argmax_agreement": report.argmax_agreement,
            },
            "ms": {},
        }
        sessions = {
            "ort": ort_session(report.path, args.threads, "all"),
            "ort_extended": ort_session(report.path, args.threads, "extended"),
            "ort_1thread": ort_session(report.path, 1, "all"),
        }

        def eager(model=model) -> object:
            with torch.inference_mode():
                return model(x)["out"]

        def eager_bf16(model=model) -> object:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x)["out"]

        variants: dict[str, Callable[[], object]] = {"eager_fp32": eager}
        if not args.no_bf16:
            variants["eager_bf16"] = eager_bf16
        for key, sess in sessions.items():
            variants[key] = lambda sess=sess: sess.run(["out"], {"image": x_np})
        runners[name] = variants

    for variants in runners.values():  # warm-up: lazy init, ORT's first-run allocations
        for run in variants.values():
            run()
    for _ in range(args.rounds):
        for name, variants in runners.items():
            for key, run in variants.items():
                rows[name]["ms"].setdefault(key, []).append(best_ms(run, args.iters))

    print(
        f"\n3x{hw[0]}x{hw[1]}, {args.classes} classes, batch 1, {cpu_name()}, "
        f"{args.threads} threads (bf16 native: {cpu_has_fast_bf16()}); "
        f"{'dynamic' if args.dynamic else 'fixed'}-shape graphs; median of {args.rounds} "
        f"rounds of the best of {args.iters}"
    )
    header = "| model | params (M) | GMACs | eager fp32 ms | eager bf16 ms | ORT ms | ORT ext ms "
    print(header + f"| ORT 1 thread ms | best ORT speed-up | ORT {args.threads} vs 1 thread |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        med = {k: statistics.median(v) for k, v in row["ms"].items()}
        row["latency_ms"] = med
        best_ort = min(med["ort"], med["ort_extended"])
        row["speedup_ort"] = med["eager_fp32"] / med["ort"]
        row["speedup_best_ort"] = med["eager_fp32"] / best_ort
        row["speedup_bf16"] = med["eager_fp32"] / med["eager_bf16"] if "eager_bf16" in med else None
        row["ort_thread_scaling"] = med["ort_1thread"] / med["ort"]
        row["target_met"] = row["speedup_best_ort"] >= TARGET
        bf16 = f"{med['eager_bf16']:.0f}" if "eager_bf16" in med else "-"
        print(
            f"| {name} | {row['params_m']:.2f} | {row['gmacs']:.2f} | {med['eager_fp32']:.0f} | "
            f"{bf16} | {med['ort']:.0f} | {med['ort_extended']:.0f} | {med['ort_1thread']:.0f} | "
            f"{row['speedup_best_ort']:.2f}x | {row['ort_thread_scaling']:.2f}x |"
        )
    if json_path is not None:
        import onnxruntime as ort

        result = {
            "date": date.today().isoformat(),
            "machine": {
                "cpu": cpu_name(),
                "arch": platform.machine(),
                "cores": os.cpu_count(),
                "bf16_native": cpu_has_fast_bf16(),
            },
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
            "args": {**vars(args), "size": list(hw)},
            "target_speedup": TARGET,
            "models": rows,
            "all_targets_met": all(r["target_met"] for r in rows.values()),
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"wrote {json_path}")
    if not args.keep:
        for path in folder.glob("*.onnx"):
            path.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
