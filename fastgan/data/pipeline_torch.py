"""The torchvision loader: the tutorial's transform in DataLoader worker processes. The CPU fallback and the
baseline the faster loaders are measured against.

It follows the loader contract every fastgan loader shares: iterate fixed-size batches of [-1, 1] images,
NCHW (channels_last memory when asked), on the training device; the last incomplete batch is dropped.
"""
from __future__ import annotations

import functools
import os
import signal
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from ..errors import FastganError
from ..interrupt import STOP_SIGNALS
from .files import die_with_parent, load_image


def image_transform(image_size: int, nc: int) -> transforms.Compose:
    """The tutorial's transform: shorter side to image_size, centre crop, to [-1, 1]."""
    return transforms.Compose([
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * nc, [0.5] * nc),
    ])


class ImageFiles(Dataset):
    """Validated image files -> (nc, image_size, image_size) float tensors in [-1, 1]."""

    def __init__(self, paths: Sequence, image_size: int, nc: int):
        self.paths = [str(p) for p in paths]
        self.nc = nc
        self.transform = image_transform(image_size, nc)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i], self.nc))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """A fresh order of 0..n-1 for each epoch, a pure function of (seed, epoch) so that a resumed run sees
    the same orders as an uninterrupted one."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randperm(n, generator=generator)


def rank_order(n: int, seed: int, epoch: int, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The image indices one rank reads in an epoch, in step order: every loader's order.

    Step i's global batch is epoch_permutation(n, seed, epoch)[i*B:(i+1)*B] with B = batch_size * world_size,
    and rank r reads the r-th `batch_size` slice of it. So the ranks' shards are disjoint, reshuffled each
    epoch from the shared seed, and together they train on exactly the batches one process with batch size B
    would. The images left over after the last whole global batch are dropped, as drop_last does."""
    steps = n // (batch_size * world_size)
    order = epoch_permutation(n, seed, epoch)[: steps * batch_size * world_size]
    return order.view(steps, world_size, batch_size)[:, rank].reshape(-1)


def no_full_batch(count: int, what: str, batch_size: int, world_size: int) -> FastganError:
    """The one error of every loader whose images make no whole batch (batch_size: per rank)."""
    total = batch_size * world_size
    return FastganError(f"batch size {total} is larger than the {count:,} {what}; lower --batch-size")


class EpochShuffle(Sampler[int]):
    """A distributed sampler: this rank's `rank_order` for the epoch, from batch `start` on (a resumed epoch)."""

    def __init__(self, n: int, seed: int, batch_size: int = 1, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.batch_size, self.rank, self.world_size = n, seed, batch_size, rank, world_size
        self.steps = n // (batch_size * world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.steps - self.start) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        order = rank_order(self.n, self.seed, self.epoch, self.batch_size, self.rank, self.world_size)
        return iter(order[self.start * self.batch_size:].tolist())


def worker_start(parent: int, worker_id: int) -> None:
    """Each DataLoader worker, first: it dies with the training process, and it ignores the stop signals, which
    that process handles. A scheduler's SIGTERM (docker stop, systemd, Slurm) reaches the whole process group, and
    torch's own handler would end the worker at once; its parent would then fail on the lost worker instead of
    finishing its step and writing the checkpoint. The parent still ends its workers, through torch's queues."""
    die_with_parent(parent)
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class TorchLoader:
    """Batches of [-1, 1] images on `device`, decoded by `workers` processes (0: in this process).

    With world_size > 1 (torchrun), `batch_size` is this rank's share and the rank reads its shard
    (see rank_order)."""

    name = "torch"

    def __init__(self, paths: Sequence, image_size: int, nc: int, batch_size: int, device: torch.device,
                 channels_last: bool = False, workers: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.sampler = EpochShuffle(len(paths), seed, batch_size, rank, world_size)
        if self.sampler.steps < 1:
            raise no_full_batch(len(paths), "images", batch_size, world_size)
        pinned = self.device.type == "cuda"
        self.loader = DataLoader(
            ImageFiles(paths, image_size, nc), batch_size=batch_size, sampler=self.sampler, drop_last=True,
            num_workers=workers, pin_memory=pinned, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None, worker_init_fn=functools.partial(worker_start, os.getpid()))
        self.non_blocking = pinned  # pinned host memory makes the copy asynchronous

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch to read next, from its batch `start` on (0 unless resuming in the middle of it)."""
        self.sampler.set_epoch(epoch, start)

    def __len__(self) -> int:
        """Batches in a whole epoch, wherever set_epoch starts it."""
        return self.sampler.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.loader:
            yield batch.to(self.device, non_blocking=self.non_blocking, memory_format=self.memory_format)
