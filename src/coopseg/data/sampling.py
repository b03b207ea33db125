"""Iteration-indexed sampling: batch ``t`` is a pure function of ``(seed, t)``.

That makes resume trivial (start the sampler at the saved iteration) and makes a
DDP run see the same global batches as a single process: global batch ``t`` is a
slice of the epoch's permutation, and rank ``r`` takes every ``world``-th sample.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + index * 7_919 + 17) % (2**62)


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of ``(index, augmentation seed)`` keys for one rank."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_iteration: int = 0,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(
                f"data.batch_size={global_batch} is not divisible by the {world_size} processes"
            )
        if num_samples < global_batch:
            raise ValueError(
                f"the training set has {num_samples} samples, fewer than one batch "
                f"(data.batch_size={global_batch})"
            )
        self.num_samples, self.global_batch = num_samples, global_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_iteration = start_iteration
        self.steps_per_epoch = num_samples // global_batch

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        it = self.start_iteration
        epoch, perm = -1, None
        while True:
            e, step = divmod(it, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self._permutation(e)
            batch = perm[step * self.global_batch : (step + 1) * self.global_batch]
            local = batch[self.rank :: self.world_size].tolist()
            yield [(i, sample_seed(self.seed, epoch, i)) for i in local]
            it += 1


def shard_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Evaluation shard without padding, so no sample is counted twice."""
    return list(range(rank, num_samples, world_size))
