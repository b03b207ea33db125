"""The claims register: every paper claim the miniatures test, as data, with one verdict rule.

A claim names, before any run, the contrast it is tested by -- two (bench, row, output)
sides, ``a − b`` in the paper's direction -- and the paper's effect with the table it
comes from. One runner trains the rows the claims need (``benchmarks/results/runs/``
holds each finished run's result, committed, so a new machine goes on where the last one
stopped), one statistics module (:mod:`coopseg.bench.stats`) estimates each contrast as
the mean paired per-seed difference with a 95 % t interval, and one rule gives the verdict:

* **reproduced**: the interval lies above 0 (for a non-inferiority claim: above
  ``−margin``), after Holm's correction over the claims of the same paper;
* **refuted**: the interval lies below the paper's effect (non-inferiority: below
  ``−margin``), Holm-corrected likewise -- the miniature shows an effect smaller than the
  paper's, at this budget;
* **inconclusive**: neither -- and always when, in some seed, both sides are segmenters
  still on the background plateau (< ``PLATEAU`` % mIoU): two networks that have not yet
  learned to segment cannot test a claim about segmenting, whatever their difference.

One-sided tests at 2.5 % each side are the two ends of the two-sided 95 % interval.
Each network is scored at its best validation pass (the papers' rule, "the validation
set to get the best model"); the final pass is reported beside it.

A new claim is one :class:`Claim` in :data:`CLAIMS`; a new bench is one
:class:`Bench` in :func:`benches`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from . import runner
from .stats import holm, one_sided_p, seeds_needed, signed, t_interval

VERDICTS = ("reproduced", "refuted", "inconclusive")
PAPERS = ("cross", "feature-sharing", "dfdam", "jointseg", "ours")
HALF_WIDTH = 0.7  # target ± of a headline contrast's 95 % interval (about 80 % power for 1 point)
ALPHA_ONE_SIDED = 0.025
# % val mIoU under which a segmenter still predicts (almost) only background: a contrast
# between two such segmenters measures nothing (the benches' plateau line).
PLATEAU = 15.0
STORE = Path("benchmarks/results/runs")
CLAIMS_FILE = Path("benchmarks/results/claims.json")


@dataclass(frozen=True)
class Side:
    """One side of a contrast: a bench's row and the output scored (``top``/``bottom``/
    ``fused`` for a pair, ``top`` for a single network, ``seg``/``cls_top1`` for JointSeg)."""

    bench: str
    row: str
    output: str

    def label(self) -> str:
        return f"{self.row} {self.output}"


@dataclass(frozen=True)
class Claim:
    """A paper's claim as the contrast ``a − b``; the paper says it is ``paper_effect``
    points (> 0) in ``source``. ``margin`` > 0 makes it a non-inferiority claim:
    ``a`` is no worse than ``b`` by more than ``margin``."""

    paper: str
    claim: str
    a: Side
    b: Side
    paper_effect: float
    source: str
    headline: bool = False
    margin: float | None = None

    @property
    def contrast(self) -> str:
        return f"{self.a.label()} − {self.b.label()}"


def _coop(row: str, output: str) -> Side:
    return Side("coop", row, output)


# The cross paper's miniature pairs lite0 (its Xception-65, the top network) with lite2
# (its ResNet-101, the bottom one); the ensemble's members are the single networks.
CLAIMS: tuple[Claim, ...] = (
    Claim(
        "cross",
        "Cross cooperation beats the ensemble of the same two backbones (top network)",
        _coop("cross", "top"),
        _coop("ensemble", "fused"),
        1.0,
        "VOC val, Table 1: cross top 81.5 vs ensemble 80.5",
        headline=True,
    ),
    Claim(
        "cross",
        "Cross cooperation beats the ensemble of the same two backbones (bottom network)",
        _coop("cross", "bottom"),
        _coop("ensemble", "fused"),
        0.8,
        "VOC val, Table 1: cross bottom 81.3 vs ensemble 80.5",
        headline=True,
    ),
    Claim(
        "cross",
        "Cross cooperation beats the top backbone's single network",
        _coop("cross", "top"),
        _coop("ensemble", "top"),
        1.4,
        "VOC val, Table 1: cross top 81.5 vs single Xception-65 80.1",
    ),
    Claim(
        "cross",
        "Cross cooperation beats the bottom backbone's single network",
        _coop("cross", "bottom"),
        _coop("ensemble", "bottom"),
        1.6,
        "VOC val, Table 1: cross bottom 81.3 vs single ResNet-101 79.7",
    ),
    Claim(
        "cross",
        "Connections 1 and 2 add to cross cooperation without extra connections",
        _coop("cross", "top"),
        _coop("cross-no-extra", "top"),
        1.15,
        "VOC val, Table 5: 80.36 without extra connections, +1.15 with them",
    ),
    Claim(
        "cross",
        "Cross beats conventional one-way cooperation (the receiving network)",
        _coop("cross", "bottom"),
        _coop("oneway", "bottom"),
        1.2,
        "VOC val, Table 1: cross bottom 81.3 vs one-way bottom 80.1",
    ),
    Claim(
        "cross",
        "Cross beats conventional one-way cooperation (the sending network)",
        _coop("cross", "top"),
        _coop("oneway", "top"),
        3.9,
        "VOC val, Table 1: cross top 81.5 vs one-way top 77.6",
    ),
    Claim(
        "feature-sharing",
        "The same-layer receiver beats the single network",
        _coop("oneway-same", "bottom"),
        _coop("ensemble-same", "bottom"),
        1.42,
        "DeepLabv3+, VOC val, Table 2: same layer 79.86 vs single 78.44 (Cityscapes, "
        "Table 1: 77.8 vs 77.3)",
        headline=True,
    ),
    Claim(
        "feature-sharing",
        "The multiple-layer receiver beats the single network",
        _coop("oneway-multiple", "bottom"),
        _coop("ensemble-same", "bottom"),
        1.69,
        "DeepLabv3+, VOC val, Table 2: multiple layer 80.13 vs single 78.44 (Cityscapes, "
        "Table 1: 78.3 vs 77.3)",
    ),
    Claim(
        "feature-sharing",
        "The same-layer receiver beats the ensemble",
        _coop("oneway-same", "bottom"),
        _coop("ensemble-same", "fused"),
        1.77,
        "DeepLabv3+, VOC val, Table 2: same layer 79.86 vs ensemble 78.09 (Cityscapes, "
        "Table 1: 77.8 vs 77.5)",
    ),
    Claim(
        "feature-sharing",
        "The multiple-layer receiver beats the ensemble",
        _coop("oneway-multiple", "bottom"),
        _coop("ensemble-same", "fused"),
        2.04,
        "DeepLabv3+, VOC val, Table 2: multiple layer 80.13 vs ensemble 78.09 (Cityscapes, "
        "Table 1: 78.3 vs 77.5)",
    ),
    Claim(
        "dfdam",
        "DAFM beats plain sums",
        Side("dfdam", "dafm", "top"),
        Side("dfdam", "sum", "top"),
        5.5,
        "VOC val, Table 1, ResNet-50: DAFM 73.7 vs sum 68.2 (ResNet-101: 76.8 vs 72.9)",
        headline=True,
    ),
    Claim(
        "dfdam",
        "2DPAM adds to DAFM",
        Side("dfdam", "dafm+2dpam", "top"),
        Side("dfdam", "dafm", "top"),
        0.9,
        "VOC val, Table 1, ResNet-50: DAFM + 2DPAM 74.6 vs DAFM 73.7 (ResNet-101: 77.9 vs 76.8)",
    ),
    Claim(
        "jointseg",
        "JointSeg from random init beats U-Net from random init",
        Side("jointseg", "jointseg", "seg"),
        Side("jointseg", "unet", "seg"),
        40.7,
        "Table II (random init): JointSeg 66.1 vs U-Net 25.4 mIoU",
        headline=True,
    ),
    Claim(
        "jointseg",
        "JointSeg from random init beats FCN-8s from random init",
        Side("jointseg", "jointseg", "seg"),
        Side("jointseg", "fcn8s", "seg"),
        50.8,
        "Table II (random init): JointSeg 66.1 vs FCN-8s 15.3 mIoU",
    ),
    Claim(
        "jointseg",
        "The jointly trained classifier beats the same classifier trained alone",
        Side("jointseg", "jointseg", "cls_top1"),
        Side("jointseg", "classifier", "cls_top1"),
        0.8,
        "Table III: JointSeg 85.1 vs Inception-v3 84.3 top-1 (the paper's nearest classifier "
        "trained alone)",
    ),
    Claim(
        "jointseg",
        "80 % random classifier labels do not hurt the segmenter",
        Side("jointseg", "jointseg-noise80", "seg"),
        Side("jointseg", "jointseg", "seg"),
        0.0,
        "§III-C: 'doesn't downgrade the segmentation agent performance' (no table); "
        "non-inferiority margin 2 points, ours",
        margin=2.0,
    ),
    # Ours (no paper): the cooperative gain at one network's inference cost. The effect
    # named is the smallest gain we would call useful, pre-registered, not a paper's.
    Claim(
        "ours",
        "A mutual-learning member beats its single network (lite0)",
        _coop("mutual", "top"),
        _coop("ensemble", "top"),
        1.0,
        "ours: a useful gain of 1 point, pre-registered",
        headline=True,
    ),
    Claim(
        "ours",
        "A mutual-learning member beats its single network (lite2)",
        _coop("mutual", "bottom"),
        _coop("ensemble", "bottom"),
        1.0,
        "ours: a useful gain of 1 point, pre-registered",
    ),
    Claim(
        "ours",
        "A mutual-learning member (one network) is no worse than the two-network ensemble",
        _coop("mutual", "bottom"),
        _coop("ensemble", "fused"),
        0.0,
        "ours: non-inferiority margin 1 point at half the inference cost",
        margin=1.0,
    ),
    Claim(
        "ours",
        "A network distilled from the cross pair beats its single network (lite0)",
        _coop("distilled", "top"),
        _coop("ensemble", "top"),
        1.0,
        "ours: a useful gain of 1 point, pre-registered",
        headline=True,
    ),
    Claim(
        "ours",
        "A network distilled from the cross pair keeps the pair's gain (its lite0 network)",
        _coop("distilled", "top"),
        _coop("cross", "top"),
        0.0,
        "ours: non-inferiority margin 1 point at half the inference cost",
        margin=1.0,
    ),
)


@dataclass(frozen=True)
class Bench:
    """How to build one run of a bench's row, and how to train it."""

    config: Callable[[str, int, str, Path], Config]  # (row, seed, mode, out_dir)
    work: Callable[[Config, bool], dict[str, Any]]
    same_as: Mapping[str, str]
    # Distilled rows: student row -> teacher row (trained first, checkpoints kept), and
    # (row, seed, out_dir) -> the teacher checkpoint the student's config reads.
    teachers: Mapping[str, str] = field(default_factory=dict)
    teacher_file: Callable[[str, int, Path], Path] | None = None


