"""``coopseg export``: a checkpoint as an ONNX graph, checked against PyTorch before it is
written; and :class:`OnnxModel`, an ONNX Runtime session that ``predict`` calls like a
coopseg model.

The graph takes ``image``: float32 ``N x 3 x H x W``, RGB scaled to [0, 1] and then
normalised with the mean/std stored in the graph's metadata; its first output ``out``
holds logits at the input size (the chosen output of a cooperative model). Metadata
(``metadata_props``, JSON strings): ``class_names``, ``palette``, ``mean``, ``std``,
``output`` (which output ``out`` holds), ``outputs`` (graph output name -> output),
``arch``, ``num_classes``, ``input_size``, ``dynamic``, ``check`` and ``config``.

Export uses ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` runs straight
through the models' tap generators). Nothing is written unless ONNX Runtime, run on a
sample, agrees with eager PyTorch: max abs logit difference within ``atol + rtol x
max|logit|`` and the same argmax on at least ``min_agreement`` of the pixels. A
``dynamic`` graph is also checked at a second batch size and image size, because
``torch.export`` may bake a size into a graph that still looks dynamic.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..config import Config, ConfigError
from ..fileio import atomic_write
from .inference import output_label

__all__ = [
    "ExportError",
    "ExportReport",
    "OnnxInputError",
    "OnnxModel",
    "export_checkpoint",
    "export_model",
    "require_deploy",
]

INPUT_NAME = "image"
DEPLOY_HINT = "pip install -c constraints.txt 'coopseg[deploy]'"


class ExportError(RuntimeError):
    """The model cannot be exported, or its graph disagrees with PyTorch; one line."""


class OnnxInputError(ConfigError):
    """An input the exported graph cannot take (a fixed size or batch); names the fix."""


def require_deploy(*modules: str) -> None:
    """Fail in one line naming the extra to install when an ONNX package is missing."""
    for name in modules or ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError as err:
            raise ExportError(f"{name} is not installed ({err}); {DEPLOY_HINT}") from None


@dataclass
class ExportReport:
    """What was written and how closely ONNX Runtime matched eager PyTorch."""

    path: Path
    output: str  # which output the graph's "out" holds: "out", "fused" or a member
    outputs: dict[str, str]  # graph output name -> output label
    input_shape: list[int | str]
    max_abs_diff: float
    limit: float
    argmax_agreement: float  # fraction of pixels (all checked outputs and samples)
    pixels: int
    samples: list[list[int]] = field(default_factory=list)  # input shapes checked

    def summary(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        extra = [n for n in self.outputs if n != "out"]
        also = f" (+ {', '.join(extra)})" if extra else ""
        return (
            f"wrote {self.path}: input image {shape}, output out = {self.output}{also}; "
            f"ONNX Runtime vs PyTorch: max |logit diff| {self.max_abs_diff:.2e} "
            f"(limit {self.limit:.2e}), argmax agrees on {100 * self.argmax_agreement:.3f} % "
            f"of {self.pixels} pixels"
        )


def _one_line(err: BaseException) -> str:
    """The gist of an exporter error (they span pages) on one line."""
    text = str(err)
    for marker in ("## Exception summary", "Exception summary"):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("(Refer")]
    line = " ".join(lines[:3]) if lines else type(err).__name__
    return line if len(line) <= 300 else line[:297] + "..."


class _GraphOutputs(nn.Module):
    """The model as a function of the image alone, returning a tuple of named outputs
    (``torch.onnx.export`` wants positional outputs)."""

    def __init__(self, model: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.keys = list(keys)
        # JointSeg: the segmentation agent only; its classifier needs a fixed map size
        self.kwargs = {"task": "seg"} if type(model).__name__ == "JointSeg" else {}

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(image, **self.kwargs)
        return tuple(outputs[k].float() for k in self.keys)


def _graph_keys(model: nn.Module, all_outputs: bool) -> list[str]:
    """``"out"``, then with ``all_outputs`` the fused and every member's output."""
    from ..models.cooperative import output_names

    names = output_names(model)
    if not all_outputs or names == ["out"]:
        return ["out"]
    return ["out", *(f"{name}.out" for name in names)]


