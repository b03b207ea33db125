"""Cooperative models: links widen receivers, carry gradients, fuse outputs, and train."""

from __future__ import annotations

import pytest
import torch

from coopseg.config import ConfigError, config_from_dict
from coopseg.models import create_model
from coopseg.models.cooperative import Link, LinkAggregator

from .conftest import tiny_cooperative

MEMBER = {
    "arch": "deeplabv3plus",
    "backbone": "resnet18",
    "aspp_channels": 16,
    "decoder_channels": 16,
    "low_level_channels": 8,
    "dropout": 0.0,
}


def coop(preset: str, k: int = 2, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("cooperative", members=[MEMBER] * k, preset=preset, num_classes=3, **kwargs)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_receiving_layers_widen_by_the_senders_channels() -> None:
    model = coop("oneway-same")
    top, bottom = model.members["top"], model.members["bottom"]
    # Top is untouched; every consumer in bottom sees exactly twice its own width.
    assert top.aspp.project[0][0].in_channels == 5 * 16
    assert bottom.aspp.project[0][0].in_channels == 2 * 5 * 16
    assert top.decoder.conv1[0].in_channels == 16 + 8
    assert bottom.decoder.conv1[0].in_channels == 2 * (16 + 8)
    assert bottom.decoder.conv2[0].in_channels == 32
    assert bottom.classifier.in_channels == 32
    assert bottom.aspp.branches[0][0].in_channels == 2 * top.aspp.branches[0][0].in_channels
    # Cross widens both members, including the backbone output (connection 1).
    cross = coop("cross")
    for member in cross.members.values():
        assert member.aspp.branches[0][0].in_channels == 2 * 512
        assert member.decoder.conv1[0].in_channels == 2 * (16 + 8)
    no_c1 = coop("cross", connection1=False, connection2=False)
    member = no_c1.members["top"]
    assert member.aspp.branches[0][0].in_channels == 512
    assert member.decoder.conv1[0].in_channels == 16 + 2 * 8  # only decoder.low is shared


@pytest.mark.parametrize("switches", [{}, {"connection1": False}, {"connection2": False}])
def test_one_way_and_cross_link_the_same_layers(switches) -> None:
    """The presets differ in direction only: the bottom network receives at the same
    taps in both (before, one-way skipped the backbone output that cross links)."""
    oneway, cross = coop("oneway-same", **switches), coop("cross", **switches)
    received = {link.target for link in oneway.links}
    assert received == {link.target for link in cross.links if link.target.startswith("bottom")}
    assert all(link.sources[0].startswith("top.") for link in oneway.links)
    assert ("bottom.backbone" in received) is switches.get("connection1", True)
    assert ("bottom.aspp" in received) is switches.get("connection2", True)
    assert not any(".backbone." in t for t in received)  # stages only send


def test_gradients_reach_the_sender_unless_detached(image) -> None:
    for detach, expect_grad in ((False, True), (True, False)):
        model = coop("oneway-same", detach=detach).train()
        out = model(image)
        out["bottom.out"].square().mean().backward()  # the bottom member's loss only
        top_grads = [p.grad for p in model.members["top"].parameters()]
        reached = any(g is not None and g.abs().sum() > 0 for g in top_grads)
        assert reached is expect_grad
        bottom_grads = [p.grad for p in model.members["bottom"].parameters()]
        assert all(g is not None for g in bottom_grads)


def test_one_way_top_does_not_depend_on_bottom_weights(image) -> None:
    model = coop("oneway-multiple").eval()
    before = model(image)
    with torch.no_grad():
        for p in model.members["bottom"].parameters():
            p.add_(torch.randn_like(p))
    after = model(image)
    torch.testing.assert_close(before["top.out"], after["top.out"], rtol=0, atol=0)
    assert not torch.allclose(before["bottom.out"], after["bottom.out"])


def test_cross_without_links_equals_independent_networks(image) -> None:
    model = coop("cross-no-paths").eval()
    for name, member in model.members.items():
        kwargs = {k: v for k, v in MEMBER.items() if k != "arch"}
        alone = create_model("deeplabv3plus", num_classes=3, **kwargs)
        alone.load_state_dict(member.state_dict())
        alone.eval()
        torch.testing.assert_close(model(image)[f"{name}.out"], alone(image)["out"])
    cross = coop("cross")
    assert len(cross.links) > 0 and len(model.links) == 0
    # The same model as `ensemble` from the same seed (the bench reuses its numbers).
    ensemble = coop("ensemble")
    for key, value in ensemble.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_ensemble_prediction_is_the_members_mean_probability(image) -> None:
    model = coop("ensemble").eval()
    out = model(image)
    members = torch.stack([out["top.out"].softmax(1), out["bottom.out"].softmax(1)])
    torch.testing.assert_close(out["out"].softmax(1), members.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["out"].exp(), members.mean(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(out["out"].argmax(1), members.sum(0).argmax(1))


def test_three_members_cross(image) -> None:
    model = coop("cross", k=3)
    assert model.member_names == ["net0", "net1", "net2"]
    member = model.members["net1"]
    assert member.decoder.conv2[0].in_channels == 3 * 16  # its own map plus two partners
    out = model.train()(image)
    assert sorted(out) == ["net0.out", "net1.out", "net2.out"]
    sum(v.mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_multiple_layer_link_reduces_like_concat_then_1x1() -> None:
    torch.manual_seed(0)
    agg = LinkAggregator([4, 6], reduce=5).eval()
    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4)
    size = torch.Size([8, 8])
    fast = agg([a, b], size)
    up = torch.nn.functional.interpolate(b, size=size, mode="bilinear", align_corners=False)
    weight = torch.cat([agg.project[0].weight, agg.project[1].weight], 1)
    slow = agg.norm(torch.nn.functional.conv2d(torch.cat([a, up], 1), weight))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    model = coop("oneway-multiple")  # the default: exactly twice the receiver's width
    (link,) = model.links
    assert link.target == "bottom.decoder.conv2" and link.reduce == 16
    assert len(link.sources) == len(model.members["top"].tap_info)
    assert model.members["bottom"].classifier.in_channels == 2 * 16


def test_multiple_layer_link_sends_backbone_stages_by_plain_concatenation(image) -> None:
    model = coop("oneway-multiple", multiple_aggregate="concat")
    (link,) = model.links
    top = model.members["top"]
    stages = [t for t in top.tap_info if t.startswith("backbone.")]
    assert len(stages) == 4  # resnet18 strides 2, 4, 8, 16 (shallow to deep), then the output
    assert link.sources[: len(stages)] == tuple(f"top.{t}" for t in stages)
    assert link.reduce is None and not any(p.numel() for p in model.aggregators.parameters())
    sent = sum(top.tap_info[s.partition(".")[2]].channels for s in link.sources)
    assert model.members["bottom"].classifier.in_channels == 16 + sent
    out = model.eval()(image[:1])
    assert out["bottom.out"].shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="read-only"):
        coop("custom", links=[{"from": "top.aspp", "to": "bottom.backbone.1"}])


def test_bad_links_are_refused_with_names() -> None:
    with pytest.raises(ValueError, match="has no tap 'asp'"):
        coop("custom", links=[{"from": "top.asp", "to": "bottom.aspp"}])
    with pytest.raises(ValueError, match="no member 'left'"):
        coop("custom", links=[{"from": "left.aspp", "to": "bottom.aspp"}])
    cycle = [
        {"from": "top.decoder.conv2", "to": "bottom.backbone"},
        {"from": "bottom.decoder.conv2", "to": "top.backbone"},
    ]
    with pytest.raises(ValueError, match="cycle"):
        coop("custom", links=cycle)
    with pytest.raises(ValueError, match="unknown link key"):
        Link.from_spec({"from": "a.b", "to": "c.d", "detatch": True})


def test_config_checks_member_sections() -> None:
    raw = {
        "model": {"arch": "cooperative", "num_classes": 3, "members": [{**MEMBER, "bakbone": 1}]}
    }
    with pytest.raises(ConfigError, match=r"model\.members\[0\]\.bakbone"):
        config_from_dict(raw)
    raw = {"model": {"arch": "cooperative", "members": [MEMBER], "preset": "cross", "links": [1]}}
    with pytest.raises(ConfigError, match=r"model\.links\[0\]"):
        config_from_dict(raw)


DANET = {"arch": "danet", "backbone": "resnet18", "head_channels": 32, "dropout": 0.0}


def test_danet_links_stay_inside_their_stream(image) -> None:
    for preset in ("oneway-same", "oneway-multiple", "cross"):
        model = create_model("cooperative", members=[DANET, DANET], preset=preset, num_classes=3)
        taps = model.members["top"].tap_info
        for link in model.links:
            groups = {taps[e.partition(".")[2]].group for e in (*link.sources, link.target)}
            assert len(groups) == 1 and None not in groups, (preset, link)  # streams only
        out = model.eval()(image[:1])
        assert out["out"].shape == (1, 3, 64, 64)
    # Every receiving layer is exactly twice as wide (feature-sharing §3.1); before, links
    # at both the reduction and the attention output made the stream conv 3x / 4x wide.
    for preset, receivers in (("oneway-same", ["bottom"]), ("cross", ["top", "bottom"])):
        model = create_model("cooperative", members=[DANET, DANET], preset=preset, num_classes=3)
        for name, member in model.members.items():
            for stream in (member.position, member.channel):
                width = stream.conv[0].in_channels
                assert width == (64 if name in receivers else 32), (preset, name, width)
            assert member.position.reduce[0].in_channels == 512  # the backbone is not linked
            assert member.classifier[1].in_channels == 32  # nor the fused map
    multiple = create_model("cooperative", members=[DANET, DANET], preset="oneway-multiple")
    targets = sorted(link.target for link in multiple.links)
    assert targets == ["bottom.channel.attention", "bottom.position.attention"]
    sources = {link.target: link.sources for link in multiple.links}
    assert sources["bottom.position.attention"] == (
        "top.position.reduce",
        "top.position.attention",
    )
    out = multiple.train()(image)
    assert {"top.aux_position", "bottom.aux_channel"} <= set(out)
    assert multiple.default_aux_weights["bottom.aux_position"] == 1.0
    bad = [{"from": "top.position.reduce", "to": "bottom.channel.reduce"}]
    with pytest.raises(ValueError, match="different streams"):
        create_model("cooperative", members=[DANET, DANET], preset="custom", links=bad)


def test_evaluation_reports_fused_and_every_member(tiny_scenes) -> None:
    from coopseg.data import FashionScenes, eval_transform
    from coopseg.engine.distributed import init_distributed
    from coopseg.engine.evaluate import evaluate, evaluate_outputs

    model = create_model("cooperative", members=[MEMBER] * 2, preset="cross", num_classes=11)
    val = FashionScenes(tiny_scenes, "val", eval_transform([0.5] * 3, [0.25] * 3))
    dist = init_distributed("cpu")
    metrics = evaluate_outputs(model, val, 11, dist=dist, batch_size=8)
    # Cross reports each network's own output; the headline (first) is model.report.
    assert list(metrics) == ["top", "fused", "bottom"]
    headline = evaluate(model, val, 11, dist=dist, batch_size=8)
    assert headline.miou == metrics["top"].miou
    # The member columns are the members' own predictions, checked by hand on one batch.
    images, masks = next(iter(torch.utils.data.DataLoader(val, batch_size=16)))
    with torch.no_grad():
        top = model.eval()(images)["top.out"].argmax(1)
    valid = masks != 255
    correct = (top[valid] == masks[valid]).sum().item() / valid.sum().item()
    assert abs(metrics["top"].pixel_acc - correct) < 1e-9


def test_profile_breaks_down_members_and_links() -> None:
    from coopseg.engine.profile import cooperative_breakdown, count_macs, count_params

    model = coop("oneway-same")
    parts = cooperative_breakdown(model, (64, 64))
    kwargs = {k: v for k, v in MEMBER.items() if k != "arch"}
    alone = create_model("deeplabv3plus", num_classes=3, **kwargs)
    assert parts["members"]["top"]["alone_params_m"] == count_params(alone) / 1e6
    assert abs(parts["members"]["top"]["alone_gmacs"] - count_macs(alone, (64, 64)) / 1e9) < 1e-9
    # The top member only sends: as built it is exactly the network alone.
    assert parts["members"]["top"]["params_m"] == parts["members"]["top"]["alone_params_m"]
    total = parts["total"]
    summed = sum(m["gmacs"] for m in parts["members"].values())
    assert abs(summed - total["gmacs"]) < 1e-9  # no-reduce links compute nothing themselves
    links = parts["links"]
    assert links["params_m"] > 0 and links["gmacs"] > 0
    assert abs(total["params_m"] - links["params_m"] - 2 * count_params(alone) / 1e6) < 1e-9


def test_unprefixed_aux_weight_applies_to_every_member(make_config) -> None:
    from coopseg.engine.train import Trainer

    model = {"arch": "cooperative", "preset": "ensemble", "num_classes": 11}
    model["members"] = [{**DANET}, {**DANET}]
    cfg = make_config(name="aux", model=model, train={"aux_weights": {"aux_position": 0.25}})
    weights = Trainer(cfg, show_progress=False).criterion.aux_weights
    assert weights["top.aux_position"] == weights["bottom.aux_position"] == 0.25
    assert weights["top.aux_channel"] == 1.0


def test_cooperative_checkpoint_predicts_the_reported_output(tmp_path, make_config) -> None:
    import numpy as np
    from PIL import Image

    from coopseg.engine.checkpoint import load_model, save_weights
    from coopseg.engine.predict import predict_files

    cfg = make_config(name="coop-predict", model=tiny_cooperative("oneway-multiple"))
    torch.manual_seed(0)
    model = create_model("cooperative", **{k: v for k, v in cfg.model.items() if k != "arch"})
    path = tmp_path / "coop.safetensors"
    save_weights(path, model, cfg, {"palette": [[i * 20, 0, 0] for i in range(11)]})
    loaded, _, _ = load_model(path)
    assert loaded.links == model.links
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    predict_files(path, [tmp_path / "photo.png"], tmp_path / "out", device="cpu")
    mask = np.array(Image.open(tmp_path / "out" / "photo_mask.png"))
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255 - mean) / std
    with torch.no_grad():
        expected = model.eval()(x)["out"].argmax(1)[0].numpy()
    assert mask.shape == (40, 56) and np.array_equal(mask, expected)


def _seeded(index: int, **keys) -> dict:
    return {**MEMBER, "separable": True, "init_seed": 10 + index, **keys}


@pytest.mark.parametrize("preset", ["cross", "oneway-multiple"])
def test_zero_link_init_starts_a_linked_pair_exactly_as_its_ensemble(preset, image) -> None:
    """With ``link_init: zero`` each member computes at step 0 exactly what it computes
    alone (the ensemble's member of the same init seed); the received channels' weights
    start at zero and learn from the first step."""
    members = [_seeded(0), _seeded(1, aspp_channels=8)]  # two different networks
    linked = create_model(
        "cooperative", members=members, preset=preset, num_classes=3, link_init="zero"
    ).eval()
    ensemble = create_model("cooperative", members=members, preset="ensemble", num_classes=3)
    ensemble.eval()
    random = create_model("cooperative", members=members, preset=preset, num_classes=3).eval()
    with torch.no_grad():
        got, want, other = linked(image[:1]), ensemble(image[:1]), random(image[:1])
    for name in ("top", "bottom", "fused"):
        torch.testing.assert_close(got[f"{name}.out"], want[f"{name}.out"], rtol=1e-4, atol=1e-4)
    assert (other["bottom.out"] - want["bottom.out"]).abs().max() > 1e-2  # random: not so
    bottom = linked.members["bottom"]
    # the layer after the deepest receiving tap: the pointwise conv of decoder.conv2
    # (same-layer links), or the classifier (the multiple-layer link)
    conv = bottom.classifier if preset == "oneway-multiple" else bottom.decoder.conv2[3]
    assert conv.weight.shape[1] == 32
    assert conv.weight[:, 16:].abs().sum() == 0 and conv.weight[:, :16].abs().sum() > 0
    linked.train()
    out = linked(image)  # two images: train-mode BN needs more than one value a channel
    sum(v.float().mean() for k, v in out.items() if k.endswith(".out")).backward()
    assert conv.weight.grad[:, 16:].abs().sum() > 0  # the zeros learn


def test_zero_link_init_is_refused_where_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match=r"members\[1\].init_seed"):
        create_model(
            "cooperative",
            members=[_seeded(0), MEMBER],
            preset="cross",
            num_classes=3,
            link_init="zero",
        )
    with pytest.raises(ValueError, match="model.link_init: unknown"):
        create_model("cooperative", members=[MEMBER] * 2, preset="cross", link_init="ones")