def benches() -> dict[str, Bench]:
    """The benches the claims draw rows from (imported when asked: torch-heavy)."""
    from . import coop, dfdam, jointseg

    def coop_config(row: str, seed: int, mode: str, out: Path) -> Config:
        return coop.bench_config(row, seed, mode, out)

    def dfdam_config(row: str, seed: int, mode: str, out: Path) -> Config:
        return dfdam.bench_config(row, seed, mode, out)

    def jointseg_config(row: str, seed: int, mode: str, out: Path) -> Config:
        return jointseg.bench_config(row, seed, mode if mode in jointseg.MODES else "quick", out)

    return {
        "coop": Bench(
            coop_config,
            runner.run_one,
            coop.SAME_AS,
            {r: spec.teacher[0] for r, spec in coop.ROWS.items() if spec.teacher},
            coop.teacher_checkpoint,
        ),
        "dfdam": Bench(dfdam_config, runner.run_one, {}),
        "jointseg": Bench(jointseg_config, jointseg.train_row, {}),
    }


def select(
    papers: Sequence[str] | None = None,
    headline: bool = False,
    contrasts: Sequence[str] | None = None,
) -> list[Claim]:
    """The claims of ``papers`` (all by default; ``headline``: their headline claims only,
    the first a short budget should buy seeds for; ``contrasts``: those whose contrast
    contains one of these texts, to buy seeds for one inconclusive claim); an unknown
    paper, or a text no claim's contrast contains, is an error naming it."""
    unknown = sorted(set(papers or ()) - set(PAPERS))
    if unknown:
        raise ValueError(f"unknown paper {unknown[0]!r}; one of {list(PAPERS)}")
    for text in contrasts or ():
        if not any(text in c.contrast for c in CLAIMS):
            raise ValueError(
                f"no claim's contrast contains {text!r}; contrasts: {[c.contrast for c in CLAIMS]}"
            )
    return [
        c
        for c in CLAIMS
        if (not papers or c.paper in papers)
        and (c.headline or not headline)
        and (not contrasts or any(text in c.contrast for text in contrasts))
    ]


