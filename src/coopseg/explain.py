"""``coopseg explain``: what a trained model attends to on one image, and, for a
cooperative model, which member to trust where the members disagree.

Attention is read without touching the model classes: forward hooks on the attention
modules record what they computed (DF-DAM's DAFM returns its channel weights α^H and
α^L, its 2DPAM the confidence map β), and DANet's position attention, whose N×N
matrix is never stored (chunked / fused kernels), is recomputed for a few query
pixels from the module's own query/key convolutions and the input it received -- the
same numbers its forward used. The same analysis feeds ``coopseg report``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .data.base import IGNORE_INDEX, DataError
from .models import danet, dfdam
from .visualize import (
    colorize,
    disagreement_map,
    error_map,
    heat_overlay,
    mark_points,
    member_colour,
    upscale,
)

MODEL_OWNER = "model"  # the owner of an attention module outside any cooperative member
FUSED = "fused"
Point = tuple[int, int]  # (y, x)


# --- recording ------------------------------------------------------------------------


@dataclass
class AttentionMaps:
    """What the attention modules computed in one forward pass, keyed by owner (a
    cooperative member's name, else ``model``).

    ``pam``: DANet position attention, ``(module, input)``: rows of its matrix are
    recomputed on demand (:func:`pam_rows`). ``alpha_high``/``alpha_low``: DAFM
    channel weights ``[B, C]``. ``beta``: 2DPAM confidence ``[B, 1, h, w]``.
    """

    pam: dict[str, tuple[nn.Module, torch.Tensor]] = field(default_factory=dict)
    alpha_high: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha_low: dict[str, torch.Tensor] = field(default_factory=dict)
    beta: dict[str, torch.Tensor] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.pam or self.alpha_high or self.beta)


def attention_owner(path: str) -> str:
    """Who a module at ``path`` belongs to: ``members.<name>.…`` -> ``<name>``."""
    parts = path.split(".")
    if len(parts) >= 2 and parts[0] == "members":
        return parts[1]
    return MODEL_OWNER


def _unique(store: dict[str, Any], owner: str, path: str) -> str:
    return owner if owner not in store else f"{owner}:{path}"


@contextmanager
def record_attention(model: nn.Module) -> Iterator[AttentionMaps]:
    """Hooks on every attention module of ``model`` while the block runs (then removed)."""
    maps = AttentionMaps()
    handles = []

    def pam_hook(key: str):
        def hook(module: nn.Module, args: tuple, _out: Any) -> None:
            maps.pam[key] = (module, args[0].detach())

        return hook

    def dafm_hook(key: str):
        def hook(_module: nn.Module, _args: tuple, out: Any) -> None:
            maps.alpha_high[key] = out[1].detach().float().flatten(1)
            maps.alpha_low[key] = out[2].detach().float().flatten(1)

        return hook

    def beta_hook(key: str):
        def hook(_module: nn.Module, _args: tuple, out: Any) -> None:
            maps.beta[key] = out[1].detach().float()

        return hook

    for path, module in model.named_modules():
        owner = attention_owner(path)
        if isinstance(module, danet.PositionAttention):
            hook = pam_hook(_unique(maps.pam, owner, path))
        elif isinstance(module, dfdam.DAFM):
            hook = dafm_hook(_unique(maps.alpha_high, owner, path))
        elif isinstance(module, dfdam.PositionAttention):
            hook = beta_hook(_unique(maps.beta, owner, path))
        else:
            continue
        handles.append(module.register_forward_hook(hook))
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def pam_rows(module: nn.Module, features: torch.Tensor, cells: Sequence[Point]) -> torch.Tensor:
    """Rows of DANet's position-attention matrix for query cells ``(fy, fx)``:
    ``[B, P, h, w]``, each row a softmax over all positions (sums to 1).

    ``features`` is the module's input (the hook records it); the matrix is
    softmax(Q Kᵀ) unscaled, as the module computes it, from its own query/key convs.
    """
    x = features.float()
    b, _, h, w = x.shape
    with torch.autocast(x.device.type, enabled=False):
        q = module.query(x).flatten(2)  # [B, d, N]
        k = module.key(x).flatten(2)
    index = torch.tensor([fy * w + fx for fy, fx in cells], device=x.device, dtype=torch.long)
    energy = torch.einsum("bdp,bdn->bpn", q[:, :, index], k)
    return energy.softmax(-1).view(b, len(cells), h, w)


# --- query pixels -----------------------------------------------------------------------


def to_cell(point: Point, image_size: Sequence[int], feature_size: Sequence[int]) -> Point:
    """The feature cell a pixel falls in (feature maps cover the image evenly)."""
    (y, x), (hh, ww), (h, w) = point, image_size, feature_size
    return min(h - 1, int(y * h / hh)), min(w - 1, int(x * w / ww))


def to_pixel(cell: Point, image_size: Sequence[int], feature_size: Sequence[int]) -> Point:
    """The image pixel at the centre of a feature cell."""
    (fy, fx), (hh, ww), (h, w) = cell, image_size, feature_size
    return min(hh - 1, int((fy + 0.5) * hh / h)), min(ww - 1, int((fx + 0.5) * ww / w))


def _deepest_cell(region: np.ndarray) -> Point:
    """The cell of a region farthest from its border (ties: nearest its centroid)."""
    core = region
    while True:  # erode (outside the map counts as outside the region) until it vanishes
        inner = core.copy()
        inner[1:] &= core[:-1]
        inner[:-1] &= core[1:]
        inner[:, 1:] &= core[:, :-1]
        inner[:, :-1] &= core[:, 1:]
        inner[[0, -1], :] = False
        inner[:, [0, -1]] = False
        if not inner.any():
            break
        core = inner
    ys, xs = np.nonzero(core)
    cy, cx = np.nonzero(region)
    best = np.argmin((ys - cy.mean()) ** 2 + (xs - cx.mean()) ** 2)
    return int(ys[best]), int(xs[best])


def choose_queries(
    labels: np.ndarray, feature_size: Sequence[int], count: int = 3, ignore_index: int = 255
) -> list[Point]:
    """Query pixels for attention pictures: one per label of the ``count`` largest regions
    (seen at feature resolution), each deep inside its region, so every query asks
    "what does a pixel of this class look at?" rather than probing a boundary."""
    hh, ww = labels.shape
    h, w = feature_size
    rows = np.minimum(((np.arange(h) + 0.5) * hh / h).astype(int), hh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * ww / w).astype(int), ww - 1)
    coarse = labels[np.ix_(rows, cols)]
    classes, counts = np.unique(coarse[coarse != ignore_index], return_counts=True)
    order = classes[np.argsort(-counts, kind="stable")][:count]
    cells = [_deepest_cell(coarse == c) for c in order]
    return [to_pixel(c, (hh, ww), (h, w)) for c in cells]


# --- one image --------------------------------------------------------------------------


@dataclass
class Explanation:
    """Everything ``explain`` and the report draw for one image.

    ``predictions``/``confidence``: per output label (``out``, or ``fused`` and each
    member), class map ``[H, W]`` and max softmax probability ``[H, W]``; ``headline``:
    the model's reported output; ``members``: a cooperative model's member names.
    ``pam[owner]``: ``(query pixels, query cells, rows [P, h, w])``.
    """

    predictions: dict[str, np.ndarray]
    confidence: dict[str, np.ndarray]
    headline: str
    members: list[str]
    pam: dict[str, tuple[list[Point], list[Point], np.ndarray]]
    alpha_high: dict[str, np.ndarray]
    alpha_low: dict[str, np.ndarray]
    beta: dict[str, np.ndarray]


def member_names(model: nn.Module) -> list[str]:
    """A cooperative model's members (two or more), else ``[]``."""
    inner = getattr(model, "module", model)
    names = list(getattr(inner, "member_names", []))
    return names if len(names) > 1 else []


@torch.no_grad()
def analyse(
    model: nn.Module,
    x: torch.Tensor,
    labels_for_queries: np.ndarray | None = None,
    queries: Sequence[Point] | None = None,
    query_count: int = 3,
) -> Explanation:
    """Run ``model`` (eval mode) on one normalised image ``[1, 3, H, W]`` and collect
    every output and the attention. Query pixels: ``queries``, else chosen on
    ``labels_for_queries`` (a mask), else on the prediction."""
    from .engine.inference import predict_outputs

    model.eval()
    size = tuple(x.shape[-2:])
    with record_attention(model) as maps:
        outputs = predict_outputs(model, x)
    predictions, confidence = {}, {}
    for key, logits in outputs.items():
        probs = logits.float().softmax(1)[0]
        label = key.removesuffix(".out")
        conf, pred = probs.max(0)
        predictions[label] = pred.cpu().numpy().astype(np.uint8)
        confidence[label] = conf.cpu().numpy()
    headline = next(iter(predictions))
    pam = {}
    for owner, (module, features) in maps.pam.items():
        fsize = tuple(features.shape[-2:])
        labels = labels_for_queries if labels_for_queries is not None else predictions[headline]
        pixels = list(queries) if queries else choose_queries(labels, fsize, query_count)
        pixels = [(min(max(y, 0), size[0] - 1), min(max(x_, 0), size[1] - 1)) for y, x_ in pixels]
        cells = [to_cell(p, size, fsize) for p in pixels]
        rows = (
            pam_rows(module, features, cells)[0].cpu().numpy()
            if cells
            else np.zeros((0, *fsize), dtype=np.float32)
        )
        pam[owner] = (pixels, cells, rows)
    return Explanation(
        predictions=predictions,
        confidence=confidence,
        headline=headline,
        members=member_names(model),
        pam=pam,
        alpha_high={k: v[0].cpu().numpy() for k, v in maps.alpha_high.items()},
        alpha_low={k: v[0].cpu().numpy() for k, v in maps.alpha_low.items()},
        beta={k: v[0, 0].cpu().numpy() for k, v in maps.beta.items()},
    )


# --- pictures ---------------------------------------------------------------------------


@dataclass
class Picture:
    """One PNG with the words that go under it; ``name`` is a file stem."""

    name: str
    caption: str
    png: bytes
    group: str = ""  # the owner / section it belongs to


def png_bytes(image: np.ndarray) -> bytes:
    """RGB uint8 array -> PNG file contents."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """A matplotlib ``Figure`` (Agg, no pyplot state) -> PNG file contents."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def dafm_figure(
    alpha_high: np.ndarray, alpha_low: np.ndarray, row_labels: Sequence[str], title: str = ""
) -> bytes:
    """α^H and α^L (``[R, C]``: R images, C channels) as two heat strips in [0, 1]."""
    from matplotlib.figure import Figure

    alpha_high, alpha_low = np.atleast_2d(alpha_high), np.atleast_2d(alpha_low)
    rows = alpha_high.shape[0]
    fig = Figure(figsize=(9, 1.6 + 0.7 * rows), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, values, name in (
        (axes[0], alpha_high, "α^H (high)"),
        (axes[1], alpha_low, "α^L (low)"),
    ):
        im = ax.imshow(values, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="none")
        ax.set_yticks(range(rows), list(row_labels))
        ax.set_title(f"{name}: mean {values.mean():.3f}", fontsize=9, loc="left")
    axes[1].set_xlabel("channel")
    fig.colorbar(im, ax=list(axes), fraction=0.03, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=10)
    return figure_png(fig)


def display_scale(size: Sequence[int], target: int = 256) -> int:
    """Nearest-neighbour factor that brings a small image's long side to ``target``."""
    return max(1, target // max(size))


def attention_pictures(
    expl: Explanation, shown: np.ndarray, image_size: Sequence[int], dafm: bool = True
) -> list[Picture]:
    """DANet query maps and DF-DAM α/β pictures of one image of ``image_size``, drawn
    over ``shown`` (the image at display size); ``dafm=False`` leaves out the α chart
    (the report draws one for several images)."""
    fy, fx = shown.shape[0] / image_size[0], shown.shape[1] / image_size[1]
    out = []
    for owner, (pixels, cells, rows) in expl.pam.items():
        for i, ((y, x), cell) in enumerate(zip(pixels, cells, strict=True)):
            heat = heat_overlay(shown, rows[i])
            mark = (int((y + 0.5) * fy), int((x + 0.5) * fx))
            out.append(
                Picture(
                    f"pam_{owner}_q{i}",
                    f"{owner}: position attention of pixel (y={y}, x={x}), feature cell "
                    f"{cell} of {rows.shape[1]}×{rows.shape[2]}; max weight {rows[i].max():.3f}",
                    png_bytes(mark_points(heat, [mark])),
                    owner,
                )
            )
    for owner, alpha_high in expl.alpha_high.items() if dafm else ():
        out.append(
            Picture(
                f"dafm_{owner}",
                f"{owner}: DAFM channel weights α^H, α^L ({alpha_high.size} channels)",
                dafm_figure(alpha_high, expl.alpha_low[owner], ["image"]),
                owner,
            )
        )
    for owner, beta in expl.beta.items():
        out.append(
            Picture(
                f"beta_{owner}",
                f"{owner}: 2DPAM confidence β ({beta.shape[0]}×{beta.shape[1]}; "
                f"min {beta.min():.2f}, mean {beta.mean():.2f}, max {beta.max():.2f}; "
                "colour scale 0-1)",
                png_bytes(heat_overlay(shown, beta, vmin=0.0, vmax=1.0)),
                owner,
            )
        )
    return out


def who_is_right(
    preds: Sequence[np.ndarray], target: np.ndarray, names: Sequence[str], ignore_index: int = 255
) -> dict[str, int]:
    """Pixels where the members disagree, counted by who is right: each member alone,
    ``several`` (some but not all), ``none``; plus ``disagree`` (all such pixels)."""
    stack = np.stack(preds)
    valid = target != ignore_index
    disagree = (stack != stack[0]).any(0) & valid
    right = stack == target[None]
    count = right.sum(0)
    out = {"disagree": int(disagree.sum())}
    for i, name in enumerate(names):
        out[name] = int((disagree & (count == 1) & right[i]).sum())
    out["several"] = int((disagree & (count > 1)).sum())
    out["none"] = int((disagree & (count == 0)).sum())
    return out


# --- files ------------------------------------------------------------------------------


def read_mask(path: Path, palette: Sequence[Sequence[int]], size: Sequence[int]) -> np.ndarray:
    """A class-index mask: an indexed or grey PNG (values are classes), or an RGB one in
    the model's palette; must match the image's size."""
    from .data.files import upright

    try:
        with Image.open(path) as raw:
            img = upright(raw)  # displayed orientation, as the image is read
            if img.mode in ("RGB", "RGBA"):
                rgb = np.asarray(img.convert("RGB"))
                mask = np.full(rgb.shape[:2], -1, dtype=np.int64)
                for index, colour in enumerate(palette):
                    mask[(rgb == np.asarray(colour, dtype=np.uint8)).all(-1)] = index
                mask[(rgb == 255).all(-1) & (mask < 0)] = IGNORE_INDEX
                if (mask < 0).any():
                    bad = rgb[mask < 0][0].tolist()
                    raise DataError(f"{path}: colour {bad} is not in the model's palette")
            else:
                mask = np.asarray(img).astype(np.int64)
    except OSError as err:
        raise DataError(f"{path}: cannot read mask ({err})") from err
    if mask.shape != tuple(size):
        raise DataError(
            f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} but the image is "
            f"{size[0]}x{size[1]} (height x width)"
        )
    bad = np.unique(mask[(mask != IGNORE_INDEX) & ((mask < 0) | (mask >= len(palette)))])
    if bad.size:
        raise DataError(
            f"{path}: label values {bad[:10].tolist()} outside [0, {len(palette)}) and not "
            f"{IGNORE_INDEX}"
        )
    return mask.astype(np.uint8)


def model_input(rgb: np.ndarray, cfg: Any) -> torch.Tensor:
    """An RGB uint8 image ``[H, W, 3]`` as the model saw its val images (the config's
    eval transform, normalisation included): ``[1, 3, H, W]``."""
    from torchvision import tv_tensors

    from .data import eval_transform

    mode = getattr(cfg.data, "normalize", "dataset")  # per-image standardisation, if set
    extra = [] if mode == "dataset" else [mode]
    transform = eval_transform(cfg.data.mean, cfg.data.std, *extra)
    image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1))
    return transform(image).as_subclass(torch.Tensor)[None]


