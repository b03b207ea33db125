"""The ``coopseg bench`` subcommands: coop, dfdam, jointseg and all (argument parsing).

Kept beside the benches so that ``coopseg/cli.py`` only hooks them in; every heavy import
happens when a command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
from typing import Any

COOP_ROWS = (
    "ensemble",
    "cross",
    "cross-no-extra",
    "oneway",
    "cross-no-paths",
    "cross-detach",
    "ensemble-same",
    "oneway-same",
    "oneway-multiple",
    "cross-same",
    "mutual",
)  # bench.coop.ROWS, listed here so --help needs no torch import
PAPERS = ("cross", "feature-sharing", "dfdam", "jointseg", "ours")  # bench.claims.PAPERS
REGISTER_SEEDS = 5  # the register's default seed count (sized in docs/cooperative.md)
DFDAM_ROWS = ("deeplabv3plus", "sum", "dafm", "dafm+2dpam")
JOINTSEG_ROWS = (
    "jointseg",
    "jointseg-paper",
    "jointseg-noise50",
    "jointseg-noise80",
    "classifier",
    "fcn8s",
    "unet",
    "fcn8s-imagenet",
    "unet-imagenet",
    "fcn8s-classifier",
    "unet-classifier",
)  # bench.jointseg.ROWS


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings given on the command line (None: the mode's)."""
    return {
        "iterations": args.iterations,
        "scene_size": args.scene_size,
        "train_scenes": args.train_scenes,
        "val_scenes": args.val_scenes,
        "batch_size": args.batch,
        "lr": args.lr,
        "warmup_iterations": args.warmup,
        "frozen_stages": args.frozen_stages,
        "fuse": getattr(args, "fuse", None),
        "pretrained_lr": getattr(args, "pretrained_lr", None),
        "val_interval": getattr(args, "val_interval", None),
        "cls_batch_ratio": getattr(args, "cls_batch_ratio", None),
    }


def _common(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "settings": _settings(args),
        "overrides": list(args.overrides),
        "jobs": args.jobs,
        "threads": args.threads,
        "plateau": args.plateau,
        "keep_checkpoints": args.keep_checkpoints,
        "rerun": args.rerun,
    }


def cmd_bench_coop(args: argparse.Namespace) -> int:
    from .coop import parse_member_overrides, run_coop_bench

    run_coop_bench(
        args.mode,
        args.seeds,
        args.rows,
        args.out,
        member=parse_member_overrides(args.member),
        stop_on_plateau=args.stop_on_plateau,
        **_common(args),
    )
    return 0


def cmd_bench_dfdam(args: argparse.Namespace) -> int:
    from .dfdam import run_dfdam_bench

    run_dfdam_bench(
        args.mode,
        args.seeds,
        args.rows,
        args.out,
        latency=not args.no_latency,
        latency_size=args.latency_size,
        **_common(args),
    )
    return 0


def cmd_bench_jointseg(args: argparse.Namespace) -> int:
    from .jointseg import run_jointseg_bench

    run_jointseg_bench(args.mode, args.seeds, args.out, args.rows, **_common(args))
    return 0


