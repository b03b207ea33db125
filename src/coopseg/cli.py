"""The ``coopseg`` command line: data, train, eval, predict, profile, demo, report, explain."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


def resolve_config_path(name: str) -> Path:
    """A path, or the name of a config shipped with coopseg (``demo``)."""
    path = Path(name)
    if path.exists() or path.suffix:
        return path
    from .config import PACKAGED_CONFIGS

    packaged = PACKAGED_CONFIGS / f"{name}.yaml"
    return packaged if packaged.exists() else path


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=0.02 (repeatable; YAML values)",
    )


def _add_slide(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--slide",
        type=int,
        nargs=2,
        metavar=("CROP_H", "CROP_W"),
        help="sliding-window inference with this window (sets eval.mode=slide)",
    )
    p.add_argument(
        "--stride",
        type=int,
        nargs=2,
        metavar=("SH", "SW"),
        help="sliding-window step (default: 2/3 of the window)",
    )


def _check_inference_options(args: argparse.Namespace) -> None:
    """``--scales``, ``--slide`` and ``--stride`` must be positive: refused in one line."""
    from .config import ConfigError

    for scale in args.scales or []:
        if not (math.isfinite(scale) and scale > 0):
            shown = " ".join(f"{s:g}" for s in args.scales)
            raise ConfigError(f"--scales {shown}: each scale must be a number > 0, got {scale:g}")
    for option, pair in (("--slide", args.slide), ("--stride", args.stride)):
        if pair and min(pair) < 1:
            raise ConfigError(
                f"{option} {pair[0]} {pair[1]}: height and width must be positive (pixels)"
            )


def _load(args: argparse.Namespace, config: str | None = None):
    from .config import load_config

    overrides = list(args.overrides)
    if getattr(args, "amp", None):
        overrides.append(f"train.amp={args.amp}")
    if getattr(args, "device", None):
        overrides.append(f"device={args.device}")
    return load_config(resolve_config_path(config or args.config), overrides)


def cmd_data_fashionscenes(args: argparse.Namespace) -> int:
    from .data import build_fashionscenes

    root = build_fashionscenes(
        Path(args.out) if args.out else None,
        size=args.size,
        train=args.train,
        val=args.val,
        seed=args.seed,
        source=Path(args.source) if args.source else None,
        force=args.force,
    )
    print(f"FashionScenes ready in {root}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .config import ConfigError, DataConfig
    from .data.check import check_dataset, reports_json

    cfg = DataConfig(
        dataset=args.dataset,
        root=args.root,
        classes_file=args.classes_file,
        voc_sbd_root=args.sbd_root,
        val_ratio=args.val_ratio,
        split_seed=args.split_seed,
    )
    if args.crop_size and min(args.crop_size) < 1:
        raise ConfigError(f"--crop-size {args.crop_size[0]} {args.crop_size[1]}: must be positive")
    reports = check_dataset(cfg, args.split or ["train", "val"], args.bands, args.crop_size)
    if args.json:
        print(reports_json(reports))
    else:
        print("\n\n".join(r.format() for r in reports))
    return 0 if all(r.ok for r in reports) else 1


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .data.cityscapes import prepare_cityscapes

    written, skipped = prepare_cityscapes(args.root, force=args.force)
    print(f"wrote {written} *_gtFine_labelTrainIds.png files ({skipped} already up to date)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .engine.train import train

    cfg = _load(args)
    if cfg.model.get("arch") == "jointseg":  # two agents, two optimizers: its own trainer
        from .engine.joint import train_joint

        result = train_joint(cfg, resume=args.resume)
    else:
        result = train(cfg, resume=args.resume)
    if result.last_metrics is not None and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"done: {result.iteration} iterations, best val mIoU "
            f"{100 * result.best_miou:.2f} at iteration {result.best_iteration}; "
            f"run folder {result.run_dir}"
        )
    return 0


def default_eval_json(checkpoint: str) -> Path:
    """``eval.json`` beside a checkpoint file, inside a model folder, here for a repo id."""
    path = Path(checkpoint)
    if path.is_dir():
        return path / "eval.json"
    return path.parent / "eval.json" if path.exists() else Path("eval.json")


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import ConfigError, config_from_dict
    from .engine.checkpoint import load_model

    _check_inference_options(args)
    model, ckpt_cfg, _ = load_model(args.checkpoint)
    if args.output:
        from .models.cooperative import select_output

        try:
            select_output(model, args.output)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    if args.slide:
        args.overrides.append("eval.mode=slide")
        args.overrides.append(f"eval.crop_size=[{args.slide[0]}, {args.slide[1]}]")
        args.overrides.append("eval.stride=null")  # the default unless --stride follows
    if args.stride:
        args.overrides.append(f"eval.stride=[{args.stride[0]}, {args.stride[1]}]")
    if args.config:
        cfg = _load(args)
        if cfg.model != ckpt_cfg.model:
            raise ConfigError(
                f"{args.config}: model section {cfg.model} does not match the checkpoint's "
                f"{ckpt_cfg.model}"
            )
    else:
        cfg = config_from_dict(ckpt_cfg.to_dict(), args.overrides)
    if args.stride and cfg.eval.mode != "slide":
        raise ConfigError("--stride needs --slide CROP_H CROP_W (or eval.mode: slide)")
    if args.scales:
        cfg.eval.scales = list(args.scales)
    if args.flip:
        cfg.eval.flip = True
    json_path = Path(args.json) if args.json else default_eval_json(args.checkpoint)
    from .engine.evaluate import evaluate_checkpoint

    saved = Path(args.save_predictions) if args.save_predictions else None
    evaluate_checkpoint(cfg, model, args.checkpoint, json_path, save_predictions=saved)
    if cfg.model.get("arch") == "jointseg":  # its classifier agent: top-1/top-2/binary
        from .engine.joint import evaluate_classifier_checkpoint

        evaluate_classifier_checkpoint(cfg, model, json_path)
    if args.report and int(os.environ.get("RANK", "0")) == 0:
        from .report import run_dir_of, write_report

        page = write_report(
            run_dir_of(args.checkpoint),
            args.report,
            checkpoint=args.checkpoint,
            metrics_path=json_path,
            cfg=cfg,
            output=getattr(args, "output", None),
            device=args.device or "auto",
        )
        print(f"report written to {page}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .engine.inference import SlideWindow
    from .engine.predict import predict_files

    _check_inference_options(args)
    if args.stride and not args.slide:
        raise ConfigError("--stride needs --slide CROP_H CROP_W")
    backend = args.backend or ("onnxruntime" if args.model else "pytorch")
    if backend == "pytorch" and args.model:
        raise ConfigError("--model is an ONNX graph for --backend onnxruntime")
    if backend == "onnxruntime" and args.checkpoint:
        raise ConfigError("--backend onnxruntime takes --model MODEL.onnx, not --checkpoint")

    def unreadable(path: Path, message: str) -> None:  # named as they come; the rest go on
        print(f"coopseg: error: {message}", file=sys.stderr)

    from .engine.export import ExportError

    try:
        report = predict_files(
            args.checkpoint,
            args.inputs,
            args.out,
            device=args.device or "auto",
            scales=args.scales or [1.0],
            flip=args.flip,
            slide=SlideWindow.create(args.slide, args.stride) if args.slide else None,
            output=args.output,
            backend=backend,
            onnx_model=args.model,
            on_unreadable=unreadable,
            masks_only=args.masks_only,
            on_note=lambda line: print(f"coopseg: {line}", flush=True),
        )
    except ExportError as err:
        print(f"coopseg: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(report.written)} files to {args.out}")
    if report.unreadable:
        print(
            f"coopseg: {len(report.unreadable)} input(s) could not be read (named above); "
            f"{report.predicted} image(s) predicted",
            file=sys.stderr,
        )
        return 1 if report.predicted else 2
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .engine.export import ExportError, export_checkpoint
    from .hub import checkpoint_of, export_hub

    if args.format == "hub":
        onnx_only = [
            flag
            for flag, value in (
                ("--input-size", args.input_size),
                ("--dynamic", args.dynamic),
                ("--output", args.output),
                ("--all-outputs", args.all_outputs),
                ("--opset", args.opset),
            )
            if value
        ]
        if onnx_only:
            raise ConfigError(f"{onnx_only[0]} applies to --format onnx, not hub")
        folder = export_hub(args.checkpoint, args.out, license=args.license)
        print(f"wrote {folder} (config.json, model.safetensors, README.md)")
        return 0
    try:
        report = export_checkpoint(
            checkpoint_of(args.checkpoint),
            args.out,
            input_size=args.input_size,
            dynamic=args.dynamic,
            output=args.output,
            all_outputs=args.all_outputs,
            opset=args.opset,
        )
    except ExportError as err:
        print(f"coopseg: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .config import config_from_dict, model_kwargs
    from .engine.profile import config_input_size, model_summary, profile_model, summary_title
    from .models import create_model

    size_source = "--input-size"
    if args.config:
        cfg = _load(args)
        if not args.input_size:  # the config's own size, not 512x512
            args.input_size, size_source = config_input_size(cfg)
    else:  # only what was given: an architecture may have no backbone (jointseg)
        model = {"arch": args.arch, "num_classes": args.num_classes}
        if args.backbone:
            model["backbone"] = args.backbone
        if args.output_stride:
            model["output_stride"] = args.output_stride
        cfg = config_from_dict({"model": model}, args.overrides)
    if not args.input_size:
        args.input_size, size_source = (512, 512), "default"
    arch, kwargs = model_kwargs(cfg.model)
    kwargs["pretrained"] = False
    model = create_model(arch, **kwargs)
    height, width = args.input_size
    result = profile_model(
        model, (height, width), batch=args.batch, device=args.device, latency=not args.no_latency
    )
    summary = model_summary(cfg.model)
    result = {**summary, "input_size_from": size_source, **result}
    from .models.backbones import find_backbones, offline_weights_status

    result["offline_weights"] = {
        path: {"backbone": b.timm_name, "imagenet_offline": offline_weights_status(b.timm_name)}
        for path, b in find_backbones(model).items()
    }
    if arch == "cooperative":
        from .engine.profile import cooperative_breakdown

        result["cooperative"] = cooperative_breakdown(model, (height, width))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{summary_title(summary)}, input 3x{height}x{width} ({size_source})")
        print(f"  parameters: {result['params_m']:.2f} M")
        print(f"  GMACs:      {result['gmacs']:.2f}  (multiply-accumulates, the papers' GFLOPs)")
        for name, part in result.get("cooperative", {}).get("members", {}).items():
            print(
                f"  member {name}: {part['params_m']:.2f} M params, {part['gmacs']:.2f} GMACs "
                f"(alone: {part['alone_params_m']:.2f} M, {part['alone_gmacs']:.2f} GMACs)"
            )
        if "cooperative" in result:
            links = result["cooperative"]["links"]
            print(
                f"  {links['count']} links add {links['params_m']:.2f} M params, "
                f"{links['gmacs']:.2f} GMACs (widened receiving layers + reduction convs)"
            )
        if "latency_ms" in result:
            print(f"  latency:    {result['latency_ms']:.1f} ms (batch {args.batch}, median)")
        for path, item in result["offline_weights"].items():
            print(
                f"  {path} {item['backbone']}: ImageNet weights offline: {item['imagenet_offline']}"
            )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out_dir, args.overrides)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    page = write_report(
        args.run_dir,
        args.out,
        checkpoint=args.checkpoint,
        metrics_path=args.metrics,
        device=args.device,
        rows=args.rows,
    )
    print(f"report written to {page}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain_image

    summary = explain_image(
        args.checkpoint,
        args.image,
        args.out,
        mask=args.mask,
        queries=[tuple(q) for q in args.query] if args.query else None,
        device=args.device,
    )
    print(f"wrote {len(summary['files'])} files to {args.out} (index: explain.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coopseg", description="Cooperative learning for semantic segmentation."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build or check data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fs = data_sub.add_parser("fashionscenes", help="build the embedded FashionScenes data set")
    fs.add_argument("--out", help="output folder (default: ~/.cache/coopseg/fashionscenes/...)")
    fs.add_argument("--size", type=int, default=128, help="canvas side in pixels")
    fs.add_argument("--train", type=int, default=2000, help="training scenes")
    fs.add_argument("--val", type=int, default=250, help="validation scenes")
    fs.add_argument("--seed", type=int, default=0)
    fs.add_argument("--source", help="folder with the four Fashion-MNIST *-idx?-ubyte.gz files")
    fs.add_argument("--force", action="store_true", help="rebuild even if cached")
    fs.set_defaults(func=cmd_data_fashionscenes)
    ck = data_sub.add_parser("check", help="read every file of a data set and report problems")
    ck.add_argument("root", help="data set folder")
    ck.add_argument("--dataset", required=True, choices=["cityscapes", "voc", "folder"])
    ck.add_argument("--split", action="append", help="split to check (repeatable; train, val)")
    ck.add_argument("--classes-file", help="folder: class file (default ROOT/classes.yaml)")
    ck.add_argument("--sbd-root", help="voc: SBD benchmark_RELEASE folder (for train_aug)")
    ck.add_argument("--val-ratio", type=float, default=0.1, help="folder without splits/")
    ck.add_argument("--split-seed", type=int, default=0, help="folder without splits/")
    ck.add_argument(
        "--bands", type=int, help="band count every image must have (default: the most common)"
    )
    ck.add_argument(
        "--crop-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="a training crop (data.crop_size) to check against the image sizes: warns when "
        "most of it would be padding (auto's pick is always reported)",
    )
    ck.add_argument("--json", action="store_true", help="print one JSON object")
    ck.set_defaults(func=cmd_data_check)
    pp = data_sub.add_parser("prepare", help="cache mapped label files (Cityscapes train ids)")
    pp.add_argument("dataset", choices=["cityscapes"])
    pp.add_argument("root", help="data set folder")
    pp.add_argument("--force", action="store_true", help="rewrite files already up to date")
    pp.set_defaults(func=cmd_data_prepare)

    tr = sub.add_parser("train", help="train a model from a YAML config")
    tr.add_argument("config", help="YAML file, or the name of a packaged config (demo)")
    _add_set(tr)
    tr.add_argument(
        "--resume",
        nargs="?",
        const=True,
        choices=["auto"],
        help="continue from checkpoints/last.pt (falling back to last.prev.pt if it is "
        "unreadable); --resume auto: continue if there is a checkpoint, else start "
        "(the same command for the first start and every restart; train.resume)",
    )
    tr.add_argument(
        "--amp",
        nargs="?",
        const="auto",
        choices=["auto", "bf16", "fp16", "none"],
        help="mixed precision (bare --amp: bf16, or fp16 on GPUs without bf16)",
    )
    tr.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on the validation set")
    ev.add_argument("config", nargs="?", help="YAML config (default: the checkpoint's own)")
    ev.add_argument(
        "--checkpoint",
        required=True,
        help=".safetensors or .pt checkpoint, or a model folder / Hub repo id (save_pretrained)",
    )
    _add_set(ev)
    ev.add_argument("--scales", type=float, nargs="+", help="multi-scale inference, e.g. 0.5 1 2")
    ev.add_argument("--flip", action="store_true", help="average with horizontally flipped input")
    _add_slide(ev)
    ev.add_argument("--json", help="where to write the metrics JSON (default: beside checkpoint)")
    ev.add_argument(
        "--save-predictions",
        metavar="DIR",
        help="write predicted masks here (Cityscapes: official labelId PNGs; else palette PNGs)",
    )
    ev.add_argument(
        "--output",
        metavar="NAME",
        help="cooperative models: the headline output (and the one --save-predictions "
        "writes): fused or a member's name (default: the model's model.report)",
    )
    ev.add_argument("--report", metavar="PATH", help="also write the HTML report of the run here")
    ev.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="segment image files with a trained checkpoint")
    pr.add_argument("inputs", nargs="+", help="image files or folders")
    pr.add_argument(
        "--checkpoint",
        help=".safetensors or .pt checkpoint, or a model folder / Hub repo id (pytorch backend)",
    )
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--scales", type=float, nargs="+")
    pr.add_argument("--flip", action="store_true")
    _add_slide(pr)
    pr.add_argument("--device")
    pr.add_argument(
        "--output",
        metavar="NAME",
        help="cooperative models: fused or a member's name (default: the model's model.report)",
    )
    pr.add_argument(
        "--backend",
        choices=["pytorch", "onnxruntime"],
        help="pytorch (--checkpoint) or onnxruntime (--model; default when --model is given)",
    )
    pr.add_argument("--model", metavar="MODEL.onnx", help="a graph written by coopseg export")
    pr.add_argument(
        "--masks-only",
        action="store_true",
        help="write only <name>.png class-index masks (test-server submissions, e.g. VOC); "
        "with --output, one folder per network",
    )
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser(
        "export",
        help="write a checkpoint as an ONNX graph, checked against PyTorch, or as a "
        "Hugging Face model folder (--format hub)",
    )
    ex.add_argument(
        "checkpoint",
        metavar="RUN_OR_CKPT",
        help="a run folder (its best checkpoint), a .safetensors or .pt checkpoint, or a "
        "model folder / Hub repo id",
    )
    ex.add_argument(
        "--out", required=True, help="the .onnx file to write (--format hub: the folder)"
    )
    ex.add_argument(
        "--format",
        choices=["onnx", "hub"],
        default="onnx",
        help="onnx: an ONNX graph; hub: config.json + model.safetensors + README.md",
    )
    ex.add_argument("--license", default="mit", help="--format hub: the model card's license")
    ex.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="image size (default: the config's eval window or data.crop_size)",
    )
    ex.add_argument(
        "--dynamic", action="store_true", help="free batch, height and width (else 1x3xHxW)"
    )
    ex.add_argument(
        "--output",
        metavar="NAME",
        help="cooperative models: what the graph's 'out' holds: fused or a member's name "
        "(default: the model's model.report)",
    )
    ex.add_argument(
        "--all-outputs",
        action="store_true",
        help="cooperative models: also output fused.out and every <member>.out",
    )
    ex.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    ex.set_defaults(func=cmd_export)

    pf = sub.add_parser("profile", help="parameters, GMACs and latency of a model")
    pf.add_argument("config", nargs="?", help="YAML config (or give --arch/--backbone)")
    pf.add_argument("--arch", default="deeplabv3plus")
    pf.add_argument("--backbone", help="default: the architecture's own (none for jointseg)")
    pf.add_argument("--num-classes", type=int, default=21)
    pf.add_argument("--output-stride", type=int)
    pf.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="default: a CONFIG's eval window or data.crop_size, else 512 512",
    )
    pf.add_argument("--batch", type=int, default=1, help="batch size for the latency")
    pf.add_argument("--device", default="cpu")
    pf.add_argument("--no-latency", action="store_true", help="skip the timing runs")
    pf.add_argument("--json", action="store_true", help="print one JSON object")
    _add_set(pf)
    pf.set_defaults(func=cmd_profile)

    from .bench.commands import add_bench_parsers  # coop, dfdam, jointseg, all

    add_bench_parsers(sub)

    de = sub.add_parser("demo", help="build FashionScenes, train, evaluate and draw (~5 min)")
    de.add_argument("--out-dir", default="runs", help="where the run folder goes")
    _add_set(de)
    de.set_defaults(func=cmd_demo)

    rp = sub.add_parser("report", help="one self-contained HTML page about a run folder")
    rp.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (runs/<name>)")
    rp.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html)")
    rp.add_argument("--checkpoint", help="weights to show (default: checkpoints/best.safetensors)")
    rp.add_argument("--metrics", help="metrics JSON (default: the run's eval.json if current)")
    rp.add_argument("--rows", type=int, default=4, help="validation images in the grid")
    rp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    rp.set_defaults(func=cmd_report)

    ex = sub.add_parser("explain", help="attention maps and member disagreement for an image")
    ex.add_argument("checkpoint", metavar="CHECKPOINT")
    ex.add_argument("image", metavar="IMAGE")
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--mask", help="ground-truth mask: shows which member is right where")
    ex.add_argument(
        "--query",
        type=int,
        nargs=2,
        action="append",
        metavar=("Y", "X"),
        help="DANet query pixel (repeatable; default: one inside each of the largest regions)",
    )
    ex.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ex.set_defaults(func=cmd_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data.base import DataError
    from .engine.checkpoint import CheckpointError
    from .engine.preemption import RunInterrupted
    from .engine.train import TrainingError
    from .models.backbones import PretrainedWeightsError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingError, PretrainedWeightsError) as err:
        print(f"coopseg: error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as err:  # last.pt written: 75 after SIGTERM/SIGUSR1, 130 Ctrl-C
        return err.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
