"""DANet: published size, shapes, PAM implementations agree, CAM variants, taps, widening."""

from __future__ import annotations

import math

import pytest
import torch

from coopseg import create_model
from coopseg.models import run_taps
from coopseg.models.danet import (
    ChannelAttention,
    DANet,
    PositionAttention,
    pam_attention,
)

TAPS = [
    "backbone",
    "position.reduce",
    "channel.reduce",
    "position.attention",
    "channel.attention",
    "fusion",
]


def small_danet(**kwargs) -> DANet:
    torch.manual_seed(0)
    return create_model("danet", backbone="resnet18", num_classes=4, head_channels=32, **kwargs)


@pytest.fixture(scope="module")
def model() -> DANet:
    """One small DANet shared by the tests that only run it (each sets its own mode)."""
    return small_danet()


def test_parameter_count_matches_published() -> None:
    model = create_model("danet", backbone="resnet101", num_classes=21, output_stride=8)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 66.45e6) / 66.45e6 < 0.005
    # The official head widths: 2048 -> 512 per stream, Q/K to 64.
    assert model.position.reduce[0].in_channels == 2048
    assert model.position.reduce[0].out_channels == 512
    assert model.position.attention.query.out_channels == 64


@pytest.mark.parametrize("size", [(64, 64), (65, 97), (50, 130)])
def test_training_outputs_have_input_size(model: DANet, size: tuple[int, int]) -> None:
    with torch.no_grad():
        out = model.train()(torch.randn(2, 3, *size))
    # The trainer sums CE over every output: logits only, the aux ones named by the weights.
    assert set(out) == {"out", "aux_position", "aux_channel"}
    assert set(model.default_aux_weights) == {"aux_position", "aux_channel"}
    assert all(v.shape == (2, 4, *size) for v in out.values())


def test_defaults_and_options_reach_the_modules() -> None:
    model = create_model(
        "danet", backbone="resnet18", num_classes=3, cam="paper", pam_chunk_threshold=7
    )
    assert model.position.reduce[0].out_channels == 512 // 4
    assert model.channel.conv[0].out_channels == 128
    assert model.output_stride == 8
    assert model.channel.attention.variant == "paper"
    assert model.position.attention.impl == "auto"
    assert model.position.attention.auto_threshold == 7


def _qkv(b: int = 2, n: int = 37, d: int = 4, c: int = 12) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(b, n, w, requires_grad=True) for w in (d, d, c)]


def test_pam_implementations_agree_in_values_and_gradients() -> None:
    q, k, v = _qkv()
    weight = torch.randn(2, 37, 12)
    results = {}
    for impl, chunk in [("dense", None), ("chunked", 5), ("chunked", None), ("sdpa", None)]:
        out = pam_attention(q, k, v, impl, chunk_size=chunk)
        grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
        results[(impl, chunk)] = (out, grads)
    ref_out, ref_grads = results[("dense", None)]
    # The reference is the unscaled softmax(q k^T) v in double precision.
    expected = torch.softmax(q.double() @ k.double().transpose(1, 2), -1) @ v.double()
    torch.testing.assert_close(ref_out, expected.float(), rtol=1e-5, atol=1e-5)
    for key, (out, grads) in results.items():
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=str(key))
        for g, g_ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=str(key))
    # No 1/sqrt(d) scaling: the default sdpa scale would give something else.
    scaled = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(scaled, ref_out, atol=1e-3)
    with pytest.raises(ValueError, match="pam_impl"):
        pam_attention(q, k, v, "auto")


def test_pam_module_matches_hand_written_reference_for_every_impl() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    pam = PositionAttention(16, impl="dense")
    with torch.no_grad():
        pam.gamma.fill_(0.7)

    def conv1x1(conv: torch.nn.Conv2d) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias[:, None, None]

    q, k, v = conv1x1(pam.query), conv1x1(pam.key), conv1x1(pam.value)
    energy = torch.einsum("bdn,bdm->bnm", q.flatten(2), k.flatten(2))  # query n, key m
    attn = torch.softmax(energy, dim=-1)
    expected = 0.7 * torch.einsum("bcm,bnm->bcn", v.flatten(2), attn).view_as(x) + x
    (grad_ref,) = torch.autograd.grad(expected.square().sum(), x)
    for impl in ["dense", "chunked", "sdpa", "auto"]:
        pam.impl, pam.chunk_size = impl, 6
        out = pam(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=impl)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4, msg=impl)


def test_pam_auto_switches_at_the_threshold() -> None:
    pam = PositionAttention(16, impl="auto", auto_threshold=100)
    assert pam.resolved_impl(100) == "dense"
    assert pam.resolved_impl(101) == "chunked"
    assert PositionAttention(16, impl="sdpa").resolved_impl(10) == "sdpa"
    with pytest.raises(ValueError, match="pam_impl"):
        PositionAttention(16, impl="flash")  # type: ignore[arg-type]


