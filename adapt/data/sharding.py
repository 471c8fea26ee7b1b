"""Splitting data over DDP processes, in adapt's hands rather than Lightning's DistributedSampler.

Evaluation: each process reads a disjoint, unpadded share of a test set. The DistributedSampler
pads the shares to equal length with repeated images, which biases the accuracy; summing
correct / total across uneven shares (torchmetrics' sync) is exact.

Training: ``data.batch_size`` is the global batch, and each process reads its slice of every
global batch of one epoch order that all processes draw alike (``GlobalBatchShard``).
"""
from __future__ import annotations

import hashlib

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


# --------------------------------------------------------------------------- training
def epoch_seed(seed: int, epoch: int, what: str) -> int:
    """A generator seed for one epoch's draw: a pure function of (seed, epoch), so the order is
    the same in every process and after a resume."""
    digest = hashlib.blake2b(f"{seed}\0{epoch}\0{what}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


class EpochOrder(Sampler):
    """A fresh permutation of ``range(n)`` every epoch (Lightning calls ``set_epoch``), drawn from
    its own generator rather than the global one."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1  # advance when nobody calls set_epoch
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, "order"))
        return iter(torch.randperm(self.n, generator=g).tolist())


class GlobalBatchShard(Sampler):
    """This process's slice of every global batch of ``base``'s epoch order.

    ``data.batch_size`` is the global batch: each of ``world`` processes reads ``batch / world``
    items of every batch, so the gradient DDP averages is the one a single process computes on the
    whole batch, and every process sees every batch of the epoch (no image is lost to per-process
    ragged batches). With ``drop_ragged`` a last, incomplete global batch is dropped (as the CoOp
    protocol's loader does when there is more than one batch); a kept one is split as evenly as
    possible."""

    def __init__(self, base: Sampler, batch: int, rank: int = 0, world: int = 1, drop_ragged: bool = False):
        if batch % world:
            raise ValueError(global_batch_message(batch, world))
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.base, self.batch, self.rank, self.world, self.drop_ragged = base, batch, rank, world, drop_ragged

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def _slices(self, n: int) -> list[range]:
        full, rest = divmod(n, self.batch)
        per = self.batch // self.world
        out = [range(b * self.batch + self.rank * per, b * self.batch + (self.rank + 1) * per)
               for b in range(full)]
        if rest and not self.drop_ragged:
            lo, hi = (full * self.batch + rest * self.rank // self.world,
                      full * self.batch + rest * (self.rank + 1) // self.world)
            out.append(range(lo, hi))
        return out

    def __len__(self) -> int:
        return sum(len(r) for r in self._slices(len(self.base)))

    def __iter__(self):
        order = list(self.base)
        return iter([order[i] for r in self._slices(len(order)) for i in r])


def global_batch_message(batch: int, world: int) -> str:
    lower, upper = batch - batch % world, batch + world - batch % world
    return (f"data.batch_size={batch} is the global batch, split evenly over the {world} training "
            f"processes; it must be a multiple of {world} (e.g. data.batch_size={lower or upper} or "
            f"{upper})")


def train_loader(dataset, base: Sampler, batch: int, rank: int, world: int, **kwargs) -> DataLoader:
    """The training loader of one process (see ``GlobalBatchShard``)."""
    shard = GlobalBatchShard(base, batch, rank, world, drop_ragged=len(base) > batch)
    return DataLoader(dataset, batch_size=batch // world, sampler=shard, drop_last=False, **kwargs)


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
