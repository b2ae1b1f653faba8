"""Samplers that make data order a pure function of (seed, epoch, rank, position).

``ResumableSampler`` (training) is DistributedSampler with two additions needed for exact
resume: it can start part-way into an epoch, and it yields ``(index, sample_seed)`` so each
sample's augmentation does not depend on which loader worker draws it. Rank r takes positions
r, r + W, ... of one global order, so ``start`` samples per rank are the first ``start * W`` of
that order whatever W is: a run resumed at another world size continues after them.
``ChunkWindowSampler`` is the same over records stored in chunk files (data=shards): its global
order visits the chunks in a random order, a window of chunks at a time, shuffling the records
within each window, so every reader keeps a few chunk files open instead of opening one per sample.
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

    def global_order(self, g: torch.Generator) -> torch.Tensor:
        """The epoch's order of all sample indices, drawn from ``g``."""
        return torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = self.global_order(g)
        sample_seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
        for i in mine[self.start :].tolist():
            yield i, int(sample_seeds[i])


def window_order(chunk_sizes, window: int, g: torch.Generator) -> torch.Tensor:
    """Record indices (chunk by chunk, as stored) in a random chunk order, ``window`` chunks at a time, the
    records of each window shuffled together."""
    sizes = torch.as_tensor(list(chunk_sizes), dtype=torch.int64)
    starts = torch.cumsum(sizes, 0) - sizes
    chunks = torch.randperm(len(sizes), generator=g)
    parts = []
    for w in range(0, len(chunks), max(1, window)):
        ids = torch.cat([torch.arange(int(starts[c]), int(starts[c] + sizes[c])) for c in chunks[w : w + window]])
        parts.append(ids[torch.randperm(len(ids), generator=g)])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


class ChunkWindowSampler(ResumableSampler):
    """ResumableSampler whose global order is :func:`window_order` over chunks of ``chunk_sizes`` records."""

    def __init__(self, chunk_sizes, rank: int = 0, world_size: int = 1, seed: int = 0, window: int = 8):
        self.chunk_sizes, self.window = [int(s) for s in chunk_sizes], int(window)
        super().__init__(sum(self.chunk_sizes), rank, world_size, seed, shuffle=True)

    def global_order(self, g: torch.Generator) -> torch.Tensor:
        return window_order(self.chunk_sizes, self.window, g)


class ShardSampler(Sampler):
    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
