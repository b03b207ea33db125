"""``train.init_from``: whole-model initialisation from a coopseg checkpoint, read safely."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coopseg import create_model
from coopseg.config import Config, TrainConfig, config_from_dict
from coopseg.engine.checkpoint import (
    CheckpointError,
    init_model_from,
    save_training_state,
    save_weights,
)

SMALL = {"backbone": "resnet18", "aspp_channels": 16, "decoder_channels": 16}


def small(seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("deeplabv3plus", **{"num_classes": 3, **SMALL, **kwargs})


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], msg=key)


class Payload:  # anything a weights-only load must refuse to build
    pass


def test_config_key() -> None:
    assert TrainConfig().init_from is None
    cfg = config_from_dict({"train": {"init_from": "runs/a/checkpoints/best.safetensors"}})
    assert cfg.train.init_from == "runs/a/checkpoints/best.safetensors"


def test_safetensors_and_pt_initialise_every_weight(tmp_path: Path) -> None:
    source = small(0)
    with torch.no_grad():  # non-default BN statistics must come along too
        source.decoder.conv1[1].running_mean.fill_(0.25)
    st = tmp_path / "best.safetensors"
    save_weights(st, source, Config())
    pt = tmp_path / "last.pt"
    save_training_state(pt, {"model": source.state_dict(), "iteration": 7})
    for path in (st, pt, str(st)):
        target = small(1)
        assert not torch.equal(target.classifier.weight, source.classifier.weight)
        init_model_from(target, path)
        assert_same_weights(target, source)


def test_frozen_bn_model_takes_a_checkpoint_of_the_trained_one(tmp_path: Path) -> None:
    source = small(0)
    path = tmp_path / "best.safetensors"
    save_weights(path, source, Config())
    target = small(1, freeze_bn=True)  # FrozenBatchNorm2d has no num_batches_tracked
    init_model_from(target, path)
    torch.testing.assert_close(
        target.aspp.project[0][1].running_var, source.aspp.project[0][1].running_var
    )


def _one_line_refusal(model: torch.nn.Module, path: Path, match: str) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=match) as info:
        init_model_from(model, path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for key, value in model.state_dict().items():  # refused before anything was copied
        assert torch.equal(value, before[key]), key


def test_missing_file_is_refused(tmp_path: Path) -> None:
    _one_line_refusal(small(0), tmp_path / "nope.safetensors", "no checkpoint there")


def test_other_architecture_is_refused_naming_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "dfdam.safetensors"
    save_weights(path, create_model("dfdam", backbone="resnet18", num_classes=3), Config())
    _one_line_refusal(small(0), path, r"missing aspp\..*unexpected .*in all")


def test_shape_mismatch_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "classes5.safetensors"
    save_weights(path, small(0, num_classes=5), Config())
    _one_line_refusal(small(1), path, r"classifier\.weight \(5, 16, 1, 1\) in the file, \(3, 16")


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": small(0).state_dict(), "extra": Payload()}, path)
    _one_line_refusal(small(1), path, "refused to load")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    _one_line_refusal(small(1), junk, "unreadable checkpoint")
