"""Random scale from a discrete set (``data.scale_set``, the DF-DAM paper's recipe)."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from coopseg.config import ConfigError, DataConfig, config_from_dict, load_config
from coopseg.data import train_transform
from coopseg.data.transforms import RandomScale

DFDAM_SET = [0.75, 1.0, 1.25, 1.5, 1.75, 2.0]  # paper section 4.1


def _scaled_heights(transform: RandomScale, draws: int, side: int = 40) -> list[int]:
    image = tv_tensors.Image(torch.zeros(3, side, side, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(side, side, dtype=torch.uint8))
    torch.manual_seed(0)
    heights = []
    for _ in range(draws):
        x, y = transform(image, mask)
        assert x.shape[-2:] == y.shape[-2:]
        heights.append(x.shape[-2])
    return heights


def test_scales_are_drawn_only_from_the_set() -> None:
    heights = _scaled_heights(RandomScale([0.5, 2.0], scale_set=DFDAM_SET), 300)
    allowed = {round(40 * s) for s in DFDAM_SET}  # 30, 40, 50, 60, 70, 80
    assert set(heights) == allowed  # nothing else, and every member is drawn
    # the continuous range over the same span gives in-between sizes
    continuous = set(_scaled_heights(RandomScale([0.75, 2.0]), 300))
    assert continuous - allowed


def test_train_transform_uses_the_set_and_skips_a_set_of_one() -> None:
    tf = train_transform([16, 16], [0.5, 2.0], True, [0.5] * 3, [0.5] * 3, scale_set=[0.5, 2.0])
    (scale,) = [t for t in tf.transforms if isinstance(t, RandomScale)]
    assert scale.scale_set == [0.5, 2.0]
    identity = train_transform([16, 16], [0.5, 2.0], True, [0.5] * 3, [0.5] * 3, scale_set=[1])
    assert not any(isinstance(t, RandomScale) for t in identity.transforms)
    with pytest.raises(ValueError, match="data.scale_set"):
        RandomScale([0.5, 2.0], scale_set=[])


def test_config_key_is_checked() -> None:
    assert DataConfig().scale_set is None  # default: the continuous data.scale_range
    cfg = config_from_dict({"data": {"scale_set": [0.75, 1, 2]}})
    assert cfg.data.scale_set == [0.75, 1.0, 2.0]
    with pytest.raises(ConfigError, match="data.scale_set"):
        config_from_dict({"data": {"scale_set": []}})
    with pytest.raises(ConfigError, match=r"data.scale_set\[1\]"):
        config_from_dict({"data": {"scale_set": [1.0, 0.0]}})


@pytest.mark.parametrize("name", ["base-dfdam-voc", "base-dfdam-cityscapes"])
def test_dfdam_configs_use_the_papers_set(name: str) -> None:
    from coopseg.config import PACKAGED_CONFIGS

    cfg = load_config(PACKAGED_CONFIGS / f"{name}.yaml")
    assert cfg.data.scale_set == DFDAM_SET