def rows_needed(claims: Sequence[Claim]) -> dict[str, list[str]]:
    """Per bench, the rows the claims compare, in first-mention order."""
    out: dict[str, list[str]] = {}
    for claim in claims:
        for side in (claim.a, claim.b):
            rows = out.setdefault(side.bench, [])
            if side.row not in rows:
                rows.append(side.row)
    return out


def run_register(
    claims: Sequence[Claim],
    seeds: Sequence[int],
    mode: str = "register",
    *,
    out_dir: Path = Path("runs/register"),
    store: Path | None = STORE,
    jobs: int = 2,
    threads: int | None = 1,
    train: bool = True,
    on_result: Callable[[Config, dict[str, Any], bool], None] | None = None,
) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """Train (or reuse) every run the claims need, seed by seed so that every claim gains
    seeds together; return ``{bench: {row: {seed: result}}}``. ``train=False`` only
    collects what the store and run folders already hold."""
    table = benches()
    needed = rows_needed(claims)
    results: dict[str, dict[str, dict[int, dict[str, Any]]]] = {
        b: {r: {} for r in rows} for b, rows in needed.items()
    }
    for seed in seeds:
        for bench, rows in needed.items():
            spec = table[bench]
            trained = [r for r in rows if r not in spec.same_as]
            trained += [spec.same_as[r] for r in rows if r in spec.same_as]
            trained = list(dict.fromkeys(trained))
            students = [r for r in trained if r in spec.teachers]
            teachers = {spec.teachers[r] for r in students}
            trained = [r for r in trained if r not in students]
            trained += [t for t in sorted(teachers) if t not in trained]
            configs = {r: spec.config(r, seed, mode, out_dir / bench) for r in trained}
            sub_store = store / bench if store is not None else None
            if train:
                if jobs > 1:
                    runner.prepare_fashionscenes(next(iter(configs.values())))
                # A student follows its teacher in the pool, unless the teacher's result
                # is stored without its checkpoint here: then it is trained again first.
                then: dict[str, list[Config]] = {}
                later = []
                for row in students:
                    teacher, path = (
                        configs[spec.teachers[row]],
                        spec.teacher_file(row, seed, out_dir / bench),
                    )
                    lost = (
                        runner.cached_result(teacher, sub_store) is not None and not path.is_file()
                    )
                    if lost:
                        later.append(row)
                    else:
                        then.setdefault(teacher.name, []).append(
                            spec.config(row, seed, mode, out_dir / bench)
                        )
                got = runner.run_configs(
                    list(configs.values()),
                    jobs=jobs,
                    threads=threads,
                    keep_checkpoints={configs[t].name for t in teachers},
                    on_result=on_result,
                    work=spec.work,
                    store=sub_store,
                    then=then,
                )
                got |= _train_students(
                    spec,
                    later,
                    seed,
                    mode,
                    out_dir / bench,
                    sub_store,
                    threads=(threads or 1) * max(jobs, 1),
                    on_result=on_result,
                )
            else:
                got = {}
                every = list(configs.values()) + [
                    spec.config(r, seed, mode, out_dir / bench) for r in students
                ]
                for cfg in every:
                    cached = runner.cached_result(cfg, sub_store)
                    if cached is not None:
                        got[cfg.name] = cached
            for row in rows:
                name = spec.config(spec.same_as.get(row, row), seed, mode, out_dir / bench).name
                if name in got:
                    results[bench][row][seed] = got[name]
    return results


