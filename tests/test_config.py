"""Configs: unknown keys and bad values are errors that name the key and the file."""

from __future__ import annotations

import pytest

from coopseg.cli import main, resolve_config_path
from coopseg.config import Config, ConfigError, config_from_dict, load_config, parse_overrides


def test_defaults_and_overrides() -> None:
    cfg = config_from_dict(
        {}, ["train.lr=0.5", "model.backbone=resnet50", "data.crop_size=[32, 64]"]
    )
    assert cfg.train.lr == 0.5
    assert cfg.model == {"arch": "deeplabv3plus", "backbone": "resnet50"}
    assert cfg.data.crop_size == [32, 64]
    assert isinstance(cfg, Config)


def test_int_is_accepted_for_float_but_not_the_reverse() -> None:
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"train.iterations: expected an integer, got 1.5"):
        config_from_dict({"train": {"iterations": 1.5}})
    with pytest.raises(ConfigError, match=r"data.hflip: expected true or false"):
        config_from_dict({"data": {"hflip": "yes"}})


def test_unknown_keys_are_named(tmp_path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 0.1\n  lerning_rate: 0.2\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: unknown config key train.lerning_rate"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown config key colour"):
        config_from_dict({"colour": 1})
    with pytest.raises(ConfigError, match="unknown config key model.backbon for architecture"):
        config_from_dict({"model": {"arch": "deeplabv3plus", "backbon": "resnet18"}})
    with pytest.raises(ConfigError, match="model.arch: unknown architecture 'unet3'"):
        config_from_dict({"model": {"arch": "unet3"}})


def test_values_outside_their_choices_are_named() -> None:
    with pytest.raises(ConfigError, match="train.amp: expected one of"):
        config_from_dict({"train": {"amp": "half"}})
    with pytest.raises(ConfigError, match="train.optimizer: expected one of .*'adam'"):
        config_from_dict({}, ["train.optimizer=adam"])


def test_bad_yaml_and_missing_file_are_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_overrides(["train.lr"])
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_packaged_demo_config_is_valid_and_found_by_name() -> None:
    path = resolve_config_path("demo")
    cfg = load_config(path)
    assert cfg.name == "demo" and cfg.model["num_classes"] == 11


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  batchsize: 4\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key data.batchsize" in err and "exp.yaml" in err
