"""The torchvision loader: the tutorial's transform in DataLoader worker processes. The CPU fallback and the
baseline the faster loaders are measured against.

It follows the loader contract every fastgan loader shares: iterate fixed-size batches of [-1, 1] images,
NCHW (channels_last memory when asked), on the training device; the last incomplete batch is dropped.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from .files import load_image


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


class EpochShuffle(Sampler[int]):
    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_permutation(self.n, self.seed, self.epoch).tolist())


class TorchLoader:
    """Batches of [-1, 1] images on `device`, decoded by `workers` processes (0: in this process)."""

    name = "torch"

    def __init__(self, paths: Sequence, image_size: int, nc: int, batch_size: int, device: torch.device,
                 channels_last: bool = False, workers: int = 0, seed: int = 0):
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.sampler = EpochShuffle(len(paths), seed)
        pinned = self.device.type == "cuda"
        self.loader = DataLoader(
            ImageFiles(paths, image_size, nc), batch_size=batch_size, sampler=self.sampler, drop_last=True,
            num_workers=workers, pin_memory=pinned, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None)
        self.non_blocking = pinned  # pinned host memory makes the copy asynchronous

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.loader:
            yield batch.to(self.device, non_blocking=self.non_blocking, memory_format=self.memory_format)
