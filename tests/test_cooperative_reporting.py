"""What a cooperative model reports: each network's own output for linked presets, the
fused one for the ensemble, the paper's ensemble rule, and a best checkpoint per output."""

from __future__ import annotations

import json

import pytest
import torch

from coopseg.cli import main
from coopseg.engine.checkpoint import load_model
from coopseg.engine.train import train
from coopseg.models import create_model
from coopseg.models.cooperative import select_output

from .conftest import TINY_MEMBER, tiny_cooperative

MEMBER = {**TINY_MEMBER, "dropout": 0.0}


def coop(preset: str, k: int = 2, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("cooperative", members=[MEMBER] * k, preset=preset, num_classes=3, **kwargs)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(
    ("preset", "k", "reported"),
    [
        ("ensemble", 2, "fused"),
        ("cross-no-paths", 2, "fused"),
        ("oneway-same", 2, "bottom"),  # the receiving network
        ("oneway-multiple", 3, "net2"),  # the end of the chain
        ("cross", 2, "top"),  # every network receives: the first
    ],
)
def test_headline_is_the_receiving_network_for_linked_presets(preset, k, reported, image) -> None:
    model = coop(preset, k).eval()
    assert model.output == reported
    out = model(image)
    assert torch.equal(out["out"], out[f"{reported}.out"])
    named = [key for key in out if key.endswith(".out")]
    assert named[0] == f"{reported}.out"  # the evaluation's headline column comes first
    assert sorted(named) == sorted(["fused.out", *(f"{n}.out" for n in model.member_names)])


def test_report_and_select_output_choose_what_out_holds(image) -> None:
    model = coop("cross", report="fused").eval()
    out = model(image)
    assert torch.equal(out["out"], out["fused.out"])
    assert select_output(model, "bottom") == "bottom"
    out = model(image)
    assert torch.equal(out["out"], out["bottom.out"])
    with pytest.raises(ValueError, match=r"unknown output 'left'.*fused.*top.*bottom"):
        select_output(model, "left")
    with pytest.raises(ValueError, match="model.report"):
        coop("cross", report="middle")
    single = create_model("deeplabv3plus", backbone="resnet18", num_classes=3)
    assert select_output(single) == "out"
    with pytest.raises(ValueError, match="one output"):
        select_output(single, "top")
    with pytest.raises(ValueError, match="reserved"):
        create_model("cooperative", members=[{**MEMBER, "name": "fused"}, MEMBER], num_classes=3)


def test_ensemble_rule_sum_of_logits(image) -> None:
    """The cross paper: "the ensemble method is just adding the final output[s]"."""
    model = coop("ensemble", fuse="sum_logits").eval()
    out = model(image)
    torch.testing.assert_close(out["fused.out"], out["top.out"] + out["bottom.out"])
    mean_prob = coop("ensemble").eval()(image)
    probs = (mean_prob["top.out"].softmax(1) + mean_prob["bottom.out"].softmax(1)) / 2
    torch.testing.assert_close(mean_prob["fused.out"].exp(), probs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="model.fuse"):
        coop("ensemble", fuse="vote")


def test_training_keeps_a_best_checkpoint_per_output(make_config, tmp_path) -> None:
    # class_weights used to fail on any cooperative model (KeyError: 'out').
    cfg = make_config(
        name="coop-best",
        model=tiny_cooperative("oneway-same"),
        train={"class_weights": [1.0] * 11, "iterations": 4, "val_interval": 2},
    )
    result = train(cfg, show_progress=False)
    ckpts = cfg.run_dir / "checkpoints"
    for name in ("fused", "top", "bottom"):
        model, _, info = load_model(ckpts / f"best-{name}.safetensors")
        assert info["output"] == name and model.output == name
        best = max(h[f"miou_{name}"] for h in result.history)
        assert info["miou"] == pytest.approx(best)
    _, _, info = load_model(ckpts / "best.safetensors")  # chosen by the reported output
    assert info["miou"] == pytest.approx(max(h["miou_bottom"] for h in result.history))
    assert result.best_miou == pytest.approx(info["miou"])

    # eval --output: the headline and the JSON say which output they are.
    out = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(ckpts / "final.safetensors"), "--json", str(out)]
    assert main([*argv, "--output", "top"]) == 0
    report = json.loads(out.read_text())
    assert report["output"] == "top"
    assert report["miou"] == report["outputs"]["top"]["miou"]
    assert list(report["outputs"]) == ["top", "fused", "bottom"]
    assert main([*argv, "--output", "left"]) == 2


