"""Evaluation under DDP without padding: each process reads a disjoint, unpadded share of a test
set. Lightning's DistributedSampler pads the shares to equal length with repeated images, which
biases the accuracy; summing correct / total across uneven shares (torchmetrics' sync) is exact."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, rank + 2·world, ...`` of ``n`` items, in order."""

    def __init__(self, n: int, rank: int, world: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.n, self.rank, self.world = int(n), int(rank), int(world)

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def shard_loader(loader: DataLoader, rank: int, world: int) -> DataLoader:
    """``loader`` restricted to this process's share. Left whole when there is one process, or
    fewer items than processes (an empty share would skip the epoch-end sync and hang the rest:
    every process then reads everything, which is still exact)."""
    n = len(loader.dataset)
    if world <= 1 or n < world:
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=ShardSampler(n, rank, world),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=False,
                      persistent_workers=loader.num_workers > 0 and loader.persistent_workers)


class StreamSampler(Sampler):
    """All ``n`` indices in one order fixed by ``seed``: the test stream of an online method
    (TDA and DMN shuffle their test loader once; here the order is a function of the seed)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = int(n), int(seed)

    def order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randperm(self.n, generator=gen).tolist()

    def __iter__(self):
        return iter(self.order())

    def __len__(self) -> int:
        return self.n


def stream_loader(loader: DataLoader, seed: int) -> DataLoader:
    """``loader`` read whole, in the seeded order of ``StreamSampler``."""
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=StreamSampler(len(loader.dataset), seed),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=False,
                      persistent_workers=loader.num_workers > 0 and loader.persistent_workers)
