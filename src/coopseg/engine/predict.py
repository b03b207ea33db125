"""``coopseg predict``: colour masks and overlays for image files of any size.

Two backends run the same pre- and post-processing (normalisation, multi-scale, flip,
sliding windows: :func:`~coopseg.engine.inference.predict_probs`): ``pytorch`` on a
checkpoint, ``onnxruntime`` on a graph written by ``coopseg export`` (its metadata
carries the classes, palette, mean and std).

An unreadable input never stops the run: every readable image is predicted, each
unreadable one is reported (:class:`PredictReport`). Output names are the input's
stem; inputs that share a stem get names made unique by :func:`output_stems`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import ConfigError
from ..data.base import DataError
from ..data.files import read_image, read_rgb
from ..data.transforms import standardize
from ..visualize import colorize, display_rgb, overlay, palette_image
from .distributed import resolve_device
from .inference import SlideWindow, predict_probs

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".npy"}
BACKENDS = ("pytorch", "onnxruntime")


@dataclass
class PredictReport:
    """Files written, and the inputs that could not be read (path, one-line reason)."""

    written: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    predicted: int = 0  # images predicted


def collect_images(
    inputs: Sequence[str | Path], problems: list[tuple[Path, str]] | None = None
) -> list[Path]:
    """Image files named or found (one level) in the folders named, each once, in order.

    A missing path or an image-less folder raises :class:`DataError`, or with
    ``problems`` is appended there so the other inputs still run."""
    files: list[Path] = []
    seen: set[Path] = set()

    def problem(path: Path, message: str) -> None:
        if problems is None:
            raise DataError(message)
        problems.append((path, message))

    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                kinds = ", ".join(sorted(IMAGE_SUFFIXES))
                problem(item, f"{item}: folder holds no images ({kinds})")
        elif item.is_file():
            found = [item]
        else:
            problem(item, f"{item}: no such file or folder")
            found = []
        for path in found:
            key = path.resolve()
            if key not in seen:  # the same file named twice is predicted once
                seen.add(key)
                files.append(path)
    return files


def output_stems(files: Sequence[Path]) -> dict[Path, str]:
    """A unique output name per input: its stem, unless several inputs share it.

    Then each of those is named by its path from the folder they all sit in, with
    ``_`` for ``/``: ``a/x.png``, ``b/x.jpg`` -> ``a_x``, ``b_x``. Files in one folder
    that differ only in extension keep it: ``x.png``, ``x.jpg`` -> ``x_png``, ``x_jpg``.
    A name that still clashes (with another input's stem) gets ``-2``, ``-3``, ...
    """
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path)
    names: dict[Path, str] = {}
    for stem, group in by_stem.items():
        if len(group) == 1:
            names[group[0]] = stem
            continue
        parents = [p.resolve().parent for p in group]
        common = Path(os.path.commonpath(parents))
        for path, parent in zip(group, parents, strict=True):
            parts = [*parent.relative_to(common).parts, stem]
            names[path] = "_".join(parts)
        counts: dict[str, int] = {}
        for path in group:
            counts[names[path]] = counts.get(names[path], 0) + 1
        for path in group:
            if counts[names[path]] > 1 and path.suffix:
                names[path] = f"{names[path]}_{path.suffix[1:].lower()}"
    used: set[str] = set()
    for path in files:  # input order: the first keeps the plain name
        name, n = names[path], 1
        while name in used:
            n += 1
            name = f"{names[path]}-{n}"
        used.add(name)
        names[path] = name
    return names


@dataclass
class Predictor:
    """What predict needs, whichever backend: ``model(x) -> {"out": logits}``, the
    normalisation and the palette."""

    model: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    mean: list[float]
    std: list[float]
    palette: list[list[int]]
    device: torch.device
    output: str = "out"
    onnx: Any = None  # the OnnxModel, for its input-size rules
    normalize: str = "dataset"  # data.normalize: dataset mean/std, or per image
    rgb_bands: list[int] | None = None  # data.rgb_bands: N-band overlays

    @property
    def bands(self) -> int:
        """Image channels the model reads (one mean per band)."""
        return len(self.mean)

    def read(self, path: Path) -> tuple[np.ndarray, torch.Tensor]:
        """``(picture for the overlay, [1, C, H, W] in [0, 1])`` of an image file."""
        if self.bands == 3:
            rgb = read_rgb(path)
            return rgb, torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255)
        image = read_image(path, self.bands)  # float32 [H, W, C] (data.files' rules)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        return display_rgb(image, self.rgb_bands), x

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] ``[B, C, H, W]`` -> what the model was trained on."""
        if self.normalize != "dataset":
            return standardize(x, per_channel=self.normalize == "image_channel")
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def load_predictor(
    checkpoint: str | Path | None = None,
    *,
    backend: str = "pytorch",
    onnx_model: str | Path | None = None,
    device: str = "auto",
    output: str | None = None,
) -> Predictor:
    """A checkpoint (``pytorch``) or an exported graph (``onnxruntime``) ready to predict.

    ``output`` picks a cooperative model's output (``fused`` or a member's name)."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if backend == "onnxruntime":
        from .export import OnnxModel

        if onnx_model is None:
            raise ConfigError("--backend onnxruntime needs --model MODEL.onnx (coopseg export)")
        dev = resolve_device("cpu" if device == "auto" else device)
        if dev.type != "cpu":
            raise ConfigError("--backend onnxruntime runs on the CPU here; drop --device")
        session = OnnxModel(onnx_model, output=output)
        meta = session.metadata
        missing = [k for k in ("mean", "std") if k not in meta]
        if missing:
            raise ConfigError(
                f"{onnx_model}: metadata lacks {missing}; export it with coopseg export"
            )
        return Predictor(
            session,
            meta["mean"],
            meta["std"],
            meta.get("palette") or [[0, 0, 0]],
            dev,
            session.output,
            session,
            meta.get("normalize", "dataset"),
            meta.get("rgb_bands"),
        )
    if checkpoint is None:
        raise ConfigError("predict needs --checkpoint CKPT (or --backend onnxruntime --model M)")
    from ..models.cooperative import select_output, standalone
    from .checkpoint import load_model

    dev = resolve_device(device)
    model, cfg, info = load_model(checkpoint, dev)
    try:
        label = select_output(model, output)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    model = standalone(model, label)  # a member that receives nothing runs alone
    palette = info.get("palette") or [[0, 0, 0]]
    mean, std = list(cfg.data.mean), list(cfg.data.std)
    return Predictor(
        model,
        mean,
        std,
        palette,
        dev,
        label,
        normalize=cfg.data.normalize,
        rgb_bands=cfg.data.rgb_bands,
    )


def graph_window(predictor: Predictor, slide: SlideWindow | None) -> tuple[SlideWindow | None, str]:
    """The window to predict with, and a note saying why when it is not the user's.

    A fixed-size graph takes its own size only: without ``slide`` every image goes
    through sliding windows of that size (the same code and the same masks as the
    PyTorch path with ``--slide H W``); a window of another size is refused before any
    work."""
    if predictor.onnx is None or predictor.onnx.fixed_size is None:
        return slide, ""
    h, w = predictor.onnx.fixed_size
    if slide is not None:
        if tuple(slide.crop) != (h, w):
            raise ConfigError(
                f"--slide {slide.crop[0]} {slide.crop[1]}: {predictor.onnx.path} takes "
                f"{h}x{w} images only (exported without --dynamic): use --slide {h} {w} "
                "(or leave --slide out), or export with --dynamic"
            )
        return slide, ""
    window = SlideWindow.create((h, w))
    sh, sw = window.stride
    return window, (
        f"{predictor.onnx.path} is a fixed {h}x{w} graph (exported without --dynamic): "
        f"every image is predicted through {h}x{w} sliding windows, stride {sh}x{sw} "
        f"(as --slide {h} {w}); export with --dynamic to predict whole images"
    )


@torch.no_grad()
def predict_files(
    checkpoint: str | Path | None,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    device: str = "auto",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    slide: SlideWindow | None = None,
    output: str | None = None,
    backend: str = "pytorch",
    onnx_model: str | Path | None = None,
    on_unreadable: Callable[[Path, str], None] | None = None,
    masks_only: bool = False,
    on_note: Callable[[str], None] | None = None,
) -> PredictReport:
    """Write ``<name>_mask.png`` (indexed, palette) and ``<name>_overlay.png`` per image.

    ``masks_only``: write only ``<name>.png`` (class indices as a palette PNG, named
    like the input: the PASCAL VOC test-server format), e.g. one folder per network
    of a cooperative model (``output``) for a test-split submission.

    ``<name>`` is the stem, made unique (:func:`output_stems`). ``slide`` keeps memory
    bounded on large photos (windows of a fixed size); a fixed-size ONNX graph predicts
    through windows of its size unless ``slide`` is given (:func:`graph_window`, said
    once through ``on_note``). Images are read in their displayed orientation (EXIF
    applied), and the outputs have that orientation. Unreadable inputs are skipped
    and reported (``on_unreadable`` as they happen); a model or an option that cannot
    work raises before any file is written.
    """
    predictor = load_predictor(
        checkpoint, backend=backend, onnx_model=onnx_model, device=device, output=output
    )
    slide, note = graph_window(predictor, slide)
    if note and on_note is not None:
        on_note(note)
    dev = predictor.device
    report = PredictReport()

    def skip(path: Path, message: str) -> None:
        report.unreadable.append((path, message))
        if on_unreadable is not None:
            on_unreadable(path, message)

    problems: list[tuple[Path, str]] = []
    files = collect_images(inputs, problems)
    for path, message in problems:
        skip(path, message)
    names = output_stems(files)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        try:
            rgb, x = predictor.read(path)
        except DataError as err:
            skip(path, str(err))
            continue
        x = x.to(dev)
        probs = predict_probs(predictor.model, predictor.prepare(x), scales, flip, slide=slide)
        pred = probs.argmax(1)[0].cpu().numpy()
        report.predicted += 1
        if masks_only:
            mask_path = out / f"{names[path]}.png"
            palette_image(pred, predictor.palette).save(mask_path)
            report.written.append(mask_path)
            continue
        mask_path = out / f"{names[path]}_mask.png"
        palette_image(pred, predictor.palette).save(mask_path)
        overlay_path = out / f"{names[path]}_overlay.png"
        Image.fromarray(overlay(rgb, colorize(pred, predictor.palette))).save(overlay_path)
        report.written += [mask_path, overlay_path]
    return report
