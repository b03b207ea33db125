"""``coopseg export``: ONNX graphs checked against PyTorch, metadata, output choice, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from coopseg.cli import main
from coopseg.config import ConfigError, config_from_dict, model_kwargs
from coopseg.engine import export as export_module
from coopseg.engine.checkpoint import save_weights
from coopseg.engine.export import ExportError, OnnxInputError, OnnxModel, export_model
from coopseg.models import create_model

from .conftest import TINY_MEMBER, tiny_cooperative

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

CLASSES = [f"class{i}" for i in range(11)]
PALETTE = [[i * 20, 255 - i * 20, 7 * i] for i in range(11)]


def write_checkpoint(path: Path, section: dict, crop: list[int]) -> tuple[nn.Module, Path]:
    cfg = config_from_dict({"model": section, "data": {"crop_size": crop}})
    arch, kwargs = model_kwargs(cfg.model)
    torch.manual_seed(0)
    model = create_model(arch, **kwargs).eval()
    save_weights(path, model, cfg, {"class_names": CLASSES, "palette": PALETTE})
    return model, path


def metadata(path: Path) -> dict:
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


def image(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def deeplab_ckpt(tmp_path_factory) -> tuple[nn.Module, Path]:
    folder = tmp_path_factory.mktemp("export")
    return write_checkpoint(
        folder / "deeplab.safetensors", {**TINY_MEMBER, "num_classes": 11}, [40, 56]
    )


@pytest.mark.slow
def test_dynamic_export_matches_pytorch_and_carries_the_classes(
    deeplab_ckpt, tmp_path, capsys
) -> None:
    model, ckpt = deeplab_ckpt
    out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--out", str(out), "--dynamic"]) == 0
    printed = capsys.readouterr().out
    assert "max |logit diff|" in printed and "argmax agrees on 100.000 %" in printed
    meta = metadata(out)
    assert meta["class_names"] == CLASSES and meta["palette"] == PALETTE
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["output"] == "out" and meta["outputs"] == {"out": "out"}
    assert meta["input_size"] == [40, 56] and meta["dynamic"] is True  # the config's crop
    assert meta["check"]["max_abs_diff"] <= meta["check"]["limit"]
    graph = OnnxModel(out)
    assert graph.input_shape == ["batch", 3, "height", "width"] and graph.fixed_size is None
    x = image((2, 3, 37, 91))  # another batch and size than the export's
    with torch.no_grad():
        expected = model(x)["out"]
    got = graph(x)["out"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))


@pytest.mark.slow
def test_cooperative_export_chosen_output_and_all_outputs(tmp_path, capsys) -> None:
    model, ckpt = write_checkpoint(
        tmp_path / "pair.safetensors", tiny_cooperative("cross"), [32, 32]
    )
    out = tmp_path / "pair.onnx"
    argv = ["export", str(ckpt), "--out", str(out), "--output", "bottom", "--all-outputs"]
    assert main([*argv, "--input-size", "48", "40"]) == 0
    assert "out = bottom (+ fused.out, top.out, bottom.out)" in capsys.readouterr().out
    proto = onnx.load(str(out))
    assert [o.name for o in proto.graph.output] == ["out", "fused.out", "top.out", "bottom.out"]
    meta = metadata(out)
    assert meta["output"] == "bottom" and meta["arch"] == "cooperative"
    assert meta["outputs"]["fused.out"] == "fused" and meta["input_size"] == [48, 40]
    x = image((1, 3, 48, 40))
    with torch.no_grad():
        eager = model.eval()(x)
    for label in ("bottom", "fused", "top"):
        got = OnnxModel(out, output=label)(x)["out"]
        torch.testing.assert_close(got, eager[f"{label}.out"], rtol=1e-4, atol=1e-4)
    graph = OnnxModel(out)
    assert graph.fixed_size == (48, 40) and graph.output == "bottom"
    torch.testing.assert_close(graph(x)["out"], eager["bottom.out"], rtol=1e-4, atol=1e-4)

    assert main(["export", str(ckpt), "--out", str(tmp_path / "x.onnx"), "--output", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown output 'nope'" in err and "fused" in err and "top" in err
    assert not (tmp_path / "x.onnx").exists()


class ToyNet(nn.Module):
    """A one-conv segmenter: exports in a second, for the refusal paths."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


