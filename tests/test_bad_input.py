"""Bad input is one line naming the key (and the value, and --set when it came from one)."""

from __future__ import annotations

import re

import pytest

from coopseg.cli import main, resolve_config_path
from coopseg.config import ConfigError, OverrideError, config_from_dict, load_config, yaml_load


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 1e-3), ("1E+4", 1e4), (".5e-2", 0.005), ("-2e5", -2e5), ("1.0e3", 1e3)],
)
def test_exponent_floats_are_numbers(text, value) -> None:
    assert yaml_load(f"x: {text}") == {"x": value}


def test_exponent_lr_is_accepted_in_files_and_overrides(tmp_path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("base: demo\ntrain:\n  lr: 1e-3\n  weight_decay: 5E-4\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1e-3 and cfg.train.weight_decay == 5e-4
    assert load_config(resolve_config_path("demo"), ["train.lr=2e-3"]).train.lr == 2e-3
    # strings that merely look a bit like numbers stay strings
    assert yaml_load("[1e, e5, 1e-3x]") == ["1e", "e5", "1e-3x"]


def test_an_override_error_names_the_override_not_the_file(tmp_path) -> None:
    demo = resolve_config_path("demo")
    with pytest.raises(OverrideError) as info:
        load_config(demo, ["data.batch_size=4", "train.lr=abc"])
    message = str(info.value)
    assert message == "--set train.lr=abc: train.lr: expected a number, got 'abc'"
    # an error of the file itself still names the file, even with overrides given
    path = tmp_path / "exp.yaml"
    path.write_text("base: demo\ntrain:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: train.lr: ") as info:
        load_config(path, ["data.batch_size=4"])
    assert not isinstance(info.value, OverrideError)
    # ... unless an override replaces the bad value
    assert load_config(path, ["train.lr=0.1"]).train.lr == 0.1
    # an override that only fails together with an earlier one is named
    with pytest.raises(OverrideError, match=r"^--set train.momentum=0: train.nesterov"):
        config_from_dict({}, ["train.nesterov=true", "train.momentum=0"])


@pytest.mark.parametrize(
    ("override", "key", "got"),
    [
        ("data.batch_size=0", "data.batch_size", "0"),
        ("data.val_batch_size=0", "data.val_batch_size", "0"),
        ("data.num_workers=-1", "data.num_workers", "-1"),
        ("data.val_ratio=1", "data.val_ratio", "1.0"),
        ("data.scene_size=0", "data.scene_size", "0"),
        ("data.train_scenes=0", "data.train_scenes", "0"),
        ("data.val_scenes=0", "data.val_scenes", "0"),
        ("data.std=[0.2, 0, 0.2]", "data.std[1]", "0.0"),
        ("data.mean=[0.5, 0.5]", "data.mean", "[0.5, 0.5]"),
        ("data.crop_size=[0, 64]", "data.crop_size", "[0, 64]"),
        ("data.scale_range=[1.5, 0.5]", "data.scale_range", "[1.5, 0.5]"),
        ("data.scale_range=[0, 1]", "data.scale_range[0]", "0.0"),
        ("train.lr=-1", "train.lr", "-1.0"),
        ("train.lr=0", "train.lr", "0.0"),
        ("train.lr=.nan", "train.lr", "nan"),
        ("train.iterations=0", "train.iterations", "0"),
        ("train.momentum=1", "train.momentum", "1.0"),
        ("train.weight_decay=-1e-4", "train.weight_decay", "-0.0001"),
        ("train.poly_power=-0.9", "train.poly_power", "-0.9"),
        ("train.val_interval=-1", "train.val_interval", "-1"),
        ("train.checkpoint_interval=-1", "train.checkpoint_interval", "-1"),
        ("train.log_interval=0", "train.log_interval", "0"),
        ("train.max_time_s=-5", "train.max_time_s", "-5.0"),
        ("train.aux_weights={aux: -1}", "train.aux_weights.aux", "-1.0"),
        ("eval.scales=[1, 0]", "eval.scales[1]", "0.0"),
        ("joint.cls_lr_ratio=0", "joint.cls_lr_ratio", "0.0"),
        ("joint.cls_batch_ratio=0", "joint.cls_batch_ratio", "0"),
        ("joint.cls_label_noise=1.5", "joint.cls_label_noise", "1.5"),
        ("seed=-1", "seed", "-1"),
    ],
)
def test_out_of_range_values_are_named_with_key_and_value(override, key, got) -> None:
    with pytest.raises(OverrideError) as info:
        config_from_dict({}, [override])
    message = str(info.value)
    assert message.startswith(f"--set {override}: {key}: expected ")
    assert message.endswith(f"got {got}") and "\n" not in message


def test_edge_values_inside_the_ranges_are_accepted() -> None:
    cfg = config_from_dict(
        {},
        [
            "train.val_interval=0",
            "train.checkpoint_interval=0",
            "train.max_time_s=0",
            "train.momentum=0",
            "train.weight_decay=0",
            "joint.cls_label_noise=1",
            "data.num_workers=0",
        ],
    )
    assert cfg.train.val_interval == 0 and cfg.joint.cls_label_noise == 1.0


@pytest.mark.parametrize(
    ("override", "key"),
    [("data.batch_size=0", "data.batch_size"), ("train.lr=-1", "train.lr")],
)
def test_cli_reports_a_bad_override_in_one_line(override, key, capsys) -> None:
    assert main(["train", "demo", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"coopseg: error: --set {override}: {key}: expected")
    assert "demo.yaml" not in err


@pytest.mark.parametrize(
    ("flag", "value", "name"),
    [
        ("--size", "0", "size"),
        ("--train", "0", "train"),
        ("--val", "0", "val"),
        ("--seed", "-1", "seed"),
    ],
)
def test_cli_fashionscenes_bad_numbers_are_one_line(tmp_path, capsys, flag, value, name) -> None:
    out = tmp_path / "fs"
    assert main(["data", "fashionscenes", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"FashionScenes {name} ({flag}," in err and f"got {value}" in err
    assert not out.exists()


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("coopseg: error: ")
    return err


def test_cuda_without_cuda_is_one_line(make_config, tmp_path, monkeypatch, capsys) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tmp_path / "tiny.yaml"
    config.write_text(make_config(name="gpu").to_yaml())
    assert main(["train", str(config), "--device", "cuda"]) == 2
    assert "device 'cuda': CUDA is not available on this machine" in _one_line(capsys)
    assert main(["train", str(config), "--device", "cuda:1"]) == 2
    assert "device 'cuda:1': CUDA is not available" in _one_line(capsys)
    assert main(["train", str(config), "--device", "tpu"]) == 2
    assert "device 'tpu': expected auto, cpu, cuda or cuda:N" in _one_line(capsys)


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory):
    import numpy as np
    import torch
    from PIL import Image

    from coopseg.config import model_kwargs
    from coopseg.engine.checkpoint import save_weights
    from coopseg.models import create_model

    folder = tmp_path_factory.mktemp("scales")
    cfg = config_from_dict({"model": {"arch": "unet", "base_channels": 4, "num_classes": 3}})
    arch, kwargs = model_kwargs(cfg.model)
    torch.manual_seed(0)
    path = folder / "unet.safetensors"
    save_weights(path, create_model(arch, **kwargs), cfg, {"palette": [[0, 0, 0]] * 3})
    image = folder / "x.png"
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(image)
    return path, image


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--scales", "0"], "--scales 0: each scale must be a number > 0, got 0"),
        (["--scales", "1", "-1"], "--scales 1 -1: each scale must be a number > 0, got -1"),
        (["--slide", "0", "16"], "--slide 0 16: height and width must be positive"),
        (["--slide", "16", "16", "--stride", "-4", "8"], "--stride -4 8: height and width"),
    ],
)
def test_predict_and_eval_refuse_non_positive_scales_and_windows(
    unet_checkpoint, tmp_path, capsys, options, expected
) -> None:
    ckpt, image = unet_checkpoint
    out = tmp_path / "out"
    assert (
        main(["predict", str(image), "--checkpoint", str(ckpt), "--out", str(out), *options]) == 2
    )
    assert expected in _one_line(capsys)
    assert not out.exists()  # nothing written
    assert main(["eval", "--checkpoint", str(ckpt), *options]) == 2
    assert expected in _one_line(capsys)


def test_an_empty_config_file_is_said_to_be_empty(tmp_path, capsys) -> None:
    for text in ("", "# only a comment\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        assert main(["train", str(path)]) == 2
        err = _one_line(capsys)
        assert f"{path}: the file is empty (no config keys)" in err and "num_classes" not in err
    base = tmp_path / "child.yaml"
    base.write_text("base: empty.yaml\n")  # an empty base is named too
    with pytest.raises(ConfigError, match=r"empty\.yaml: the file is empty"):
        load_config(base)