def _train_students(
    spec: Bench,
    students: Sequence[str],
    seed: int,
    mode: str,
    out: Path,
    store: Path | None,
    *,
    threads: int,
    on_result: Callable[[Config, dict[str, Any], bool], None] | None,
) -> dict[str, dict[str, Any]]:
    """Train the distilled rows of one seed after their teachers. A teacher whose result
    is stored but whose checkpoint is not on this machine (a new machine, or a run from
    before distillation was registered) is trained again, checkpoints kept; its stored
    result stays as it is."""
    got: dict[str, dict[str, Any]] = {}
    for row in students:
        cfg = spec.config(row, seed, mode, out)
        cached = runner.cached_result(cfg, store)
        if cached is None:
            path = spec.teacher_file(row, seed, out) if spec.teacher_file else None
            if path is not None and not path.is_file():
                teacher = spec.config(spec.teachers[row], seed, mode, out)
                print(f"[bench register] {teacher.name}: training again for its checkpoint")
                runner.run_configs(
                    [teacher], threads=threads, keep_checkpoints=True, rerun=True, work=spec.work
                )
        got |= runner.run_configs(
            [cfg], threads=threads, on_result=on_result, work=spec.work, store=store
        )
    return got


def score(result: Mapping[str, Any], output: str, which: str = "best") -> float | None:
    """A run's score of ``output`` in %, at its best or final validation pass."""
    value = result.get("scores", {}).get(output, {}).get(which)
    return None if value is None else float(value)


