"""Bar charts with error bars for the bench reports (matplotlib's Agg canvas, no display)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def bar_chart(
    groups: Sequence[str],
    series: Mapping[str, Sequence[Mapping[str, float] | None]],
    path: str | Path,
    *,
    title: str = "",
    ylabel: str = "val mIoU (%)",
    threshold: float | None = None,
) -> Path:
    """Grouped bars: one group per row, one bar per series (``{"mean", "std"}`` or None
    for a missing bar), the std as an error bar; ``threshold`` draws a dashed line (the
    plateau level). Writes a PNG and returns its path."""
    from matplotlib.figure import Figure

    path = Path(path)
    names = list(series)
    width = 0.8 / max(len(names), 1)
    fig = Figure(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.2), dpi=110)
    ax = fig.add_subplot()
    for k, name in enumerate(names):
        xs, means, errs = [], [], []
        for i, value in enumerate(series[name]):
            if value is None or not math.isfinite(value["mean"]):
                continue
            xs.append(i - 0.4 + width * (k + 0.5))
            means.append(value["mean"])
            errs.append(value["std"] if math.isfinite(value["std"]) else 0.0)
        if xs:
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=name)
    if threshold is not None:
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label="plateau")
    ax.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncols=min(len(names) + 1, 4))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
