"""Samplers that make data order a pure function of (seed, epoch, rank, position).

``ResumableSampler`` (training) is DistributedSampler with two additions needed for exact
resume: it can start part-way into an epoch, and it yields ``(index, sample_seed)`` so each
sample's augmentation does not depend on which loader worker draws it.
``ShardSampler`` (evaluation) splits the val set across ranks without padding, so all-reduced
metrics count every image exactly once whatever the world size.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.n, self.rank, self.world_size, self.seed, self.shuffle = num_samples, rank, world_size, seed, shuffle
        self.per_rank = num_samples // world_size  # drop the tail so every rank takes the same number of steps
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        """Select the epoch's permutation and skip its first ``start`` samples of this rank."""
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.per_rank - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        sample_seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
        for i in mine[self.start :].tolist():
            yield i, int(sample_seeds[i])


class ShardSampler(Sampler):
    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