def evaluate(
    claims: Sequence[Claim],
    results: Mapping[str, Mapping[str, Mapping[int, Mapping[str, Any]]]],
    half_width: float = HALF_WIDTH,
) -> list[dict[str, Any]]:
    """Each claim's estimate, 95 % interval, Holm-corrected tests and verdict (the keys of
    ``benchmarks/results/claims.json``), from the runs both sides share by seed."""
    entries = []
    for claim in claims:
        a_runs = results.get(claim.a.bench, {}).get(claim.a.row, {})
        b_runs = results.get(claim.b.bench, {}).get(claim.b.row, {})
        seeds = sorted(s for s in a_runs if s in b_runs)
        pairs = {
            which: [
                (score(a_runs[s], claim.a.output, which), score(b_runs[s], claim.b.output, which))
                for s in seeds
            ]
            for which in ("best", "final")
        }
        diffs = {
            w: [a - b for a, b in p if a is not None and b is not None] for w, p in pairs.items()
        }
        d = diffs["best"]
        plateau = [
            s
            for s, (a, b) in zip(seeds, pairs["best"], strict=True)
            if _on_plateau(claim.a, a) and _on_plateau(claim.b, b)
        ]
        low = -claim.margin if claim.margin else 0.0  # the "reproduced" bound
        high = -claim.margin if claim.margin else claim.paper_effect  # the "refuted" bound
        sd = statistics.stdev(d) if len(d) > 1 else math.nan
        entries.append(
            {
                "paper": claim.paper,
                "claim": claim.claim,
                "contrast": claim.contrast,
                "paper_effect": claim.paper_effect,
                "source": claim.source,
                "headline": claim.headline,
                "margin": claim.margin,
                "estimate": statistics.fmean(d) if d else math.nan,
                "ci95": list(t_interval(d)),
                "seeds": seeds[: len(d)],
                "per_seed": d,
                "sd": sd,
                "estimate_final": statistics.fmean(diffs["final"]) if diffs["final"] else math.nan,
                "ci95_final": list(t_interval(diffs["final"])),
                "a_mean": _mean([a for a, _ in pairs["best"] if a is not None]),
                "b_mean": _mean([b for _, b in pairs["best"] if b is not None]),
                "p_above": one_sided_p(d, low, "greater"),
                "p_below": one_sided_p(d, high, "less"),
                "seeds_for_target": seeds_needed(sd, half_width) if sd == sd else None,
                "plateau_seeds": plateau,
            }
        )
    for paper in dict.fromkeys(e["paper"] for e in entries):
        group = [e for e in entries if e["paper"] == paper]
        for key in ("p_above", "p_below"):
            for e, adj in zip(group, holm([e[key] for e in group]), strict=True):
                e[f"{key}_holm"] = adj
    for e in entries:
        e["verdict"] = verdict(e["p_above_holm"], e["p_below_holm"])
        # Reproduced in direction yet below the paper's size: both ends of the rule hold.
        e["below_paper_effect"] = (
            e["verdict"] == "reproduced"
            and not e["margin"]
            and (e["p_below_holm"] < ALPHA_ONE_SIDED)
        )
        if e["plateau_seeds"]:
            e["verdict"] = "inconclusive"
            e["below_paper_effect"] = False
    return entries


