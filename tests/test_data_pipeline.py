"""The data interface's checks, the v2 augmentation pipeline and iteration-indexed sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coopseg.data import DataError, SeededAugmentation, SegmentationDataset, train_transform
from coopseg.data.sampling import TrainBatchSampler, shard_indices


class Pairs(SegmentationDataset):
    class_names = ("background", "thing", "stuff")
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], dtype=np.uint8)

    def __init__(self, pairs, transform=None) -> None:
        super().__init__(transform)
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index):
        return self.pairs[index]

    def describe(self, index) -> str:
        return f"images/{index:03d}.png"


def _pair(h=8, w=8, label=1):
    image = np.zeros((h, w, 3), dtype=np.uint8)
    mask = np.full((h, w), label, dtype=np.uint8)
    return image, mask


def test_mask_size_mismatch_names_the_file() -> None:
    image, _ = _pair(8, 8)
    data = Pairs([(image, np.zeros((8, 9), dtype=np.uint8))])
    with pytest.raises(
        DataError, match=r"images/000.png: mask size 9x8 differs from image size 8x8"
    ):
        data[0]


def test_label_out_of_range_names_the_values() -> None:
    data = Pairs([_pair(), _pair(label=7)])
    image, mask = data[0]
    assert image.shape == (3, 8, 8) and mask.dtype == torch.int64
    with pytest.raises(DataError, match=r"images/001.png: label values \[7\] are outside \[0, 3\)"):
        data[1]
    ignored = Pairs([_pair(label=255)])
    assert int(ignored[0][1].unique()) == 255  # the ignore index is allowed


def test_grayscale_image_is_refused() -> None:
    data = Pairs([(np.zeros((8, 8), dtype=np.uint8), np.zeros((8, 8), dtype=np.uint8))])
    with pytest.raises(DataError, match="must be RGB"):
        data[0]


def test_augmentation_keeps_image_and_mask_aligned_and_pads_with_ignore() -> None:
    rng = np.random.default_rng(0)
    mask = np.kron(rng.integers(0, 3, (4, 4)), np.ones((10, 10))).astype(np.uint8)  # blocks
    image = np.repeat(mask[..., None] * 80, 3, axis=2).astype(np.uint8)  # image encodes mask
    tf = train_transform([64, 64], [0.5, 2.0], True, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    data = SeededAugmentation(Pairs([(image, mask)], tf))
    saw_padding = False
    for seed in range(12):
        x, y = data[(0, seed)]
        assert x.shape == (3, 64, 64) and y.shape == (64, 64)
        labelled = y != 255
        decoded = (x[0] * 255 / 80).round().long()
        # image (bilinear) and mask (nearest) agree except along block edges
        agree = (decoded[labelled] == y[labelled]).float().mean()
        assert agree > 0.9, (seed, float(agree))
        assert set(y.unique().tolist()) <= {0, 1, 2, 255}
        saw_padding |= bool((~labelled).any())
    assert saw_padding  # scale 0.5 of 40 px < 64 px crop: padded with the ignore index


def test_augmentation_is_a_function_of_the_sample_seed() -> None:
    tf = train_transform([16, 16], [0.5, 2.0], True, [0.5] * 3, [0.5] * 3)
    rng = np.random.default_rng(1)
    pair = (rng.integers(0, 255, (20, 20, 3)).astype(np.uint8), np.zeros((20, 20), np.uint8))
    data = SeededAugmentation(Pairs([pair], tf))
    a = data[(0, 5)]
    torch.rand(100)  # global RNG use in between must not matter
    b = data[(0, 5)]
    c = data[(0, 6)]
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_sampler_ddp_shards_recompose_the_single_process_batches() -> None:
    single = iter(TrainBatchSampler(50, 8, seed=3))
    rank0 = iter(TrainBatchSampler(50, 8, seed=3, rank=0, world_size=2))
    rank1 = iter(TrainBatchSampler(50, 8, seed=3, rank=1, world_size=2))
    for _ in range(14):  # crosses two epoch boundaries (6 steps per epoch)
        whole, a, b = next(single), next(rank0), next(rank1)
        assert sorted(whole) == sorted(a + b) and len(a) == len(b) == 4


def test_sampler_resumes_at_any_iteration() -> None:
    full = iter(TrainBatchSampler(30, 4, seed=1))
    batches = [next(full) for _ in range(20)]
    resumed = iter(TrainBatchSampler(30, 4, seed=1, start_iteration=9))
    assert [next(resumed) for _ in range(11)] == batches[9:]
    epoch0 = {i for batch in batches[:7] for i, _ in batch}
    assert len(epoch0) == 28  # no repeats inside an epoch (7 steps x 4)


def test_sampler_errors_name_the_config_key() -> None:
    with pytest.raises(ValueError, match="data.batch_size=6 is not divisible by the 4 processes"):
        TrainBatchSampler(100, 6, world_size=4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        TrainBatchSampler(3, 4)


def test_eval_shards_cover_every_sample_once() -> None:
    shards = [shard_indices(11, r, 3) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))
