"""DF-DAM: published sizes, shapes, ablation switches, attention recording, taps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from coopseg import create_model
from coopseg.engine.loss import SegmentationLoss
from coopseg.engine.profile import count_macs, count_params
from coopseg.models import ARCHITECTURES, DFDAM, run_taps


def dfdam(fusion: str = "dafm+2dpam", **kwargs) -> DFDAM:
    kwargs.setdefault("backbone", "resnet18")
    kwargs.setdefault("num_classes", 5)
    return create_model("dfdam", fusion=fusion, **kwargs)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def models() -> dict[str, DFDAM]:
    """One eval-mode model per ablation, shared by the tests that do not change them."""
    torch.manual_seed(0)
    return {f: dfdam(f).eval() for f in ("sum", "dafm", "dafm+2dpam")}


@pytest.mark.parametrize(
    ("backbone", "params", "gmacs"), [("resnet18", 11.57e6, 10.31), ("resnet101", 43.24e6, 35.52)]
)
def test_published_params_and_macs(backbone: str, params: float, gmacs: float) -> None:
    """Table 4/6 sizes (3x320x640, 19 classes), counted as ``coopseg profile`` counts."""
    model = create_model("dfdam", backbone=backbone, num_classes=19)
    assert abs(count_params(model) - params) / params < 0.03
    if backbone == "resnet18":
        real = count_macs(model, (320, 640))
    # The count depends on shapes only, so the big model is counted on the meta device
    # (no arithmetic); on R18 both ways are checked to agree.
    macs = count_macs(model.to("meta"), (320, 640))
    if backbone == "resnet18":
        assert macs == real
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.10


def test_registered_with_paper_loss_weights() -> None:
    assert ARCHITECTURES["dfdam"] is DFDAM
    assert DFDAM.default_aux_weights == {"aux_context": 0.4, "aux_spatial": 0.1}
    with pytest.raises(ValueError, match="fusion must be one of"):
        dfdam("attention")


@pytest.mark.parametrize("fusion", ["sum", "dafm", "dafm+2dpam"])
def test_eval_output_has_input_size(models: dict[str, DFDAM], fusion: str) -> None:
    model = models[fusion]
    for size in [(64, 64), (65, 97), (33, 130)]:  # the last two not divisible by 32
        with torch.no_grad():
            out = model(torch.randn(1, 3, *size))
        assert set(out) == {"out"}
        assert out["out"].shape == (1, 5, *size)


def test_training_outputs_and_paper_loss() -> None:
    torch.manual_seed(0)
    model = dfdam().train()
    x = torch.randn(2, 3, 65, 97)
    out = model(x)
    assert set(out) == {"out", "aux_context", "aux_spatial"}
    for logits in out.values():
        assert logits.shape == (2, 5, 65, 97)
    target = torch.randint(0, 5, (2, 65, 97))
    total, parts = SegmentationLoss(model.default_aux_weights)(out, target)

    def ce(name: str) -> torch.Tensor:
        return F.cross_entropy(out[name], target)

    expected = ce("out") + 0.4 * ce("aux_context") + 0.1 * ce("aux_spatial")
    torch.testing.assert_close(total, expected)
    assert set(parts) == set(out)
    total.backward()
    assert model.aux_spatial.weight.grad is not None
    assert model.pam.confidence[0][0].weight.grad is not None


def test_ablation_switches_build_only_their_modules(models: dict[str, DFDAM]) -> None:
    plain, dafm, full = models["sum"], models["dafm"], models["dafm+2dpam"]
    assert plain.dafm is None and plain.pam is None
    assert dafm.dafm is not None and dafm.pam is None
    assert full.dafm is not None and full.pam is not None
    # DAFM: two GAP -> 1x1 conv (128 -> 128, with bias) -> sigmoid branches.
    assert count_params(dafm.dafm) == 2 * (128 * 128 + 128)
    assert count_params(dafm) - count_params(plain) == count_params(dafm.dafm)
    assert count_params(full) - count_params(dafm) == count_params(full.pam)
    # 2DPAM: 3x3 conv on concat(spatial, context) to 32 (+BN), 1x1 to one channel.
    assert count_params(full.pam) == 256 * 32 * 9 + 2 * 32 + 32 + 1
    assert "spatial.selected" in full.tap_info and "spatial.selected" not in dafm.tap_info


def _copy(src: DFDAM, dst: DFDAM) -> None:
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected
    assert all(k.startswith(("dafm.", "pam.")) for k in missing)


def test_ablations_replace_modules_by_plain_sums(models: dict[str, DFDAM]) -> None:
    """Saturated attention (alpha = 1, beta = 1) turns each row into the one above it."""
    plain, dafm, full = (copy.deepcopy(models[f]) for f in ("sum", "dafm", "dafm+2dpam"))
    _copy(plain, dafm)
    _copy(plain, full)
    with torch.no_grad():
        for m in (dafm, full):
            for branch in (m.dafm.weight_high, m.dafm.weight_low):
                branch[1].weight.zero_()
                branch[1].bias.fill_(40.0)  # sigmoid(40) == 1 in float32
        x = torch.randn(1, 3, 64, 96)
        torch.testing.assert_close(dafm(x)["out"], plain(x)["out"])
        assert not torch.allclose(full(x)["out"], dafm(x)["out"])
        full.pam.confidence[1].weight.zero_()
        full.pam.confidence[1].bias.fill_(40.0)
        torch.testing.assert_close(full(x)["out"], dafm(x)["out"])


@pytest.mark.parametrize(
    ("fusion", "keys"),
    [
        ("sum", set()),
        ("dafm", {"alpha_high", "alpha_low"}),
        ("dafm+2dpam", {"alpha_high", "alpha_low", "beta"}),
    ],
)
def test_attention_recording(models: dict[str, DFDAM], fusion: str, keys: set[str]) -> None:
    model = models[fusion]
    x = torch.randn(2, 3, 65, 97)
    assert model.record_attention is False
    model.attention = {}
    with torch.no_grad():
        model(x)
    assert model.attention == {}  # nothing is kept unless asked for
    model.record_attention = True
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.record_attention = False
    attn = model.attention
    assert set(attn) == keys
    for name in keys & {"alpha_high", "alpha_low"}:
        assert attn[name].shape == (2, 128)
    if "beta" in keys:
        assert attn["beta"].shape == (2, 1, 17, 25)  # stride 4 of 65x97
    for value in attn.values():
        assert not value.requires_grad
        assert ((value > 0) & (value < 1)).all()


def test_recorded_attention_is_what_the_forward_applied(models: dict[str, DFDAM]) -> None:
    model = copy.deepcopy(models["dafm+2dpam"])
    model.record_attention = True
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, fmap: torch.Tensor) -> torch.Tensor:
        seen[name] = fmap
        return fmap

    with torch.no_grad():
        run_taps(model.forward_taps(torch.randn(1, 3, 64, 96)), record)
    beta, a_high, a_low = (model.attention[k] for k in ("beta", "alpha_high", "alpha_low"))
    torch.testing.assert_close(seen["spatial.selected"], beta * seen["spatial"])
    up = F.interpolate(seen["context.high"], size=(4, 6), mode="bilinear", align_corners=False)
    expected = a_high[..., None, None] * up + a_low[..., None, None] * seen["context.low"]
    torch.testing.assert_close(seen["context"], expected)


def test_taps_in_execution_order_with_declared_shapes(models: dict[str, DFDAM]) -> None:
    model = models["dafm+2dpam"]
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, fmap: torch.Tensor) -> torch.Tensor:
        seen[name] = fmap
        return fmap

    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        tapped = run_taps(model.forward_taps(x), record)["out"]
        plain = model(x)["out"]
    order = ["spatial", "context.low", "context.high", "context", "spatial.selected"]
    assert list(seen) == list(model.tap_info) == [*order, "fusion", "refine"]
    for name, info in model.tap_info.items():
        assert seen[name].shape[1:] == (info.channels, 64 // info.stride, 96 // info.stride), name
    torch.testing.assert_close(tapped, plain)


def test_extra_channels_widen_the_consuming_layers(models: dict[str, DFDAM]) -> None:
    extra = {
        "spatial": 3,
        "context.low": 4,
        "context.high": 5,
        "context": 6,
        "spatial.selected": 7,
        "fusion": 8,
        "refine": 9,
    }
    base = models["dafm+2dpam"]
    wide = dfdam(extra_channels=extra)
    assert len(base.merge) == 0
    for tap in ("spatial", "context.low", "context.high", "context", "spatial.selected"):
        assert wide.merge[tap.replace(".", "_")][0].in_channels == 128 + extra[tap]
    assert wide.refine[0].in_channels == base.refine[0].in_channels + 8
    assert wide.classifier.in_channels == base.classifier.in_channels + 9
    partial = dfdam(extra_channels={"context": 2})
    assert list(partial.merge) == ["context"]

    def widen(name: str, fmap: torch.Tensor) -> torch.Tensor:
        if name in extra:
            pad = torch.zeros(fmap.shape[0], extra[name], *fmap.shape[-2:])
            return torch.cat([fmap, pad], 1)
        return fmap

    wide.train()
    out = run_taps(wide.forward_taps(torch.randn(2, 3, 65, 97)), widen)
    assert {k: v.shape for k, v in out.items()} == {
        k: (2, 5, 65, 97) for k in ("out", "aux_context", "aux_spatial")
    }
    with pytest.raises(ValueError, match=r"no tap\(s\) \['spatial.selected'\]"):
        dfdam("dafm", extra_channels={"spatial.selected": 3})


@pytest.mark.parametrize(
    ("aux_spatial_on", "tap"), [("raw", "spatial"), ("weighted", "spatial.selected")]
)
def test_aux_spatial_head_reads_the_chosen_map(aux_spatial_on: str, tap: str) -> None:
    """``raw`` (default, the paper's literal "spatial information" X^SI) or ``weighted``
    (beta * X^SI, the 2DPAM output)."""
    torch.manual_seed(0)
    model = dfdam(aux_spatial_on=aux_spatial_on).train()
    assert model.aux_spatial_on == aux_spatial_on
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, fmap: torch.Tensor) -> torch.Tensor:
        seen[name] = fmap
        return fmap

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = run_taps(model.forward_taps(x), record)
        expected = F.interpolate(
            model.aux_spatial(seen[tap]), size=(64, 96), mode="bilinear", align_corners=False
        )
        other = "spatial.selected" if tap == "spatial" else "spatial"
        wrong = F.interpolate(
            model.aux_spatial(seen[other]), size=(64, 96), mode="bilinear", align_corners=False
        )
    torch.testing.assert_close(out["aux_spatial"], expected)
    assert not torch.allclose(out["aux_spatial"], wrong)  # beta is not 1: the readings differ


def test_aux_spatial_default_is_raw_and_bad_value_is_named() -> None:
    assert dfdam().aux_spatial_on == "raw"
    with pytest.raises(ValueError, match="aux_spatial_on must be one of"):
        dfdam(aux_spatial_on="beta")
    # Without 2DPAM beta is 1, so both readings supervise the same map.
    torch.manual_seed(0)
    raw = dfdam("dafm").train()
    weighted = dfdam("dafm", aux_spatial_on="weighted").train()
    weighted.load_state_dict(raw.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(raw(x)["aux_spatial"], weighted(x)["aux_spatial"])


# The paper's ablation rows (Table 1: VOC val; Table 2: Cityscapes val) -> packaged config.
ABLATION_ROWS = {
    ("voc", "resnet50", "sum"): "dfdam-voc-resnet50-ablation-sum",
    ("voc", "resnet50", "dafm"): "dfdam-voc-resnet50-ablation-dafm",
    ("voc", "resnet50", "dafm+2dpam"): "dfdam-voc-resnet50",
    ("voc", "resnet101", "sum"): "dfdam-voc-resnet101-ablation-sum",
    ("voc", "resnet101", "dafm"): "dfdam-voc-resnet101-ablation-dafm",
    ("voc", "resnet101", "dafm+2dpam"): "dfdam-voc-resnet101",
    ("cityscapes", "resnet18", "sum"): "dfdam-cityscapes-resnet18-ablation-sum",
    ("cityscapes", "resnet18", "dafm"): "dfdam-cityscapes-resnet18-ablation-dafm",
    ("cityscapes", "resnet18", "dafm+2dpam"): "dfdam-cityscapes-resnet18",
}


@pytest.mark.parametrize(("row", "name"), sorted(ABLATION_ROWS.items()))
def test_every_ablation_row_has_a_config(row: tuple[str, str, str], name: str) -> None:
    from coopseg.config import PACKAGED_CONFIGS, load_config

    fusion = row[2]
    cfg = load_config(PACKAGED_CONFIGS / f"{name}.yaml")
    assert cfg.name == name
    assert (cfg.data.dataset, cfg.model["backbone"], cfg.model["fusion"]) == row
    assert cfg.data.scale_set == [0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    if fusion != "dafm+2dpam":  # the tables are single scale, no flip (= Tables 3/5 row 1)
        assert cfg.eval.scales == [1.0] and cfg.eval.flip is False


def test_voc_trainval_finetune_config() -> None:
    """Tables 6-7: the train_aug model fine-tuned on VOC 2012 trainval (train.init_from)."""
    from coopseg.config import PACKAGED_CONFIGS, load_config

    cfg = load_config(PACKAGED_CONFIGS / "dfdam-voc-resnet101-trainval-finetune.yaml")
    start = load_config(PACKAGED_CONFIGS / "dfdam-voc-resnet101.yaml")
    assert cfg.data.train_split == "trainval"
    assert cfg.train.init_from == f"runs/{start.name}/checkpoints/best.safetensors"
    assert cfg.model == {**start.model, "pretrained": False}  # same model, whole-model start
    assert cfg.eval.scales == start.eval.scales and cfg.eval.flip  # MS + flip, as Table 5