def _on_plateau(side: Side, value: float | None) -> bool:
    """A segmentation output (not a classifier's ``cls_*``) below the plateau line."""
    return value is not None and not side.output.startswith("cls_") and value < PLATEAU


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def verdict(p_above: float, p_below: float, alpha: float = ALPHA_ONE_SIDED) -> str:
    """The register's rule on Holm-adjusted one-sided p-values (NaN: too few seeds)."""
    if p_above == p_above and p_above < alpha:
        return "reproduced"
    if p_below == p_below and p_below < alpha:
        return "refuted"
    return "inconclusive"


def _num(x: float, fmt: str = "{:+.2f}") -> str:
    return "—" if x is None or x != x else fmt.format(x)


def markdown(entries: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """The register as one Markdown table, the paper's figures beside ours."""
    lines = [
        "## The claims register",
        "",
        f"Mode `{meta.get('mode')}`; each network at its best validation pass. Estimate: the "
        "mean paired per-seed difference a − b in mIoU points (accuracy points for "
        "classifiers) with its 95 % t interval; verdicts by the rule in "
        "`coopseg.bench.claims` (Holm-corrected within each paper). **Bold**: headline "
        f"contrasts (target: 95 % interval within ±{HALF_WIDTH}); the last column is the "
        "seeds that target would take at the measured spread (—: over 200, or unknown).",
        "",
        "| paper | claim | contrast a − b | paper | ours | 95 % interval | seeds | verdict "
        "| seeds for ±0.7 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        claim = f"**{e['claim']}**" if e["headline"] else e["claim"]
        paper = f"{e['paper_effect']:+.2f}" if not e.get("margin") else f"≥ −{e['margin']:g}"
        lo, hi = e["ci95"]
        lines.append(
            f"| {e['paper']} | {claim} | {e['contrast']} | {paper} | {_num(e['estimate'])} "
            f"| [{_num(lo)}, {_num(hi)}] | {len(e['seeds'])} | {e['verdict']}"
            f"{' (smaller than the paper)' if e.get('below_paper_effect') else ''} "
            f"| {e['seeds_for_target'] or '—'} |"
        )
    lines += ["", "Sources of the paper's figures:", ""]
    lines += [f"- {e['claim']}: {e['source']}." for e in entries]
    lines += [""]
    for e in entries:
        if e["per_seed"]:
            per = ", ".join(signed(x) for x in e["per_seed"])
            flat = e.get("plateau_seeds")
            why = (
                f" Both sides on the background plateau (< {PLATEAU:g} % mIoU) in seed(s) "
                f"{', '.join(map(str, flat))}: inconclusive, this budget cannot test the claim."
                if flat
                else ""
            )
            if e.get("below_paper_effect"):
                why += (
                    f" Reproduced in direction, but the interval lies below the paper's "
                    f"{e['paper_effect']:+.2f}: a smaller effect here."
                )
            lines.append(
                f"- {e['contrast']}: per seed {per}; a {e['a_mean']:.1f} %, b {e['b_mean']:.1f} %"
                f" on average; at the final pass {_num(e['estimate_final'])}.{why}"
            )
    return "\n".join(lines) + "\n"


def write(entries: Sequence[Mapping[str, Any]], path: Path, meta: Mapping[str, Any]) -> str:
    """Write ``claims.json`` (the list the issue specifies, ``meta`` beside it in
    ``claims.meta.json``) and ``claims.md``; return the Markdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(list(entries)), indent=1, allow_nan=False) + "\n")
    path.with_suffix(".meta.json").write_text(json.dumps(dict(meta), indent=1) + "\n")
    text = markdown(entries, meta)
    path.with_suffix(".md").write_text(text)
    return text


def _finite(value: Any) -> Any:
    """JSON without NaN: a missing estimate (too few seeds) is ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def register_markdown(path: Path = CLAIMS_FILE) -> str | None:
    """The register's table from a written ``claims.json`` (None if there is none)."""
    try:
        entries = json.loads(path.read_text())
        meta = json.loads(path.with_suffix(".meta.json").read_text())
    except (OSError, ValueError):
        return None
    nan = math.nan
    for e in entries:  # back from JSON's null to the NaN the table prints as "—"
        e["ci95"] = [nan if v is None else v for v in e["ci95"]]
        for key in ("estimate", "estimate_final", "a_mean", "b_mean"):
            e[key] = nan if e.get(key) is None else e[key]
    return markdown(entries, meta)
