"""A data set decoded once: `fastgan prepare` writes the validated images as uint8 pixels, already resized and
centre-cropped as the tutorial does, and `fastgan train --data FILE` gathers its batches from them, so that a
batch costs one gather and one conversion instead of a JPEG decode per image. Here: the file's format, `prepare`,
and the pixels held in device memory (PreparedLoader, the gather inside the step); streamed.py holds the tiers
that keep them in host memory or on the disk (--data-memory).

File format (.fgd): the magic b"FASTGAN-DATA\\n", a little-endian uint64 with the manifest's length, the
manifest (UTF-8 JSON: source root, count, image size, channels, layout NHWC, the skipped files, and a SHA-256
for every CHUNK_BYTES of the pixels), zero padding to a multiple of 64 bytes, then count * size * size * channels
uint8 pixels. Version 1 (still read) held one SHA-256 of all the pixels instead of one per chunk. A truncated or
altered file fails its size or checksum test and is refused.

`prepare` streams: each image is written as it is decoded and its chunk's checksum updated, so its memory does not
grow with the number of images. The manifest is written first with placeholder checksums of the same length,
and written again over them at the end; the whole file goes through a temporary file, renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from ..config import HW_DECODER_LOAD
from ..errors import FastganError
from ..atomic import atomic_write, remove_leftovers
from .files import FileIndex, default_workers, load_image, parallel_map
from .pipeline_torch import epoch_permutation, image_transform, no_full_batch, rank_order

MAGIC = b"FASTGAN-DATA\n"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ALIGN = 64
CHUNK_BYTES = 64 << 20  # pixels per checksum: a damaged chunk is found without hashing the whole file


def _pixels(job: tuple[str, int, int]) -> np.ndarray:
    """One image as the torch loader sees it before ToTensor: resized, centre-cropped, uint8 HWC."""
    path, image_size, nc = job
    crop = image_transform(image_size, nc).transforms[:2]  # Resize, CenterCrop: the tutorial's geometry
    image = load_image(path, nc)
    for transform in crop:
        image = transform(image)
    return np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, nc)


def decoded_images(paths, image_size: int, nc: int, workers: int, decoder: str,
                   hw_decoder_load: float = HW_DECODER_LOAD) -> Iterator[np.ndarray]:
    """The images of `paths` in order, as uint8 (B, S, S, C) arrays of one or more images: PIL in `workers`
    processes (the torch loader's exact pixels), or DALI's "mixed" (GPU) or "cpu" decoder in batches, on
    `workers` threads (and the hardware JPEG decoder's share for "mixed")."""
    if decoder == "pil":
        jobs = ((str(p), image_size, nc) for p in paths)  # made as the workers take them
        with parallel_map(_pixels, jobs, workers, count=len(paths)) as results:
            for image in results:
                yield image[None]
    else:
        from ..pipeline_dali import decode_all
        for batch in decode_all(paths, image_size, nc, decoder, threads=workers, hw_decoder_load=hw_decoder_load):
            yield batch.numpy()


def decode_with_pil(paths, pixels: np.ndarray, image_size: int, nc: int, workers: int, progress) -> None:
    """Fill `pixels` with the images, decoded by PIL in `workers` processes: the torch loader's exact pixels."""
    done = 0
    for images in decoded_images(paths, image_size, nc, workers, "pil"):
        pixels[done:done + len(images)] = images
        done += len(images)
        if progress:
            progress(len(images))


class ChunkDigests:
    """SHA-256 of every CHUNK_BYTES of a byte stream, computed as the bytes go by; the last chunk may be short."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes, self.digests, self.hash, self.filled = chunk_bytes, [], hashlib.sha256(), 0

    def update(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), self.chunk_bytes - self.filled)
            self.hash.update(data[:take])
            self.filled, data = self.filled + take, data[take:]
            if self.filled == self.chunk_bytes:
                self.digests.append(self.hash.hexdigest())
                self.hash, self.filled = hashlib.sha256(), 0

    def finish(self) -> list[str]:
        if self.filled:
            self.digests.append(self.hash.hexdigest())
            self.hash, self.filled = hashlib.sha256(), 0
        return self.digests


def _head(manifest: dict) -> bytes:
    """The bytes before the pixels: magic, manifest length, manifest, zero padding to ALIGN."""
    header = json.dumps(manifest).encode()
    head = MAGIC + struct.pack("<Q", len(header)) + header
    return head + b"\0" * (-len(head) % ALIGN)


def prepare(index: FileIndex, out: str | os.PathLike, image_size: int, nc: int, workers: Optional[int] = None,
            progress: Optional[Callable[[int], None]] = None, decoder: str = "pil",
            hw_decoder_load: float = HW_DECODER_LOAD) -> Path:
    """Decode every good file of `index` once and write them to `out` (which must not exist yet), image by image:
    memory stays flat whatever the number of images.

    decoder: "pil" (all cores; the torch loader's exact pixels), or DALI's "mixed" (GPU) or "cpu" decoder,
    whose resize filter differs from PIL's by a few levels (see pipeline_dali), on `workers` threads; give DALI
    an index already passed through readable_by_dali. hw_decoder_load: the hardware JPEG decoder's share (mixed)."""
    out = Path(out).expanduser()
    if out.exists():
        raise FastganError(f"{out} already exists; choose another --out (fastgan overwrites nothing)")
    count = len(index.good)
    workers = default_workers() if workers is None else workers
    total = count * image_size * image_size * nc
    manifest = {
        "format": "fastgan-data", "version": FORMAT_VERSION, "source_root": str(index.root), "count": count,
        "image_size": image_size, "nc": nc, "layout": "NHWC", "dtype": "uint8",
        "decoder": {"pil": "PIL", "cpu": "DALI (CPU)", "mixed": "DALI (GPU)"}[decoder],
        "skipped": [[str(p), reason] for p, reason in index.bad],
        "chunk_bytes": CHUNK_BYTES, "chunk_sha256": ["0" * 64] * -(-total // CHUNK_BYTES),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    placeholder = _head(manifest)
    digests, written = ChunkDigests(CHUNK_BYTES), 0
    remove_leftovers([out.parent], out.name)  # what a killed prepare of this file left: gigabytes for CelebA
    with atomic_write(out) as f:
        f.write(placeholder)
        for images in decoded_images(index.good, image_size, nc, workers, decoder, hw_decoder_load):
            data = memoryview(np.ascontiguousarray(images)).cast("B")
            digests.update(data)
            f.write(data)
            written += len(data)
            if progress:
                progress(len(images))
        if written != total:
            raise FastganError(f"prepare decoded {written:,} bytes of pixels where {count:,} images make {total:,}")
        manifest["chunk_sha256"] = digests.finish()
        head = _head(manifest)
        assert len(head) == len(placeholder)  # hex digests replace placeholders of their length
        f.seek(0)
        f.write(head)
    return out


@dataclass(frozen=True)
class Naming:
    """How the messages about a prepared file name it, and the way out they give when it is damaged (`remedy`), not
    a prepared file at all (`stranger`) or a folder (`folder`, with {path}): --data's file by default; a cache file
    names itself and its own way out (cache.py)."""
    label: str = "--data"
    remedy: str = "prepare it again"
    stranger: str = "make one with fastgan prepare"
    folder: str = ("for a folder of images give --root {path}, or make a file of it with fastgan prepare --root {path} "
                   "--out FILE")


DATA_FILE = Naming()


def read_manifest(path: str | os.PathLike, naming: Naming = DATA_FILE) -> tuple[dict, int]:
    """(manifest, offset of the pixels); FastganError for anything that is not a whole .fgd file."""
    path = Path(path).expanduser()
    name, remedy = f"{naming.label} {path}", naming.remedy
    if path.is_dir():
        raise FastganError(f"{name} is a folder, not a prepared data file; {naming.folder.format(path=path)}")
    if not path.is_file():
        raise FastganError(f"{name} does not exist")
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise FastganError(f"{name} is not a fastgan prepared data file ({naming.stranger})")
        try:
            (length,) = struct.unpack("<Q", f.read(8))
            manifest = json.loads(f.read(length))
        except (struct.error, ValueError):
            raise FastganError(f"{name} has a damaged header; {remedy}") from None
    if manifest.get("version") not in READABLE_VERSIONS:
        raise FastganError(f"{name} is format version {manifest.get('version')}; this fastgan reads "
                           f"versions {', '.join(map(str, READABLE_VERSIONS))}; {remedy}")
    if manifest["version"] >= 2 and not _digests_fit(manifest):
        raise FastganError(f"{name} has a damaged header (its checksums do not cover its pixels); {remedy}")
    offset = len(MAGIC) + 8 + length
    offset += -offset % ALIGN
    expected = offset + manifest["count"] * manifest["image_size"] ** 2 * manifest["nc"]
    actual = path.stat().st_size
    if actual != expected:
        raise FastganError(f"{name} is {'truncated' if actual < expected else 'too long'} "
                           f"({actual:,} bytes, expected {expected:,}); {remedy}")
    return manifest, offset


def check_shape(path, manifest: dict, image_size: int, nc: int, advice: str) -> None:
    if (manifest["image_size"], manifest["nc"]) != (image_size, nc):
        raise FastganError(f"--data {path} holds {manifest['image_size']}x{manifest['image_size']} images with "
                           f"{manifest['nc']} channel(s); the model wants {image_size}x{image_size} with {nc}: "
                           + advice)


def fails_its_checksum(path, naming: Naming, chunk: str = "") -> FastganError:
    return FastganError(f"{naming.label} {path} fails its checksum (altered or damaged{chunk}); {naming.remedy}")


def load_pixels(path: str | os.PathLike, image_size: int, nc: int,
                advice: str = "prepare the data again at that size",
                naming: Naming = DATA_FILE) -> tuple[torch.Tensor, dict]:
    """The pixels (N, S, S, C) uint8 on the CPU, after checking shape against the model and the checksum.
    `advice`: what the user of the calling command can do when the shapes differ (in that command's flags)."""
    manifest, offset = read_manifest(path, naming)
    check_shape(path, manifest, image_size, nc, advice)
    pixels = np.empty((manifest["count"], image_size, image_size, nc), dtype=np.uint8)
    flat = memoryview(pixels).cast("B")
    with open(path, "rb") as f:
        f.seek(offset)
        for number, (start, end, digest) in enumerate(chunks(manifest)):
            f.readinto(flat[start:end])
            if hashlib.sha256(flat[start:end]).hexdigest() != digest:
                raise fails_its_checksum(path, naming, f": chunk {number + 1} of {len(manifest['chunk_sha256'])}"
                                         if "chunk_sha256" in manifest else "")
    return torch.from_numpy(pixels), manifest


def _digests_fit(manifest: dict) -> bool:
    """A version-2 manifest has a positive chunk size and one digest per chunk of its pixels."""
    size, digests = manifest.get("chunk_bytes"), manifest.get("chunk_sha256")
    if not isinstance(size, int) or size < 1 or not isinstance(digests, list):
        return False
    return len(digests) == -(-manifest["count"] * manifest["image_size"] ** 2 * manifest["nc"] // size)


def content_digest(manifest: dict) -> str:
    """One SHA-256 that names the pixels of a prepared file (for caches keyed by its content): version 1's own,
    or that of version 2's chunk checksums in order."""
    if manifest["version"] == 1:
        return manifest["sha256"]
    return hashlib.sha256("".join(manifest["chunk_sha256"]).encode()).hexdigest()


def chunks(manifest: dict) -> list[tuple[int, int, str]]:
    """(start, end, SHA-256) of each checksummed byte range of the pixels; version 1 has one, all of them."""
    total = manifest["count"] * manifest["image_size"] ** 2 * manifest["nc"]
    if manifest["version"] == 1:
        return [(0, total, manifest["sha256"])]
    size = manifest["chunk_bytes"]
    return [(start, min(start + size, total), digest)
            for start, digest in zip(range(0, total, size), manifest["chunk_sha256"])]


def to_device(tensor: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """A CPU tensor on `device`; through pinned memory on CUDA, so that the host does not wait for the GPU to catch
    up (torch's pinned-memory cache keeps the staging buffer until its copy has run)."""
    if tensor is None or device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to [-1, 1] float32 exactly as the torch loader computes them: ToTensor's x / 255, then
    Normalize(0.5, 0.5)'s (x - 0.5) / 0.5, each in float32, so that prepared batches equal its batches bit for bit."""
    return pixels.float().div(255).sub(0.5).div(0.5)


class PreparedBatches:
    """What every place of prepared pixels shares (device memory, host memory, the mapped file): each epoch's
    order and flips, and a batch's conversion to what the model takes, so that every place yields the same batches,
    bit for bit.

    Each epoch follows `rank_order(n, seed, epoch, ...)`, the order of the other loaders, so the same seed
    trains on the same batches whichever loader decoded them; `mirror` flips a random half of each epoch's
    images horizontally (from the same seed). Batches come in `dtype`, the model's input dtype (bfloat16 or
    float16 under AMP): each pixel value's [-1, 1] value is looked up in a 256-entry table computed in float32
    and rounded once, so a half batch is exactly the float32 batch that autocast would have cast."""

    name = "prepared"

    def __init__(self, count: int, batch_size: int, device: torch.device, channels_last: bool = False,
                 seed: int = 0, mirror: bool = False, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32):
        self.count, self.device = count, torch.device(device)
        self.batch_size, self.channels_last, self.seed, self.mirror = batch_size, channels_last, seed, mirror
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.steps = count // (batch_size * world_size)
        if self.steps < 1:
            raise no_full_batch(count, "prepared images", batch_size, world_size)
        self.values = to_unit_range(torch.arange(256)).to(self.device, dtype)  # in float32, rounded once

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch to read next, from its batch `start` on (0 unless resuming in the middle of it)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps

    def epoch_plan(self, epoch: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(this rank's image indices for `epoch` (the one set) in step order, per-image flips or None), on the
        CPU."""
        epoch = self.epoch if epoch is None else epoch
        order = rank_order(self.count, self.seed, epoch, self.batch_size, self.rank, self.world_size)
        flips = None
        if self.mirror:
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch, 1])
                                                          .generate_state(1)[0]))
            flips = torch.rand(self.count, generator=generator) < 0.5
        return order, flips

    def convert(self, pixels: torch.Tensor, flips: Optional[torch.Tensor]) -> torch.Tensor:
        """uint8 NHWC images on the device (and each one's flip, or None) -> the batch, NCHW in the model's dtype:
        device work only, no host sync."""
        batch = self.values[pixels.int()].permute(0, 3, 1, 2)  # NCHW view of NHWC: channels_last
        if flips is not None:
            batch = torch.where(flips.view(-1, 1, 1, 1), batch.flip(3), batch)
        return batch.contiguous(memory_format=self.memory_format)  # a no-op when already in that format

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 NHWC images `idx` (CPU indices), on the device."""
        raise NotImplementedError

    def preview(self, count: int) -> torch.Tensor:
        """The first `count` images of the first epoch as the model sees them, flipped where --mirror flips them,
        as float32 (for samples/real.png)."""
        order = epoch_permutation(self.count, self.seed, 0)[:count]
        images = to_unit_range(self.rows(order).permute(0, 3, 1, 2))
        if self.mirror:
            flips = self.epoch_plan(0)[1][order].to(self.device)
            images = torch.where(flips.view(-1, 1, 1, 1), images.flip(3), images)
        return images


class PreparedLoader(PreparedBatches):
    """Batches gathered from images held on `device` (--data-memory device): one index gather and one table
    look-up per batch.

    Under --cuda-graphs the gather itself runs inside the graph: `in_graph()` gives the capturable function
    that gathers the next batch at a position kept on the device, and iterating the loader then yields
    placeholders (None), one per step; set_epoch writes the epoch's order into a device buffer."""

    def __init__(self, pixels: torch.Tensor, batch_size: int, device: torch.device, channels_last: bool = False,
                 seed: int = 0, mirror: bool = False, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32):
        super().__init__(len(pixels), batch_size, device, channels_last, seed, mirror, rank, world_size, dtype)
        # NHWC uint8 on the device: the whole of CelebA at 64x64 is 2.5 GB (every rank holds all of it, since
        # each epoch reshuffles the whole set across the ranks)
        self.pixels = pixels.to(self.device)
        self.graph_feed = None  # the device-side order, flips and position, once in_graph() was asked for

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch, start)
        if self.graph_feed is not None:
            self.graph_feed.load(*self.epoch_plan(), start)

    def gather(self, idx: torch.Tensor, flips: Optional[torch.Tensor]) -> torch.Tensor:
        """The batch of images `idx` (device indices), NCHW in the model's dtype: device work only, no host sync."""
        return self.convert(self.pixels[idx], None if flips is None else flips[idx])

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.pixels[idx.to(self.device)]

    def __iter__(self) -> Iterator[Optional[torch.Tensor]]:
        if self.graph_feed is not None:  # the graph gathers each batch itself
            for _ in range(self.start, self.steps):
                yield None
            return
        order, flips = (to_device(t, self.device) for t in self.epoch_plan())
        for i in range(self.start, self.steps):
            yield self.gather(order[i * self.batch_size:(i + 1) * self.batch_size], flips)

    def in_graph(self) -> "GraphFeed":
        """The capturable gather of the next batch, for a CUDA graph; from now on iterating yields None."""
        if self.graph_feed is None:
            self.graph_feed = GraphFeed(self)
            self.graph_feed.load(*self.epoch_plan(), self.start)
        return self.graph_feed


class GraphFeed:
    """The device-side half of PreparedLoader under a CUDA graph: the epoch's order (and flips) in fixed device
    buffers, and the position of the next batch as a device scalar that each call advances. Calling it gathers
    the next batch with device work only, so it can be captured and replayed."""

    def __init__(self, loader: PreparedLoader):
        self.loader = loader
        device = loader.device
        self.order = torch.zeros(loader.steps * loader.batch_size, dtype=torch.int64, device=device)
        self.flips = torch.zeros(len(loader.pixels), dtype=torch.bool, device=device) if loader.mirror else None
        self.position = torch.zeros((), dtype=torch.int64, device=device)  # batches of the epoch done
        self.offsets = torch.arange(loader.batch_size, device=device)

    def load(self, order: torch.Tensor, flips: Optional[torch.Tensor], start: int) -> None:
        """A new epoch's plan, from batch `start` on; queued on the current stream, behind the steps before it."""
        for buffer, plan in ((self.order, order), (self.flips, flips)):
            if buffer is not None:
                buffer.copy_(to_device(plan, buffer.device))
        self.position.fill_(start)

    def __call__(self) -> torch.Tensor:
        # (modulo: the graph's warm-up may run past a short epoch's end; a real step never does)
        idx = self.order[(self.position % self.loader.steps) * self.loader.batch_size + self.offsets]
        self.position.add_(1)
        return self.loader.gather(idx, self.flips)
