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


def test_separable_deeplab_macs_closed_form(deeplab: nn.Module) -> None:
    """Separable 3x3 = depthwise (C*9) + pointwise (C*256) MACs per position, for the three
    atrous branches (512 ch at 4x4 for a 64x64 input, OS 16) and two decoder convs
    (304 and 256 ch at 16x16)."""
    separable = coopseg.create_model(
        "deeplabv3plus", backbone="resnet18", num_classes=11, output_stride=16, separable=True
    )

    def saved(c: int, positions: int) -> int:
        return positions * (c * 256 * 9 - (c * 9 + c * 256))

    expected = 3 * saved(512, 4 * 4) + saved(304, 16 * 16) + saved(256, 16 * 16)
    assert count_macs(deeplab, (64, 64)) - count_macs(separable, (64, 64)) == expected
    assert count_params(deeplab) - count_params(separable) == sum(
        c * 256 * 9 - (c * 9 + 2 * c + c * 256) for c in (512, 512, 512, 304, 256)
    )


# -- coopseg profile on the command line --------------------------------------------------


def test_cli_profiles_an_architecture_without_backbone(capsys) -> None:
    """``--arch jointseg`` used to fail: the command passed its default backbone along."""
    import json

    from coopseg.cli import main

    argv = ["profile", "--arch", "jointseg", "--num-classes", "11", "--input-size", "32", "32"]
    assert main([*argv, "--no-latency", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["arch"] == "jointseg" and result["backbone"] is None
    assert result["params"] == count_params(coopseg.create_model("jointseg", num_classes=11))
    assert main([*argv, "--no-latency"]) == 0
    assert capsys.readouterr().out.startswith("jointseg, input 3x32x32 (--input-size)")


def test_cli_profiles_a_config_at_its_crop_and_names_the_members(tmp_path, capsys) -> None:
    """A config is costed at its own crop (not 512x512), a pair titled by its members."""
    import json

    import yaml

    from coopseg.cli import main

    from .conftest import tiny_cooperative

    model = tiny_cooperative("cross")
    model["members"][1] = {**model["members"][1], "backbone": "resnet34", "name": "right"}
    config = tmp_path / "pair.yaml"
    config.write_text(yaml.safe_dump({"model": model, "data": {"crop_size": [64, 48]}}))
    assert main(["profile", str(config), "--no-latency"]) == 0
    title = capsys.readouterr().out.splitlines()[0]
    assert title == (
        "cooperative cross: top deeplabv3plus (resnet18), right deeplabv3plus (resnet34), "
        "input 3x64x48 (data.crop_size)"
    )
    assert main(["profile", str(config), "--no-latency", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["input_size"] == [64, 48] and result["input_size_from"] == "data.crop_size"
    assert result["members"] == {
        "top": {"arch": "deeplabv3plus", "backbone": "resnet18"},
        "right": {"arch": "deeplabv3plus", "backbone": "resnet34"},
    }
    assert main(["profile", str(config), "--no-latency", "--json", "--input-size", "32", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["input_size"] == [32, 32]
