"""Samplers that make data order a pure function of (seed, epoch, rank, position).

``ResumableSampler`` (training) is DistributedSampler with two additions needed for exact
resume: it can start part-way into an epoch, and it yields ``(index, sample_seed)`` so each
sample's augmentation does not depend on which loader worker draws it. Rank r takes positions
r, r + W, ... of one global order, so ``start`` samples per rank are the first ``start * W`` of
that order whatever W is: a run resumed at another world size continues after them.
``ChunkWindowSampler`` keeps that contract over records stored in chunk files (data=shards): its global
order visits the chunks in a random order, a window of chunks at a time, in runs of a few consecutive
records of one chunk, and each optimizer step's share of a rank is a contiguous block of the order, so a
batch touches a few chunk files whatever the number of ranks and loader workers.
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
        for i in self.positions(order)[self.start :].tolist():
            yield i, int(sample_seeds[i])

    def positions(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's part of the global order: positions rank, rank + W, ..."""
        return order[: self.per_rank * self.world_size][self.rank :: self.world_size]


def window_order(chunk_sizes, window: int, g: torch.Generator, run: int = 1) -> torch.Tensor:
    """Record indices (chunk by chunk, as stored) in a random chunk order, ``window`` chunks at a time; within a
    window, each chunk's records are shuffled and cut into runs of ``run`` records, and the window's runs are
    shuffled together."""
    sizes = torch.as_tensor([int(s) for s in chunk_sizes], dtype=torch.int64)
    starts, run = torch.cumsum(sizes, 0) - sizes, max(1, int(run))
    chunks = torch.randperm(len(sizes), generator=g).tolist()
    parts = []
    for w in range(0, len(chunks), max(1, window)):
        cs = chunks[w : w + window]
        ids = torch.cat([starts[c] + torch.randperm(int(sizes[c]), generator=g) for c in cs])
        within = torch.cat([torch.arange(int(sizes[c])) for c in cs])
        runs = torch.tensor([(int(sizes[c]) + run - 1) // run for c in cs])
        run_of = torch.repeat_interleave(torch.cumsum(runs, 0) - runs, sizes[cs]) + within // run
        place = torch.empty(int(runs.sum()), dtype=torch.int64)
        place[torch.randperm(len(place), generator=g)] = torch.arange(len(place))
        parts.append(ids[torch.argsort(place[run_of] * run + within % run)])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


class ChunkWindowSampler(ResumableSampler):
    """ResumableSampler over chunks of ``chunk_sizes`` records, with :func:`window_order` as the global order and
    ranks taking contiguous blocks: ``step_samples`` (batch size x accumulation steps) positions per rank per
    optimizer step, the step's W blocks side by side; the records left after the last whole step are split the
    same way. A step still consumes the next W x ``step_samples`` positions of the order, so ``start`` keeps its
    meaning at any world size."""

    def __init__(self, chunk_sizes, rank: int = 0, world_size: int = 1, seed: int = 0, window: int = 8, run: int = 32,
                 step_samples: int = 1):
        self.chunk_sizes, self.window, self.run = [int(s) for s in chunk_sizes], int(window), int(run)
        self.step_samples = max(1, int(step_samples))
        super().__init__(sum(self.chunk_sizes), rank, world_size, seed, shuffle=True)

    def global_order(self, g: torch.Generator) -> torch.Tensor:
        return window_order(self.chunk_sizes, self.window, g, self.run)

    def positions(self, order: torch.Tensor) -> torch.Tensor:
        w, r, b = self.world_size, self.rank, self.step_samples
        steps = self.n // (w * b)
        head = order[: steps * w * b].view(steps, w, b)[:, r].reshape(-1)
        tail = (self.n - steps * w * b) // w
        return torch.cat([head, order[steps * w * b + r * tail : steps * w * b + (r + 1) * tail]])


class ShardSampler(Sampler):
    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