def _sample(shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A seeded random image, normalised like real input (so activations are typical)."""
    gen = torch.Generator().manual_seed(0)
    rgb = torch.rand(*shape, generator=gen)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return ((rgb - m) / s).contiguous()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's warnings and progress lines say nothing the check does not."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _session(model: bytes | str | Path, threads: int | None = None, providers=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    if threads:
        opts.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=providers or ["CPUExecutionProvider"])


def _ort_outputs(session: Any, image: np.ndarray) -> list[np.ndarray]:
    return session.run(None, {INPUT_NAME: image})


def _compare(
    eager: Sequence[torch.Tensor], onnx: Sequence[np.ndarray]
) -> tuple[float, float, int, int]:
    """(max abs difference, max |eager logit|, agreeing pixels, pixels) over all outputs."""
    diff = scale = 0.0
    agree = total = 0
    for ref, got in zip(eager, onnx, strict=True):
        ref_np = ref.detach().float().numpy()
        if got.shape != ref_np.shape:
            raise ExportError(
                f"ONNX Runtime returned shape {list(got.shape)}, PyTorch {list(ref_np.shape)}"
            )
        diff = max(diff, float(np.abs(got - ref_np).max()))
        scale = max(scale, float(np.abs(ref_np).max()))
        agree += int((got.argmax(1) == ref_np.argmax(1)).sum())
        total += ref_np.shape[0] * ref_np.shape[2] * ref_np.shape[3]
    return diff, scale, agree, total


def _second_shape(shape: Sequence[int]) -> list[int]:
    """Another batch and image size for checking a dynamic graph (odd sizes on purpose)."""
    _, c, h, w = shape
    return [2, c, max(8, 3 * h // 4 + 1), max(8, 3 * w // 4 + 3)]


def export_model(
    model: nn.Module,
    out: str | Path,
    cfg: Config,
    info: Mapping[str, Any] | None = None,
    *,
    input_size: Sequence[int] | None = None,
    dynamic: bool = False,
    output: str | None = None,
    all_outputs: bool = False,
    atol: float = 1e-3,
    rtol: float = 1e-3,
    min_agreement: float = 0.999,
    opset: int | None = None,
) -> ExportReport:
    """Export ``model`` (built from ``cfg``) to ONNX at ``out`` after checking it.

    ``input_size`` (H, W) defaults to the config's crop (:func:`config_input_size`);
    ``dynamic`` makes batch, height and width free (else the graph takes exactly
    ``1 x 3 x H x W``). ``output`` picks what ``out`` holds (``select_output``);
    ``all_outputs`` adds a cooperative model's ``fused.out`` and ``<member>.out``.
    The model is moved to the CPU in fp32 and eval mode (that is what is exported).
    """
    require_deploy()
    from ..models.cooperative import select_output, standalone
    from .profile import config_input_size

    out = Path(out)
    model = model.cpu().float().eval()
    try:
        label = select_output(model, output)
    except ValueError as err:
        raise ExportError(str(err)) from None
    if output is not None and not all_outputs:
        model = standalone(model, label)  # a member that receives nothing: just that network
    if input_size is None:
        input_size, _ = config_input_size(cfg)
    hw = [int(s) for s in input_size]
    if len(hw) != 2 or min(hw) < 1:
        raise ExportError(f"--input-size: expected two positive integers H W, got {input_size}")
    keys = _graph_keys(model, all_outputs)
    outputs = {k: (label if k == "out" else output_label(k)) for k in keys}
    wrapper = _GraphOutputs(model, keys).eval()
    sample = _sample([1, len(cfg.data.mean), *hw], cfg.data.mean, cfg.data.std)  # N bands
    shapes = None
    if dynamic:
        dyn = torch.export.Dim.DYNAMIC
        shapes = ({0: dyn, 2: dyn, 3: dyn},)
    arch = cfg.model.get("arch")
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                (sample,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=keys,
                dynamic_shapes=shapes,
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
    except Exception as err:
        if dynamic and "inferred a static shape" in str(err):
            raise ExportError(
                f"{arch}: cannot export with --dynamic: the model's code fixes the input's "
                f"size (torch.export specialised it to {hw[0]}x{hw[1]}); export a fixed size "
                "instead (drop --dynamic, pick it with --input-size H W)"
            ) from err
        raise ExportError(f"{arch}: torch.onnx.export failed: {_one_line(err)}") from err
    if dynamic:
        dims = program.model.graph.inputs[0].shape
        program.rename_axes(
            {d: n for d, n in zip(dims, ("batch", "", "height", "width"), strict=True) if n}
        )
    proto = program.model_proto
    input_shape: list[int | str] = [
        d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim
    ]

    # The check: ONNX Runtime against eager PyTorch, before anything is written.
    session = _session(proto.SerializeToString())
    samples = [sample] + (
        [_sample(_second_shape(sample.shape), cfg.data.mean, cfg.data.std)] if dynamic else []
    )
    diff = scale = 0.0
    agree = total = 0
    for x in samples:
        with torch.no_grad():
            eager = wrapper(x)
        try:
            got = _ort_outputs(session, x.numpy())
        except Exception as err:
            raise ExportError(
                f"{arch}: ONNX Runtime cannot run the exported graph on a "
                f"{'x'.join(map(str, x.shape))} input ({_one_line(err)})"
                + (
                    "; the graph is not size-independent: export without --dynamic"
                    if dynamic
                    else ""
                )
            ) from err
        d, s, a, t = _compare(eager, got)
        diff, scale, agree, total = max(diff, d), max(scale, s), agree + a, total + t
    limit = atol + rtol * scale
    agreement = agree / max(total, 1)
    figures = (
        f"max |logit diff| {diff:.2e} (limit {limit:.2e}), argmax agrees on "
        f"{100 * agreement:.3f} % of {total} pixels (need {100 * min_agreement:.1f} %)"
    )
    if not (diff <= limit and agreement >= min_agreement):  # NaN fails too
        raise ExportError(f"{out}: not written: ONNX Runtime disagrees with PyTorch: {figures}")

    info = dict(info or {})
    metadata = {
        "class_names": info.get("class_names"),
        "palette": info.get("palette"),
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "normalize": cfg.data.normalize,  # dataset: mean/std; image: per-image standardisation
        "rgb_bands": cfg.data.rgb_bands,  # N-band input: the bands an overlay draws
        "output": label,
        "outputs": outputs,
        "arch": arch,
        "num_classes": int(eager[0].shape[1]),
        "input_size": hw,
        "dynamic": dynamic,
        "check": {"max_abs_diff": diff, "limit": limit, "argmax_agreement": agreement},
        "config": cfg.to_dict(),
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        if value is not None:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
    proto.producer_name, proto.producer_version = "coopseg", __version__
    data = proto.SerializeToString()
    atomic_write(out, lambda fh: fh.write(data))
    return ExportReport(
        path=out,
        output=label,
        outputs=outputs,
        input_shape=input_shape,
        max_abs_diff=diff,
        limit=limit,
        argmax_agreement=agreement,
        pixels=total,
        samples=[list(x.shape) for x in samples],
    )


def export_checkpoint(checkpoint: str | Path, out: str | Path, **kwargs: Any) -> ExportReport:
    """:func:`export_model` on a checkpoint (loaded safely, weights only)."""
    from .checkpoint import load_model

    model, cfg, info = load_model(checkpoint, "cpu")
    return export_model(model, out, cfg, info, **kwargs)


def _read_metadata(session: Any, path: Path) -> dict[str, Any]:
    raw = dict(session.get_modelmeta().custom_metadata_map)
    try:
        return {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: metadata is not what coopseg export writes ({err})") from None


class OnnxModel:
    """An exported graph behind the call coopseg's inference code makes on a model:
    ``model(images) -> {"out": logits}`` on torch tensors (so multi-scale, flip and
    sliding windows run the same code as the PyTorch path).

    ``output`` picks another graph output by its label (``fused``, a member) when the
    graph was exported with ``--all-outputs``. Inputs the graph cannot take (another
    size for a fixed-size graph) raise :class:`OnnxInputError` naming the fix; a fixed
    batch of 1 is met by running the batch one image at a time.
    """

    def __init__(
        self,
        path: str | Path,
        output: str | None = None,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        require_deploy("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"ONNX model {self.path} does not exist")
        try:
            self.session = _session(self.path, threads, providers)
        except Exception as err:
            raise ExportError(f"{self.path}: not a loadable ONNX model ({_one_line(err)})") from err
        self.metadata = _read_metadata(self.session, self.path)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ExportError(f"{self.path}: expected one N x C x H x W input (coopseg export)")
        self.input_name = inputs[0].name
        self.input_shape = list(inputs[0].shape)
        graph_outputs = [o.name for o in self.session.get_outputs()]
        labels = self.metadata.get("outputs") or {n: n.removesuffix(".out") for n in graph_outputs}
        self.output = self.metadata.get("output", "out")
        self.output_key = graph_outputs[0]
        if output is not None and output != self.output:
            chosen = [n for n, lab in labels.items() if lab == output and n in graph_outputs]
            if not chosen:
                have = sorted(set(labels.values()))
                if len(graph_outputs) == 1 and self.output == "out":
                    raise ConfigError(f"--output {output}: {self.path} has one output ('out')")
                raise ConfigError(
                    f"--output {output}: {self.path} holds {have}; export with "
                    f"--output {output} (or --all-outputs) to predict with it"
                )
            self.output_key, self.output = chosen[0], output

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(H, W) a fixed-size graph takes; None when height and width are free."""
        h, w = self.input_shape[2:]
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None

    @property
    def fixed_batch(self) -> int | None:
        batch = self.input_shape[0]
        return batch if isinstance(batch, int) else None

    def check_size(self, h: int, w: int) -> None:
        """Raise :class:`OnnxInputError` when the graph cannot take an ``h x w`` input."""
        size = self.fixed_size
        if size is not None and (h, w) != size:
            raise OnnxInputError(
                f"{self.path} takes {size[0]}x{size[1]} images only (exported without "
                f"--dynamic), got {h}x{w}: predict with --slide {size[0]} {size[1]}, or "
                "export with --dynamic"
            )

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_size(*images.shape[-2:])
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())  # flipped views
        step = self.fixed_batch or len(x)
        parts = [
            self.session.run([self.output_key], {self.input_name: x[i : i + step]})[0]
            for i in range(0, len(x), step)
        ]
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return {"out": torch.from_numpy(logits).to(images.device)}
