"""Training data for the loop: the dataset from the flags, and a deterministic batch order.

:class:`ShardedBatchSampler` makes every run's batch order a pure function of
``(seed, epoch)``: a permutation of the samples is cut into *global* batches of
``batch_size x world_size``, and rank ``r`` takes the ``r``-th contiguous slice of each. So
W ranks at batch B see, together and in the same order, exactly the samples one process at
batch W*B sees (gathering the ranks' batches in rank order gives the single process's batch),
and a resumed run continues mid-epoch with the batches the interrupted run would have had.
The horizontal flips are drawn in the same stream, per position, so they do not depend on
the number of ranks or data-loading workers either.

The trainer loads uint8 images (:mod:`hfsoftmax.engine.gpu_data`: flips and normalisation
on the device); :class:`FlipDataset` is the float32 path (torchvision transforms in the
workers), kept for the data benchmark's comparison with the earlier loader.

>>> sampler = ShardedBatchSampler(len(ds), batch_size=128, rank=0, world_size=1, seed=0)
>>> sampler.set_epoch(3, start_batch=20)        # resume: skip the 20 batches already done
>>> loader = DataLoader(FlipDataset(ds), batch_sampler=sampler, num_workers=2)
"""
from __future__ import annotations

import argparse
from typing import Iterator

import numpy as np
import torch

__all__ = ["ShardedBatchSampler", "FlipDataset"]


class ShardedBatchSampler:
    """Batches of ``(index, flip)`` pairs for this rank; incomplete global batches dropped."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, flip: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global "
                             f"batch ({batch_size} x {world_size} processes = {global_batch});"
                             " lower --batch-size")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle, self.flip = int(seed), bool(shuffle), bool(flip)
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        """Steps in one epoch (the same on every rank)."""
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; ``start_batch`` skips batches already trained on."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got "
                             f"{start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's permutation of sample indices and the flip of each position."""
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        flips = rng.random(self.num_samples) < 0.5 if self.flip else \
            np.zeros(self.num_samples, dtype=bool)
        return perm, flips

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        perm, flips = self.order(self.epoch)
        g, b = self.batch_size * self.world_size, self.batch_size
        for i in range(self.start_batch, self.batches_per_epoch):
            lo = i * g + self.rank * b
            yield [(int(perm[p]), bool(flips[p])) for p in range(lo, lo + b)]


class FlipDataset(torch.utils.data.Dataset):
    """Wraps an ``(image tensor CHW, label)`` dataset; items are fetched by ``(index, flip)``."""

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, bool]):
        index, flip = item
        image, label = self.base[index]
        if flip:
            image = torch.flip(image, dims=(-1,))
        return image, label
