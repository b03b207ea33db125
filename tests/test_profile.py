"""Parameter and MAC counts checked against closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import coopseg
from coopseg.engine.profile import count_macs, count_params, measure_latency, profile_model


def test_conv_macs_exact() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, (10, 10)) == 3 * 8 * 9 * 100  # bias adds are not counted
    assert count_macs(conv, (10, 10), batch=2) == 2 * 3 * 8 * 9 * 100
    assert count_macs(conv, 10) == 3 * 8 * 9 * 100


def test_strided_and_grouped_conv_macs() -> None:
    strided = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 10x10 -> 5x5
    assert count_macs(strided, (10, 10)) == 3 * 8 * 9 * 25
    depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    assert count_macs(depthwise, (6, 6), in_chans=4) == 4 * 9 * 36


def test_linear_macs_exact() -> None:
    # Linear acts on the last dimension (W = 10) of a 1x3x4x10 input: 3*4 rows of 10 -> 5.
    assert count_macs(nn.Linear(10, 5), (4, 10)) == 3 * 4 * 10 * 5


def test_sequential_counts_conv_and_linear_only() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    assert count_macs(net, (10, 10)) == 3 * 8 * 9 * 100 + 8 * 4 * 100 + 4 * 2


def test_measurement_restores_training_modes() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout())
    net.train()
    net[2].eval()  # a submodule deliberately in eval mode must stay so
    before = net[1].running_mean.clone()
    count_macs(net, (8, 8))
    measure_latency(net, (8, 8), warmup=1, iters=1)
    assert net.training and net[0].training and net[1].training and not net[2].training
    assert torch.equal(net[1].running_mean, before)  # ran in eval mode
    assert net[1].num_batches_tracked.item() == 0


def test_count_params_and_trainable() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))  # 15 + 8
    assert count_params(net) == 23
    net[0].requires_grad_(False)
    assert count_params(net, trainable=True) == 8
    assert count_params(net) == 23


@pytest.fixture(scope="module")
def deeplab() -> nn.Module:
    torch.manual_seed(0)
    return coopseg.create_model(
        "deeplabv3plus", backbone="resnet18", num_classes=11, output_stride=16
    )


def test_deeplab_params_and_profile(deeplab: nn.Module) -> None:
    assert count_params(deeplab) == sum(p.numel() for p in deeplab.parameters())
    prof = profile_model(deeplab, (64, 64), warmup=0, iters=1)
    assert prof["params"] == count_params(deeplab)
    assert prof["params_m"] == pytest.approx(prof["params"] / 1e6)
    assert prof["gmacs"] == pytest.approx(prof["macs"] / 1e9)
    assert prof["macs"] > 0 and prof["input_size"] == [64, 64]
    assert prof["latency_ms"] == prof["latency"]["median_ms"] > 0
    assert "latency_ms" not in profile_model(deeplab, (64, 64), latency=False)


def test_measure_latency_keys() -> None:
    lat = measure_latency(nn.Conv2d(3, 4, 3), (16, 16), batch=2, warmup=1, iters=3)
    assert lat["min_ms"] <= lat["median_ms"] <= lat["max_ms"]
    assert lat["iters"] == 3 and lat["batch"] == 2 and lat["device"] == "cpu"
    with pytest.raises(ValueError):
        measure_latency(nn.Conv2d(3, 4, 3), (16, 16), iters=0)