def cmd_bench_register(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .claims import STORE, evaluate, run_register, select, write
    from .report import machine

    claims = select(args.papers, args.headline, args.contrast)
    out = Path(args.out)
    store = Path(args.store) if args.store else (STORE if args.mode == "register" else out)
    default_claims = (
        Path("benchmarks/results/claims.json") if args.mode == "register" else (out / "claims.json")
    )

    def show(cfg, result, reused) -> None:
        scores = ", ".join(f"{k} {v['best']:.1f}" for k, v in result.get("scores", {}).items())
        how = "stored" if reused else f"{result.get('train_s', 0):.0f} s"
        print(f"[bench register] {cfg.name}: best {scores} ({how})", flush=True)

    results = run_register(
        claims,
        args.seeds,
        args.mode,
        out_dir=out,
        store=store / args.mode,
        jobs=args.jobs,
        threads=args.threads or None,
        train=not args.report_only,
        on_result=show,
    )
    entries = evaluate(claims, results)
    meta = {"mode": args.mode, "seeds": list(args.seeds), "machine": machine()}
    claims_path = Path(args.claims) if args.claims else default_claims
    text = write(entries, claims_path, meta)
    print(text)
    if "coop" in results:  # the cooperative gain at one network's inference cost
        from .coop import one_network_table

        table = one_network_table(results["coop"], args.mode)
        if table:
            (claims_path.parent / "one-network.md").write_text(table)
            print(table)
    return 0


def cmd_bench_all(args: argparse.Namespace) -> int:
    from .coop import parse_member_overrides
    from .report import run_all

    run_all(
        args.mode,
        args.seeds,
        args.out,
        args.only,
        member=parse_member_overrides(args.member),
        stop_on_plateau=args.stop_on_plateau,
        **_common(args),
    )
    return 0


def _add_run_options(p: argparse.ArgumentParser, out: str, what: str) -> None:
    """Options shared by the training benches: mode, seeds, budget, parallelism."""
    p.add_argument("--mode", choices=["quick", "register", "full"], default="quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=out, help=f"folder for {what}")
    g = p.add_argument_group("budget (default: the mode's; the same for every row)")
    g.add_argument("--iterations", type=int, help="training iterations of every run")
    g.add_argument("--scene-size", type=int, help="FashionScenes side in pixels (crop = scene)")
    g.add_argument("--train-scenes", type=int, help="training scenes")
    g.add_argument("--val-scenes", type=int, help="validation scenes")
    g.add_argument("--batch", type=int, help="batch per member")
    g.add_argument("--lr", type=float, help="learning rate (jointseg: the segmenter's SGD lr)")
    g.add_argument("--warmup", type=int, help="linear warm-up iterations")
    g.add_argument("--frozen-stages", type=int, help="shallowest backbone stages kept frozen")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of every run's config, e.g. --set train.weight_decay=0 "
        "(repeatable; YAML values)",
    )
    r = p.add_argument_group("running")
    r.add_argument(
        "--jobs", type=int, default=2, help="runs trained at once, one process each (default 2)"
    )
    r.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (default 1; 0: torch's)"
    )
    r.add_argument(
        "--plateau",
        type=float,
        default=15.0,
        help="flag outputs under this val mIoU %% as still on the plateau (default 15)",
    )
    r.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints")
    r.add_argument(
        "--rerun", action="store_true", help="train again even where a finished run is cached"
    )


def _add_coop_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fuse", choices=["sum_logits", "mean_prob"], help="fused output (default: sum_logits)"
    )
    p.add_argument(
        "--member",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of every member, e.g. --member aspp_channels=32 (repeatable)",
    )
    p.add_argument(
        "--stop-on-plateau",
        action="store_true",
        help="stop after the first seed if a row is still on the plateau",
    )