class PredictsZero(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        logits[:, 0] = 1.0
        return {"out": logits}


def test_center_evaluation_scores_only_the_central_region() -> None:
    """VOC in both cooperative papers: "we cropped the center region in validation"."""
    from coopseg.config import EvalConfig
    from coopseg.engine.distributed import init_distributed
    from coopseg.engine.evaluate import evaluate_outputs
    from coopseg.engine.inference import center_crop, center_region

    mask = torch.ones(10, 12, dtype=torch.long)
    mask[3:7, 4:8] = 0  # class 0 exactly in the central 4x4 region, class 1 around it
    data = [(torch.zeros(3, 10, 12), mask)]
    dist = init_distributed("cpu")
    whole = evaluate_outputs(PredictsZero(), data, 2, dist=dist)["out"]
    center = evaluate_outputs(PredictsZero(), data, 2, dist=dist, center=(4, 4))["out"]
    assert whole.pixel_acc == pytest.approx(16 / 120)
    assert center.pixel_acc == 1.0
    # Smaller than the crop: padded on both sides with the ignore label, never scored.
    image, padded = center_crop(
        torch.ones(1, 3, 2, 3), torch.zeros(1, 2, 3, dtype=torch.long), (4, 5)
    )
    assert image.shape[-2:] == (4, 5) and int((padded == 255).sum()) == 20 - 6
    assert image[0, 0, 1:3, 1:4].eq(1).all() and image.sum() == 3 * 6
    assert center_region(EvalConfig(mode="center"), [513, 513]) == (513, 513)
    assert center_region(EvalConfig(mode="whole"), [513, 513]) is None


def test_paper_configs_say_what_the_papers_say() -> None:
    from coopseg.cli import resolve_config_path
    from coopseg.config import load_config

    for name in ("cross-voc-ensemble", "cross-cityscapes-ensemble"):
        assert load_config(resolve_config_path(name)).model["fuse"] == "sum_logits"
    voc = load_config(resolve_config_path("fs-deeplab-voc-single"))
    assert voc.eval.mode == "center" and voc.eval.crop_size == [513, 513]
    for name in ("cross-cityscapes-oneway", "cross-cityscapes-ensemble", "cross-voc-cross-c2"):
        first = resolve_config_path(name).read_text().splitlines()[0]
        assert first.startswith("# Ours, not a row of the paper"), name


def test_submission_masks_per_network(tmp_path, make_config) -> None:
    """A test split has no labels: each network's masks, named like the inputs."""
    import numpy as np
    from PIL import Image

    from coopseg.engine.checkpoint import save_weights

    cfg = make_config(name="submit", model=tiny_cooperative("cross"))
    torch.manual_seed(0)
    model = create_model("cooperative", **{k: v for k, v in cfg.model.items() if k != "arch"})
    path = tmp_path / "coop.safetensors"
    save_weights(path, model, cfg, {"palette": [[i * 20, 0, 0] for i in range(11)]})
    rgb = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "2008_000001.png")  # lossless
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255 - mean) / std
    with torch.no_grad():
        outputs = model.eval()(x)
    for name in ("top", "bottom"):
        out = tmp_path / name
        argv = ["predict", str(tmp_path / "2008_000001.png"), "--checkpoint", str(path)]
        assert main([*argv, "--out", str(out), "--output", name, "--masks-only"]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["2008_000001.png"]
        mask = Image.open(out / "2008_000001.png")
        assert mask.mode == "P"
        expected = outputs[f"{name}.out"].argmax(1)[0].numpy()
        assert np.array_equal(np.array(mask), expected)
