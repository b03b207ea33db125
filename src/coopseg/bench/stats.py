"""Statistics the benches share: mean ± std over seeds and paired differences.

Runs with the same seed see the same batches in the same order (and, in ``bench coop``,
start from the same member weights), so the fair question is whether the per-seed
difference between two rows is distinguishable from seed noise: a paired t test on the
per-seed differences (two-sided, 95 %). With 3 seeds the bar is high (t > 4.30); that is
the honest answer for 3 seeds, and more seeds lower it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

# Two-sided 95 % critical values of Student's t by degrees of freedom (scipy is optional).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std"}`` with the sample std (0 for one value): the tables' mean ± std."""
    values = list(values)
    if not values:
        return {"mean": math.nan, "std": math.nan}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std}


def cost_columns(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A row's cost columns over its seeds' results: parameters and GMACs (the same every
    seed), training time and time per step (mean ± std), and the seeds."""
    return {
        "params_m": results[0]["params_m"],
        "gmacs": results[0]["gmacs"],
        "train_s": mean_std([r["train_s"] for r in results]),
        "step_s": mean_std([r.get("step_s", math.nan) for r in results]),
        "seeds": [r.get("seed") for r in results],
    }


def t_critical(df: int) -> float:
    """Two-sided 95 % critical value of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    return 1.96 + 2.4 / df  # within 0.003 of the exact value beyond 30 df


def paired_difference(
    a: Sequence[float], b: Sequence[float], label: str = "a − b"
) -> dict[str, Any]:
    """Per-seed differences ``a[i] - b[i]`` (same units as the inputs) and whether their
    mean is distinguishable from seed noise by a paired t test (two-sided, 95 %).

    Returns ``label``, ``diffs``, ``n``, ``mean``, ``std``, ``sem`` (std/√n), ``t``,
    ``t_critical``, ``distinguishable`` (None with fewer than two seeds) and ``sentence``.
    """
    if len(a) != len(b):
        raise ValueError(f"{label}: {len(a)} values against {len(b)}; pair them by seed")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    out: dict[str, Any] = {"label": label, "diffs": diffs, "n": n, **mean_std(diffs)}
    if n < 2:
        out |= {"sem": math.nan, "t": math.nan, "t_critical": math.nan, "distinguishable": None}
    else:
        sem = out["std"] / math.sqrt(n)
        if sem > 0:
            t = out["mean"] / sem
        else:
            t = 0.0 if out["mean"] == 0 else math.copysign(math.inf, out["mean"])
        crit = t_critical(n - 1)
        out |= {"sem": sem, "t": t, "t_critical": crit, "distinguishable": abs(t) > crit}
    out["sentence"] = difference_sentence(out)
    return out


def paired_by_seed(
    a: Mapping[Any, float | None], b: Mapping[Any, float | None], label: str
) -> dict[str, Any] | None:
    """:func:`paired_difference` over the seeds both ``{seed: value}`` maps hold (None:
    missing), with ``"seeds"`` added; None when they share no seed."""
    seeds = [s for s in a if s in b and a[s] is not None and b[s] is not None]
    if not seeds:
        return None
    diff = paired_difference([a[s] for s in seeds], [b[s] for s in seeds], label)
    return {**diff, "seeds": seeds}


def signed(x: float) -> str:
    """``+1.2`` / ``-0.3``, and ``+0.0`` rather than ``-0.0``."""
    return f"{round(x, 1) + 0.0:+.1f}"


def difference_sentence(d: dict[str, Any], unit: str = "points") -> str:
    """One sentence saying what a :func:`paired_difference` shows, with its numbers."""
    seeds = ", ".join(signed(x) for x in d["diffs"])
    head = (
        f"{d['label']}: {signed(d['mean'])} ± {d['std']:.1f} {unit} over {d['n']} seed"
        f"{'s' if d['n'] != 1 else ''} (per seed {seeds})"
    )
    if d["distinguishable"] is None:
        return f"{head}; one seed gives no estimate of seed noise."
    t, crit, df = d["t"], d["t_critical"], d["n"] - 1
    test = f"paired t = {t:+.2f}, critical {crit:.2f} (two-sided 95 %, {df} df)"
    if d["distinguishable"]:
        direction = "higher" if d["mean"] > 0 else "lower"
        first = d["label"].split(" − ")[0]
        return f"{head}; {test}: distinguishable from seed noise, {first} is {direction}."
    return f"{head}; {test}: not distinguishable from seed noise."


def differences_markdown(diffs: Sequence[dict[str, Any]], title: str) -> list[str]:
    """Markdown lines: a table of paired differences, then one sentence per difference."""
    if not diffs:
        return []
    lines = [
        title,
        "",
        "| a − b | per seed | mean ± std | paired t | critical (95 %) | from seed noise |",
        "|---|---|---|---|---|---|",
    ]
    for d in diffs:
        seeds = ", ".join(signed(x) for x in d["diffs"])
        if d["distinguishable"] is None:
            t, crit, verdict = "—", "—", "one seed"
        else:
            t, crit = f"{d['t']:+.2f}", f"{d['t_critical']:.2f}"
            verdict = "**distinguishable**" if d["distinguishable"] else "not distinguishable"
        lines.append(
            f"| {d['label']} | {seeds} | {signed(d['mean'])} ± {d['std']:.1f} | {t} | {crit} "
            f"| {verdict} |"
        )
    return [*lines, "", *[f"- {d['sentence']}" for d in diffs], ""]


def _t_dist() -> Any:
    try:
        from scipy import stats as scipy_stats
    except ImportError as err:  # pragma: no cover - scipy comes with coopseg[bench]/[dev]
        raise RuntimeError(
            "the claims register needs scipy for t-distribution p-values: "
            "pip install 'coopseg[bench]'"
        ) from err
    return scipy_stats.t


def one_sided_p(diffs: Sequence[float], null: float, alternative: str) -> float:
    """p-value of a one-sample t test of the per-seed differences against ``null``:
    ``alternative="greater"`` tests mean > null, ``"less"`` mean < null. With zero spread
    the p-value is 0 or 1 by which side of ``null`` the mean lies."""
    n = len(diffs)
    if n < 2:
        return math.nan
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    side = 1.0 if alternative == "greater" else -1.0
    if sd == 0:
        return 0.0 if side * (mean - null) > 0 else 1.0
    t = side * (mean - null) / (sd / math.sqrt(n))
    return float(_t_dist().sf(t, n - 1))


def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided t interval of the mean per-seed difference (NaN with one seed)."""
    n = len(diffs)
    if n < 2:
        return (math.nan, math.nan)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(_t_dist().ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return (mean - half, mean + half)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and counts for nothing)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m, adjusted, running = len(order), [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def seeds_needed(sd: float, half_width: float, most: int = 200) -> int | None:
    """The fewest seeds whose 95 % t interval of the mean is at most ``±half_width`` at
    per-seed spread ``sd`` (None beyond ``most``)."""
    for n in range(2, most + 1):
        if t_critical(n - 1) * sd / math.sqrt(n) <= half_width:
            return n
    return None
