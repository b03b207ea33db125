"""``train.amp: auto`` on a CPU: full precision unless a timed probe finds bf16 faster.

Whether bf16 autocast pays on a CPU depends on the CPU *and* the model: without AMX or
AVX512-BF16 it is emulated (1.7x slower per DeepLabv3+ step, BENCHMARKS.md); with them
it was 1.7x faster for a ResNet-18 DeepLabv3+ on an AMX Xeon but slower for the demo's
EfficientNet-lite0 on the same machine (4.4 vs 5.2 it/s) and on an AVX512-BF16 EPYC (1.4x).
So on a CPU with native bf16 a few steps of this very model are timed in each precision
at the start of a run (on a copy: the run's weights, optimizer and random streams stay
untouched), and bf16 is taken only when clearly faster; elsewhere no probe is run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .distributed import DistInfo, broadcast_from_main
from .inference import amp_dtype, cpu_has_fast_bf16

Step = Callable[[torch.dtype | None], None]  # one training step in a precision (None: fp32)

PROBE_WARMUP = 1  # untimed steps per precision (first-call kernel setup)
PROBE_STEPS = 3  # timed steps per precision, interleaved, medians compared
BF16_MARGIN = 0.10  # bf16 must be this much faster: it also learns a little less per step


def choose_precision(
    fp32_s: float, bf16_s: float, margin: float = BF16_MARGIN
) -> torch.dtype | None:
    """bf16 when its step time is below (1 - margin) x fp32's, else full precision."""
    return torch.bfloat16 if bf16_s < (1.0 - margin) * fp32_s else None


def probe_precision(
    step: Step,
    *,
    steps: int = PROBE_STEPS,
    warmup: int = PROBE_WARMUP,
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[torch.dtype | None, float, float]:
    """Time ``step`` in fp32 and bf16, interleaved so a noisy neighbour hits both;
    returns ``(choice, fp32 median s, bf16 median s)``."""
    times: dict[torch.dtype | None, list[float]] = {None: [], torch.bfloat16: []}
    for dtype in times:
        for _ in range(warmup):
            step(dtype)
    for _ in range(steps):
        for dtype, spent in times.items():
            start = timer()
            step(dtype)
            spent.append(timer() - start)
    fp32_s, bf16_s = statistics.median(times[None]), statistics.median(times[torch.bfloat16])
    return choose_precision(fp32_s, bf16_s), fp32_s, bf16_s


def training_precision(
    amp: str,
    device: torch.device,
    make_step: Callable[[], Step],
    dist: DistInfo,
    *,
    timer: Callable[[], float] = time.perf_counter,
    native_bf16: bool | None = None,
) -> tuple[torch.dtype | None, dict[str, object], str]:
    """``train.amp`` -> ``(autocast dtype, record for log.jsonl, line to print)``.

    Only ``auto`` on a CPU with native bf16 probes (``make_step`` builds the step on a
    copy of the model); rank 0's measurement decides for every rank."""
    if amp != "auto" or device.type != "cpu":
        dtype = amp_dtype(amp, device)
        return dtype, {"amp": amp, "precision": precision_name(dtype)}, ""
    native = cpu_has_fast_bf16() if native_bf16 is None else native_bf16
    if not native:
        line = "amp auto: fp32 (no AMX or AVX512-BF16 on this CPU: bf16 would be emulated)"
        return None, {"amp": amp, "precision": "fp32", "amp_probe": None}, line
    with torch.random.fork_rng(devices=[]):
        choice, fp32_s, bf16_s = probe_precision(make_step(), timer=timer)
    bf16 = broadcast_from_main(float(choice is not None), dist) > 0.5  # rank 0 decides
    choice = torch.bfloat16 if bf16 else None
    name = precision_name(choice)
    line = (
        f"amp auto: {name} (probe on this CPU, {PROBE_STEPS} steps each: fp32 "
        f"{1000 * fp32_s:.0f} ms/step, bf16 {1000 * bf16_s:.0f} ms/step; bf16 is taken "
        f"only when >= {100 * BF16_MARGIN:.0f} % faster)"
    )
    probe = {"fp32_ms": round(1000 * fp32_s, 1), "bf16_ms": round(1000 * bf16_s, 1)}
    return choice, {"amp": amp, "precision": name, "amp_probe": probe}, line


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