class SizeDependentNet(ToyNet):
    """Code that branches on the input's width: torch.export bakes the size in."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.conv(x)
        return {"out": out * 2 if x.shape[-1] == 24 else out}


def toy_config():
    return config_from_dict({"model": {"arch": "unet"}, "data": {"crop_size": [16, 24]}})


def test_export_refuses_a_graph_that_disagrees_and_writes_nothing(
    tmp_path, monkeypatch, capsys
) -> None:
    real = export_module._ort_outputs

    def off_by_one(session, x):
        return [y + 1.0 for y in real(session, x)]

    monkeypatch.setattr(export_module, "_ort_outputs", off_by_one)
    monkeypatch.setattr(
        "coopseg.engine.checkpoint.load_model", lambda path, device: (ToyNet(), toy_config(), {})
    )
    out = tmp_path / "bad.onnx"
    assert main(["export", "toy.safetensors", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("coopseg: error: ")
    assert "not written: ONNX Runtime disagrees with PyTorch" in err
    assert "max |logit diff| 1.00e+00" in err and "argmax agrees" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_dynamic_export_of_a_size_dependent_model_is_refused(tmp_path) -> None:
    with pytest.raises(ExportError, match=r"cannot export with --dynamic.*16x24.*--input-size"):
        export_model(SizeDependentNet(), tmp_path / "m.onnx", toy_config(), dynamic=True)
    assert not (tmp_path / "m.onnx").exists()
    report = export_model(SizeDependentNet(), tmp_path / "m.onnx", toy_config())  # fixed: fine
    assert report.input_shape == [1, 3, 16, 24] and report.argmax_agreement == 1.0


def test_fixed_graph_names_the_fix_for_another_size(tmp_path) -> None:
    export_model(ToyNet(), tmp_path / "m.onnx", toy_config())
    graph = OnnxModel(tmp_path / "m.onnx")
    x = image((3, 3, 16, 24))  # batch 3 through a batch-1 graph: one image at a time
    with torch.no_grad():
        np.testing.assert_allclose(graph(x)["out"], ToyNet()(x)["out"], rtol=1e-5, atol=1e-5)
    with pytest.raises(OnnxInputError, match=r"takes 16x24 images only.*--slide 16 24"):
        graph(image((1, 3, 20, 24)))
    with pytest.raises(ConfigError, match=r"--output fused: .* has one output"):
        OnnxModel(tmp_path / "m.onnx", output="fused")


def test_a_member_that_receives_nothing_exports_as_one_network(tmp_path, capsys) -> None:
    """A mutual-learning (ensemble-preset) pair's member is deployed alone: the graph
    holds one network's weights; a receiving member still needs its sender."""
    model, ckpt = write_checkpoint(
        tmp_path / "pair.safetensors", tiny_cooperative("ensemble"), [32, 32]
    )
    one = tmp_path / "top.onnx"
    assert main(["export", str(ckpt), "--out", str(one), "--output", "top"]) == 0
    capsys.readouterr()
    single = sum(p.numel() for p in model.members["top"].parameters())
    weights = sum(int(np.prod(t.dims)) for t in onnx.load(str(one)).graph.initializer)
    assert weights <= single * 1.01  # one network (BN folded or not), not the pair's 2x
    x = image((1, 3, 32, 32))
    with torch.no_grad():
        eager = model.eval()(x)["top.out"]
    torch.testing.assert_close(OnnxModel(one)(x)["out"], eager, rtol=1e-4, atol=1e-4)
    assert metadata(one)["output"] == "top"

    oneway, ckpt2 = write_checkpoint(
        tmp_path / "oneway.safetensors", tiny_cooperative("oneway-same"), [32, 32]
    )
    both = tmp_path / "bottom.onnx"
    assert main(["export", str(ckpt2), "--out", str(both), "--output", "bottom"]) == 0
    pair = sum(p.numel() for p in oneway.parameters())
    weights = sum(int(np.prod(t.dims)) for t in onnx.load(str(both)).graph.initializer)
    assert weights > 0.9 * pair  # the receiver runs with its sender
