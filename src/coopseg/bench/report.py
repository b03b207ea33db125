"""``coopseg bench all``: the three quick benches and one Markdown report.

Runs ``bench coop``, ``bench dfdam`` and ``bench jointseg`` one after the other into
``<out>/coop``, ``<out>/dfdam`` and ``<out>/jointseg`` (each keeps its own Markdown,
JSON and chart, and reuses its finished runs when rerun), then writes ``<out>/report.md``
(the three pages under one title, charts linked) and ``<out>/report.json`` (what ran,
where, how long, on which machine).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

BENCHES = ("coop", "dfdam", "jointseg")


def _cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, torch, threads, GPU if any."""
    info = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def _coop(out: Path, kw: Mapping[str, Any]) -> str:
    from .coop import run_coop_bench

    run_coop_bench(kw["mode"], kw["seeds"], out_dir=out, **kw["common"])
    return (out / "coop.md").read_text()


def _dfdam(out: Path, kw: Mapping[str, Any]) -> str:
    from .dfdam import run_dfdam_bench

    common = {k: v for k, v in kw["common"].items() if k not in ("member", "stop_on_plateau")}
    run_dfdam_bench(kw["mode"], kw["seeds"], out_dir=out, **common)
    return (out / "dfdam.md").read_text()


def _jointseg(out: Path, kw: Mapping[str, Any]) -> str:
    from .jointseg import SETTING_KEYS, run_jointseg_bench

    common = {k: v for k, v in kw["common"].items() if k not in ("member", "stop_on_plateau")}
    # the coop/dfdam-only settings (warm-up, frozen stages, fuse) do not apply here
    settings = common.get("settings") or {}
    common["settings"] = {k: v for k, v in settings.items() if k in SETTING_KEYS}
    run_jointseg_bench(kw["mode"], kw["seeds"], out, **common)
    return (out / "jointseg.md").read_text()


RUNNERS: dict[str, Callable[[Path, Mapping[str, Any]], str]] = {
    "coop": _coop,
    "dfdam": _dfdam,
    "jointseg": _jointseg,
}


def run_minutes(bench_json: Path) -> float:
    """Training minutes of the runs behind a bench's tables (reused runs included; a row
    that repeats another, ``same_as``, counted once)."""
    try:
        runs = json.loads(bench_json.read_text()).get("runs", {})
    except (OSError, ValueError):
        return float("nan")
    seconds = [r.get("train_s", 0.0) for rs in runs.values() for r in rs if "same_as" not in r]
    return sum(seconds) / 60


def _relink(text: str, folder: str) -> str:
    """Image links of a bench page, made relative to the report's folder."""
    for chart in ("coop.png", "dfdam.png", "jointseg.png"):
        text = text.replace(f"]({chart})", f"]({folder}/{chart})")
    return text


def run_all(
    mode: str = "quick",
    seeds: Sequence[int] = (0, 1, 2),
    out_dir: str | Path = "runs/bench-all",
    benches: Sequence[str] = BENCHES,
    **common: Any,
) -> dict[str, Any]:
    """Run ``benches`` (keyword arguments ``common`` go to coop and dfdam: settings,
    overrides, jobs, threads, plateau, …) and write ``report.md`` / ``report.json``."""
    unknown = [b for b in benches if b not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown bench {unknown[0]!r}; one of {list(BENCHES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    pages, timings, compute = [], {}, {}
    kw = {"mode": mode, "seeds": list(seeds), "common": common}
    for name in benches:
        start = time.perf_counter()
        page = RUNNERS[name](out_dir / name, kw)
        timings[name] = time.perf_counter() - start
        compute[name] = run_minutes(out_dir / name / f"{name}.json")
        pages.append(_relink(page, name))
        print(f"[bench all] {name}: {timings[name] / 60:.1f} min", flush=True)
    info = machine()
    when = ", ".join(f"{name} {t / 60:.1f} min" for name, t in timings.items())
    trained = ", ".join(f"{name} {m:.0f} min" for name, m in compute.items())
    head = [
        "# The papers' comparisons in miniature (`coopseg bench all`)",
        "",
        f"Mode `{mode}`, seeds {list(seeds)}; started {started:%Y-%m-%d %H:%M} UTC. Machine: "
        f"{info['processor']}, {info['cpu_count']} cores, torch {info['torch']}"
        + (f", GPU {info['cuda']}" if "cuda" in info else "")
        + f". Wall time of this command: {when} (finished runs are reused). Training "
        f"time of the runs behind the tables, summed over runs: {trained}.",
        "",
    ]
    from .claims import register_markdown

    register = register_markdown()  # the committed register's verdicts, if any
    if register:
        print(register, flush=True)
    text = "\n".join(head) + "\n" + (register + "\n" if register else "") + "\n".join(pages)
    (out_dir / "report.md").write_text(text)
    summary = {
        "mode": mode,
        "seeds": list(seeds),
        "benches": list(benches),
        "started": started.isoformat(),
        "minutes": {k: v / 60 for k, v in timings.items()},
        "run_minutes": compute,
        "machine": info,
        "pages": {name: str(out_dir / name) for name in benches},
    }
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2))
    print(f"[bench all] report: {out_dir / 'report.md'}", flush=True)
    return summary