def add_bench_parsers(sub: Any) -> None:
    """``coopseg bench {coop,dfdam,jointseg,all}`` on the CLI's subparsers."""
    bench = sub.add_parser("bench", help="the papers' comparisons in miniature on FashionScenes")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)

    bc = bench_sub.add_parser(
        "coop",
        help="single vs ensemble vs one-way vs cross (and ablations), paired over seeds "
        "(quick: <= 90 min on 2 cores)",
    )
    _add_run_options(bc, "runs/bench-coop", "coop.md / coop.json / coop.png")
    bc.add_argument(
        "--rows",
        "--presets",
        nargs="+",
        choices=COOP_ROWS,
        default=list(COOP_ROWS),
        metavar="ROW",
        help=f"rows to run (default: all): {' '.join(COOP_ROWS)}",
    )
    _add_coop_options(bc)
    bc.set_defaults(func=cmd_bench_coop)

    bd = bench_sub.add_parser(
        "dfdam",
        help="DF-DAM's Table 1 ablation (sum / DAFM / DAFM + 2DPAM) and DeepLabv3+ on "
        "pretrained lite0 (quick: <= 30 min)",
    )
    _add_run_options(bd, "runs/bench-dfdam", "dfdam.md / dfdam.json / dfdam.png")
    bd.add_argument(
        "--rows",
        nargs="+",
        choices=DFDAM_ROWS,
        default=list(DFDAM_ROWS),
        metavar="ROW",
        help=f"rows to run (default: all): {' '.join(DFDAM_ROWS)}",
    )
    bd.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    bd.add_argument(
        "--latency-size",
        type=int,
        nargs=2,
        default=[320, 640],
        metavar=("H", "W"),
        help="input size of the latency and second GMACs column (default: the paper's 320 640)",
    )
    bd.set_defaults(func=cmd_bench_dfdam)

    bj = bench_sub.add_parser(
        "jointseg",
        help="JointSeg vs FCN-8s/U-Net (random init), the classifier agent vs alone, "
        "random labels (quick: <= 20 min)",
    )
    _add_run_options(bj, "runs/bench-jointseg", "jointseg.md / jointseg.json / jointseg.png")
    bj.add_argument(
        "--pretrained-lr",
        type=float,
        help="lr of the rows whose encoder starts pretrained (--lr: from random init)",
    )
    bj.add_argument(
        "--val-interval",
        type=int,
        help="validate every N iterations (scores: the final and the best pass)",
    )
    bj.add_argument(
        "--cls-batch-ratio", type=int, help="classifier batch = this x --batch (paper: 32)"
    )
    bj.add_argument(
        "--rows",
        nargs="+",
        metavar="ROW",
        help=f"rows to run (default: the mode's): {' '.join(JOINTSEG_ROWS)} or "
        "timm-<timm model name> (a timm classifier from random init)",
    )
    bj.set_defaults(func=cmd_bench_jointseg)

    br = bench_sub.add_parser(
        "register",
        help="the claims register: each paper claim's paired contrast, 95 %% interval and "
        "verdict (benchmarks/results/claims.json); finished runs are kept in "
        "benchmarks/results/runs/ and never trained again",
    )
    br.add_argument("--papers", nargs="+", choices=PAPERS, help="claims of these papers only")
    br.add_argument(
        "--mode",
        choices=["register", "quick"],
        default="register",
        help="register: the protocol of docs/cooperative.md; quick: the same code, "
        "shorter runs, for a look (~15 min a seed)",
    )
    br.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(range(REGISTER_SEEDS)),
        help=f"seeds (default 0..{REGISTER_SEEDS - 1})",
    )
    br.add_argument(
        "--out", default="runs/register", help="training folders (checkpoints are not kept)"
    )
    br.add_argument(
        "--store",
        help="folder of finished runs' results, <store>/<mode>/<bench>/<run>.json "
        "(default: benchmarks/results/runs for --mode register, else --out)",
    )
    br.add_argument(
        "--claims",
        help="where to write claims.json / .md (default: benchmarks/results/claims.json for "
        "--mode register, else <out>/claims.json)",
    )
    br.add_argument(
        "--report-only", action="store_true", help="train nothing: verdicts from the stored runs"
    )
    br.add_argument("--jobs", type=int, default=2, help="runs trained at once (default 2)")
    br.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    br.add_argument(
        "--headline",
        action="store_true",
        help="the headline claims only (bold in the table): their rows first, all seeds",
    )
    br.add_argument(
        "--contrast",
        nargs="+",
        metavar="TEXT",
        help="only the claims whose contrast (the table's 'contrast a − b') contains one of "
        "these texts, e.g. 'cross-no-extra': more seeds for one claim",
    )
    br.set_defaults(func=cmd_bench_register)

    ba = bench_sub.add_parser(
        "all", help="coop, dfdam and jointseg, then one Markdown report (quick: ~2 h)"
    )
    _add_run_options(ba, "runs/bench-all", "report.md and one folder per bench")
    ba.add_argument(
        "--only",
        nargs="+",
        choices=["coop", "dfdam", "jointseg"],
        default=["coop", "dfdam", "jointseg"],
        help="benches to run (default: all three)",
    )
    _add_coop_options(ba)
    ba.set_defaults(func=cmd_bench_all)
