"""A data set decoded once: `fastgan prepare` writes the validated images as uint8 pixels, already resized and
centre-cropped as the tutorial does, and `fastgan train --data FILE` holds them in memory (GPU memory on CUDA),
so that a batch costs one gather and one conversion instead of a JPEG decode per image.

File format (.fgd): the magic b"FASTGAN-DATA\\n", a little-endian uint64 with the manifest's length, the
manifest (UTF-8 JSON: source root, count, image size, channels, layout NHWC, the skipped files, the SHA-256
of the pixels), zero padding to a multiple of 64 bytes, then count * size * size * channels uint8 pixels.
A truncated or altered file fails its size or checksum test and is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .errors import FastganError
from .files import FileIndex, default_workers, load_image
from .pipeline_torch import epoch_permutation, image_transform, no_full_batch, rank_order

MAGIC = b"FASTGAN-DATA\n"
FORMAT_VERSION = 1
ALIGN = 64


def _pixels(job: tuple[str, int, int]) -> np.ndarray:
    """One image as the torch loader sees it before ToTensor: resized, centre-cropped, uint8 HWC."""
    path, image_size, nc = job
    crop = image_transform(image_size, nc).transforms[:2]  # Resize, CenterCrop: the tutorial's geometry
    image = load_image(path, nc)
    for transform in crop:
        image = transform(image)
    return np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, nc)


def decode_with_pil(paths, pixels: np.ndarray, image_size: int, nc: int, workers: int, progress) -> None:
    """Fill `pixels` with the images, decoded by PIL in `workers` processes: the torch loader's exact pixels."""
    jobs = [(str(p), image_size, nc) for p in paths]
    executor = ProcessPoolExecutor(workers) if workers > 1 and len(jobs) >= 64 else None
    try:
        results = (executor.map(_pixels, jobs, chunksize=max(1, min(256, len(jobs) // (8 * workers))))
                   if executor else map(_pixels, jobs))
        for i, image in enumerate(results):
            pixels[i] = image
            if progress:
                progress(1)
    finally:
        if executor:
            executor.shutdown(cancel_futures=True)


def prepare(index: FileIndex, out: str | os.PathLike, image_size: int, nc: int, workers: Optional[int] = None,
            progress: Optional[Callable[[int], None]] = None, decoder: str = "pil") -> Path:
    """Decode every good file of `index` once and write them to `out` (which must not exist yet).

    decoder: "pil" (all cores; the torch loader's exact pixels), or DALI's "mixed" (GPU) or "cpu" decoder,
    whose resize filter differs from PIL's by a few levels (see pipeline_dali); give DALI an index already
    passed through readable_by_dali."""
    out = Path(out).expanduser()
    if out.exists():
        raise FastganError(f"{out} already exists; choose another --out (fastgan overwrites nothing)")
    count = len(index.good)
    workers = default_workers() if workers is None else workers
    pixels = np.empty((count, image_size, image_size, nc), dtype=np.uint8)
    if decoder == "pil":
        decode_with_pil(index.good, pixels, image_size, nc, workers, progress)
    else:
        from .pipeline_dali import decode_all
        done = 0
        for batch in decode_all(index.good, image_size, nc, decoder, threads=workers):
            pixels[done:done + len(batch)] = batch.numpy()
            done += len(batch)
            if progress:
                progress(len(batch))
    manifest = {
        "format": "fastgan-data", "version": FORMAT_VERSION, "source_root": str(index.root), "count": count,
        "image_size": image_size, "nc": nc, "layout": "NHWC", "dtype": "uint8",
        "decoder": {"pil": "PIL", "cpu": "DALI (CPU)", "mixed": "DALI (GPU)"}[decoder],
        "skipped": [[str(p), reason] for p, reason in index.bad],
        "sha256": hashlib.sha256(pixels.data).hexdigest(), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    header = json.dumps(manifest).encode()
    head = MAGIC + struct.pack("<Q", len(header)) + header
    head += b"\0" * (-len(head) % ALIGN)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(pixels.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def read_manifest(path: str | os.PathLike) -> tuple[dict, int]:
    """(manifest, offset of the pixels); FastganError for anything that is not a whole .fgd file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FastganError(f"--data {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise FastganError(f"--data {path} is not a fastgan prepared data file (make one with fastgan prepare)")
        try:
            (length,) = struct.unpack("<Q", f.read(8))
            manifest = json.loads(f.read(length))
        except (struct.error, ValueError):
            raise FastganError(f"--data {path} has a damaged header; prepare it again") from None
    if manifest.get("version") != FORMAT_VERSION:
        raise FastganError(f"--data {path} is format version {manifest.get('version')}; this fastgan reads "
                           f"version {FORMAT_VERSION}: prepare it again")
    offset = len(MAGIC) + 8 + length
    offset += -offset % ALIGN
    expected = offset + manifest["count"] * manifest["image_size"] ** 2 * manifest["nc"]
    actual = path.stat().st_size
    if actual != expected:
        raise FastganError(f"--data {path} is {'truncated' if actual < expected else 'too long'} "
                           f"({actual:,} bytes, expected {expected:,}); prepare it again")
    return manifest, offset


def load_pixels(path: str | os.PathLike, image_size: int, nc: int) -> tuple[torch.Tensor, dict]:
    """The pixels (N, S, S, C) uint8 on the CPU, after checking shape against the model and the checksum."""
    manifest, offset = read_manifest(path)
    if (manifest["image_size"], manifest["nc"]) != (image_size, nc):
        raise FastganError(f"--data {path} holds {manifest['image_size']}x{manifest['image_size']} images with "
                           f"{manifest['nc']} channel(s); the model wants {image_size}x{image_size} with {nc}: "
                           "pass matching --image-size/--nc, or prepare the data again")
    count = manifest["count"]
    pixels = np.fromfile(path, dtype=np.uint8, offset=offset).reshape(count, image_size, image_size, nc)
    if hashlib.sha256(pixels.data).hexdigest() != manifest["sha256"]:
        raise FastganError(f"--data {path} fails its checksum (altered or damaged); prepare it again")
    return torch.from_numpy(pixels), manifest


class PreparedLoader:
    """Batches gathered from images held on `device`: one index gather and one conversion per batch.

    Each epoch follows `epoch_permutation(n, seed, epoch)`, the order of the other loaders, so the same seed
    trains on the same batches whichever loader decoded them; `mirror` flips a random half of each epoch's
    images horizontally (from the same seed)."""

    name = "prepared"

    def __init__(self, pixels: torch.Tensor, batch_size: int, device: torch.device, channels_last: bool = False,
                 seed: int = 0, mirror: bool = False, rank: int = 0, world_size: int = 1):
        self.device = torch.device(device)
        # NHWC uint8 on the device: the whole of CelebA at 64x64 is 2.5 GB (every rank holds all of it, since
        # each epoch reshuffles the whole set across the ranks)
        self.pixels = pixels.to(self.device)
        self.batch_size, self.channels_last, self.seed, self.mirror = batch_size, channels_last, seed, mirror
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.steps = len(pixels) // (batch_size * world_size)
        if self.steps < 1:
            raise no_full_batch(len(pixels), "prepared images", batch_size, world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch to read next, from its batch `start` on (0 unless resuming in the middle of it)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = rank_order(len(self.pixels), self.seed, self.epoch, self.batch_size, self.rank,
                           self.world_size).to(self.device)
        if self.mirror:
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, 1])
                                                          .generate_state(1)[0]))
            flips = (torch.rand(len(self.pixels), generator=generator) < 0.5).to(self.device)
        for i in range(self.start, self.steps):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            batch = self.pixels[idx].permute(0, 3, 1, 2)  # NCHW view of NHWC: channels_last memory
            # x / 127.5 - 1 is ToTensor's x / 255 followed by Normalize(0.5, 0.5)
            batch = batch.float().div_(127.5).sub_(1)
            if self.mirror:
                batch = torch.where(flips[idx].view(-1, 1, 1, 1), batch.flip(3), batch)
            yield batch.contiguous(memory_format=self.memory_format)  # a no-op when already in that format

    def preview(self, count: int) -> torch.Tensor:
        """The first `count` images of the first epoch, as batches carry them (for samples/real.png)."""
        order = epoch_permutation(len(self.pixels), self.seed, 0)[:count].to(self.device)
        return self.pixels[order].permute(0, 3, 1, 2).float().div(127.5).sub(1)