def explain_image(
    checkpoint: str | Path,
    image: str | Path,
    out_dir: str | Path,
    *,
    mask: str | Path | None = None,
    queries: Sequence[Point] | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Write the attention and member pictures of ``image`` to ``out_dir``, the raw
    maps to ``attention.npz`` and an index to ``explain.json`` (returned)."""
    from .data.files import read_rgb
    from .engine.checkpoint import load_model
    from .engine.distributed import resolve_device

    dev = resolve_device(device)
    model, cfg, info = load_model(checkpoint, dev)
    palette = info.get("palette") or [[0, 0, 0]]
    class_names = info.get("class_names") or [f"class{i}" for i in range(len(palette))]
    rgb = read_rgb(Path(image))
    target = read_mask(Path(mask), palette, rgb.shape[:2]) if mask else None
    expl = analyse(model, model_input(rgb, cfg).to(dev), target, queries)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scale = display_scale(rgb.shape[:2])
    shown = upscale(rgb, scale)
    files: dict[str, str] = {}

    def save(name: str, png: bytes, what: str) -> str:
        (out / f"{name}.png").write_bytes(png)
        files[f"{name}.png"] = what
        return f"{name}.png"

    save("input", png_bytes(shown), "the image")
    summary: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "image": str(image),
        "mask": str(mask) if mask else None,
        "arch": cfg.model.get("arch"),
        "image_size": list(rgb.shape[:2]),
        "display_scale": scale,
        "headline": expl.headline,
        "outputs": {},
    }
    for label, pred in expl.predictions.items():
        entry: dict[str, Any] = {
            "prediction": save(
                f"prediction_{label}",
                png_bytes(upscale(colorize(pred, palette), scale)),
                f"{label}: predicted classes",
            ),
            "mean_confidence": float(expl.confidence[label].mean()),
            "classes": {
                class_names[c]: int(n)
                for c, n in zip(*np.unique(pred, return_counts=True), strict=True)
            },
        }
        if target is not None:
            valid = target != IGNORE_INDEX
            entry["pixel_acc"] = (
                float((pred[valid] == target[valid]).mean()) if valid.any() else None
            )
            entry["errors"] = save(
                f"errors_{label}",
                png_bytes(upscale(error_map(rgb, target, pred), scale)),
                f"{label}: wrong pixels in red",
            )
        summary["outputs"][label] = entry
    if target is not None:
        save("mask", png_bytes(upscale(colorize(target, palette), scale)), "the given mask")

    attention: dict[str, Any] = {"pam": {}, "dafm": {}, "2dpam": {}}
    for pic in attention_pictures(expl, shown, rgb.shape[:2]):
        save(pic.name, pic.png, pic.caption)
    for owner, (pixels, cells, rows) in expl.pam.items():
        attention["pam"][owner] = {
            "feature_size": list(rows.shape[1:]),
            "queries": [
                {"pixel": list(p), "cell": list(c), "file": f"pam_{owner}_q{i}.png"}
                for i, (p, c) in enumerate(zip(pixels, cells, strict=True))
            ],
        }
    for owner, alpha_high in expl.alpha_high.items():
        attention["dafm"][owner] = {
            "file": f"dafm_{owner}.png",
            "alpha_high_mean": float(alpha_high.mean()),
            "alpha_low_mean": float(expl.alpha_low[owner].mean()),
        }
    for owner, beta in expl.beta.items():
        attention["2dpam"][owner] = {
            "file": f"beta_{owner}.png",
            "feature_size": list(beta.shape),
            "beta_mean": float(beta.mean()),
        }
    summary["attention"] = {k: v for k, v in attention.items() if v}

    if expl.members:
        preds = [expl.predictions[m] for m in expl.members]
        disagree = (np.stack(preds) != preds[0]).any(0)
        coop: dict[str, Any] = {
            "members": expl.members,
            "member_colours": {m: list(member_colour(i)) for i, m in enumerate(expl.members)},
            "disagreement_fraction": float(disagree.mean()),
            "disagreement": save(
                "disagreement",
                png_bytes(upscale(disagreement_map(rgb, preds), scale)),
                "pixels where the members' predictions differ (magenta)",
            ),
        }
        for m in expl.members:
            save(
                f"confidence_{m}",
                png_bytes(
                    heat_overlay(
                        shown, expl.confidence[m], cmap="viridis", vmin=1 / len(palette), vmax=1
                    )
                ),
                f"{m}: confidence (max softmax probability, 1/K to 1)",
            )
        if target is not None:
            coop["who_is_right"] = who_is_right(preds, target, expl.members)
            coop["who_is_right_file"] = save(
                "who_is_right",
                png_bytes(upscale(disagreement_map(rgb, preds, target), scale)),
                "where members disagree: the colour of the one member that is right; "
                "yellow several, red none",
            )
        summary["cooperative"] = coop

    arrays: dict[str, np.ndarray] = {}
    for owner, (pixels, cells, rows) in expl.pam.items():
        arrays[f"pam/{owner}"] = rows
        arrays[f"pam_pixels/{owner}"] = np.asarray(pixels, dtype=np.int64).reshape(-1, 2)
        arrays[f"pam_cells/{owner}"] = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
    for owner, alpha_high in expl.alpha_high.items():
        arrays[f"alpha_high/{owner}"] = alpha_high
        arrays[f"alpha_low/{owner}"] = expl.alpha_low[owner]
    for owner, beta in expl.beta.items():
        arrays[f"beta/{owner}"] = beta
    for label in expl.predictions:
        arrays[f"prediction/{label}"] = expl.predictions[label]
        arrays[f"confidence/{label}"] = expl.confidence[label]
    np.savez_compressed(out / "attention.npz", **arrays)
    files["attention.npz"] = "the raw maps (see explain.json)"
    summary["files"] = files
    (out / "explain.json").write_text(json.dumps(summary, indent=2))
    return summary