def _cam_by_hand(x: torch.Tensor, variant: str) -> torch.Tensor:
    """CAM for one image, written with plain loops (beta = 1)."""
    c = x.shape[0]
    a = x.reshape(c, -1).tolist()
    n = len(a[0])
    energy = [[sum(a[i][m] * a[j][m] for m in range(n)) for j in range(c)] for i in range(c)]
    out = []
    for i in range(c):
        logits = energy[i]
        if variant == "official":
            logits = [max(energy[i]) - e for e in energy[i]]
        top = max(logits)
        weights = [math.exp(z - top) for z in logits]
        weights = [w / sum(weights) for w in weights]
        out.append([sum(weights[j] * a[j][m] for j in range(c)) + a[i][m] for m in range(n)])
    return torch.tensor(out).view_as(x)


def test_cam_variants_match_hand_written_reference_and_differ() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, 3) * 0.5
    outs = {}
    for variant in ["official", "paper"]:
        cam = ChannelAttention(variant)
        with torch.no_grad():
            cam.beta.fill_(1.0)
            outs[variant] = cam(x)
        expected = torch.stack([_cam_by_hand(x[b], variant) for b in range(2)])
        torch.testing.assert_close(outs[variant], expected, rtol=1e-5, atol=1e-5)
    assert (outs["official"] - outs["paper"]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="cam"):
        ChannelAttention("max")  # type: ignore[arg-type]


def test_attention_starts_as_identity_and_its_scales_learn(model: DANet) -> None:
    model.train().zero_grad(set_to_none=True)
    pam, cam = model.position.attention, model.channel.attention
    assert pam.gamma.item() == 0.0 and cam.beta.item() == 0.0
    fmap = torch.randn(2, 32, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(pam(fmap), fmap)
        torch.testing.assert_close(cam(fmap), fmap)
    # Backward through the head only (the backbone map is detached): that is where they live.
    x = torch.randn(2, 3, 64, 64)
    out = run_taps(model.forward_taps(x), lambda n, f: f.detach() if n == "backbone" else f)
    target = torch.randint(0, 4, (2, 64, 64))
    loss = sum(torch.nn.functional.cross_entropy(v, target) for v in out.values())
    loss.backward()
    assert pam.gamma.grad is not None and pam.gamma.grad.abs().item() > 0
    assert cam.beta.grad is not None and cam.beta.grad.abs().item() > 0


def test_taps_are_named_in_execution_order_with_stream_groups(model: DANet) -> None:
    model.eval()
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, fmap: torch.Tensor) -> torch.Tensor:
        seen[name] = fmap
        return fmap

    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        tapped = run_taps(model.forward_taps(x), record)["out"]
        plain = model(x)
    assert set(plain) == {"out"}  # eval mode: no auxiliary logits
    assert plain["out"].shape == (1, 4, 64, 96)
    assert list(seen) == list(model.tap_info) == TAPS
    groups = {name: info.group for name, info in model.tap_info.items()}
    assert groups == {
        "backbone": None,
        "position.reduce": "position",
        "channel.reduce": "channel",
        "position.attention": "position",
        "channel.attention": "channel",
        "fusion": None,
    }
    for name, info in model.tap_info.items():
        assert seen[name].shape[1:] == (info.channels, 64 // info.stride, 96 // info.stride), name
    assert model.tap_info["backbone"].channels == 512
    torch.testing.assert_close(tapped, plain["out"])


def test_extra_channels_widen_the_consuming_layers(model: DANet) -> None:
    extra = {
        "backbone": 5,
        "position.reduce": 8,
        "channel.reduce": 3,
        "position.attention": 7,
        "channel.attention": 11,
        "fusion": 13,
    }
    base = model
    wide = small_danet(extra_channels=extra)
    for stream in ("position", "channel"):
        assert getattr(wide, stream).reduce[0].in_channels == 512 + 5
    # PAM runs on the concatenated map: Q/K/V sized from it, V keeps its width.
    pam = wide.position.attention
    assert pam.query.in_channels == pam.value.in_channels == pam.value.out_channels == 32 + 8
    assert pam.query.out_channels == (32 + 8) // 8
    assert wide.tap_info["position.attention"].channels == 32 + 8
    assert wide.tap_info["channel.attention"].channels == 32 + 3
    assert wide.position.conv[0].in_channels == 32 + 8 + 7
    assert wide.channel.conv[0].in_channels == 32 + 3 + 11
    assert wide.classifier[1].in_channels == base.classifier[1].in_channels + 13
    # The auxiliary classifiers read the stream map after its conv: never widened.
    assert wide.position.classifier[1].in_channels == base.position.classifier[1].in_channels

    def widen(name: str, fmap: torch.Tensor) -> torch.Tensor:
        if name in extra:
            return torch.cat([fmap, torch.randn(fmap.shape[0], extra[name], *fmap.shape[-2:])], 1)
        return fmap

    with torch.no_grad():
        out = run_taps(wide.train().forward_taps(torch.randn(2, 3, 65, 97)), widen)
    assert set(out) == {"out", "aux_position", "aux_channel"}
    assert out["out"].shape == (2, 4, 65, 97)
    with pytest.raises(ValueError, match=r"no tap\(s\) \['position.conv'\]"):
        small_danet(extra_channels={"position.conv": 4})
