"""Prepared data that stays off the device (--data-memory host or disk), and the choice of where the pixels live.

`host`: the pixels in host memory; `disk`: the file memory-mapped, so that every local rank shares one copy
through the page cache and a set larger than the RAM still trains. Either way a small pool of threads gathers
the batches a few steps ahead (rows read in file order within a batch, then put back in the batch's order), and
on CUDA each batch goes through pinned memory and a side stream that the step's stream waits on, never the host.
A mapped file's chunks are checked against their checksums the first time a batch touches them, so a 40 GB file
starts at once and a damaged chunk still stops the run with its name.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..errors import FastganError
from ..report import gb
from .prepared import DATA_FILE, Naming, PreparedBatches, check_shape, chunks, fails_its_checksum, read_manifest

TIERS = ("device", "host", "disk")
GATHER_THREADS = 2  # threads reading batches: enough to keep ahead of the step (bench/data_scale.py)
BATCHES_AHEAD = 4  # batches gathered ahead of the one the step takes
USABLE_SHARE = 0.5  # of the free memory a tier may fill: the rest for the models, the step and the page cache


class StreamedLoader(PreparedBatches):
    """Batches gathered on the host from `source`, uint8 (N, S, S, C): a numpy array in memory, or a np.memmap of
    the prepared file, whose chunks `check` verifies as they are first read."""

    def __init__(self, source: np.ndarray, batch_size: int, device: torch.device, channels_last: bool = False,
                 seed: int = 0, mirror: bool = False, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32, check: Optional["ChunkCheck"] = None,
                 threads: int = GATHER_THREADS, ahead: int = BATCHES_AHEAD):
        super().__init__(len(source), batch_size, device, channels_last, seed, mirror, rank, world_size, dtype)
        self.source, self.check, self.threads, self.ahead = source, check, threads, ahead
        self.copies = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def host_rows(self, idx: np.ndarray) -> torch.Tensor:
        """The images `idx`, in that order, read from the source in file order (sequential reads on a disk)."""
        if self.check is not None:
            self.check.images(idx)
        ascending = np.argsort(idx, kind="stable")
        pinned = self.copies is not None  # on CUDA: gathered straight into pinned memory, copied from there
        rows = torch.empty((len(idx), *self.source.shape[1:]), dtype=torch.uint8, pin_memory=pinned)
        rows.numpy()[ascending] = self.source[idx[ascending]]
        return rows

    def _gathered(self, idx: np.ndarray, flips: Optional[np.ndarray]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One batch's images and flips on the host (pinned on CUDA), on a pool thread."""
        batch_flips = None if flips is None else torch.from_numpy(flips[idx])
        if batch_flips is not None and self.copies is not None:
            batch_flips = batch_flips.pin_memory()
        return self.host_rows(idx), batch_flips

    def _to_device(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """On CUDA: copied on the side stream, which the current stream waits for (a device-side wait)."""
        if tensor is None or self.copies is None:
            return tensor
        with torch.cuda.stream(self.copies):
            moved = tensor.to(self.device, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self.copies)
        moved.record_stream(torch.cuda.current_stream(self.device))  # its memory is the step's stream's to free
        return moved

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.host_rows(idx.numpy()).to(self.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order, flips = self.epoch_plan()
        order = order.numpy()
        flips = None if flips is None else flips.numpy()
        size = self.batch_size
        with ThreadPoolExecutor(self.threads, thread_name_prefix="fastgan-data") as pool:
            pending = deque()
            upcoming = iter(range(self.start, self.steps))
            try:
                for _ in range(self.start, self.steps):
                    while len(pending) < self.ahead and (i := next(upcoming, None)) is not None:
                        pending.append(pool.submit(self._gathered, order[i * size:(i + 1) * size], flips))
                    pixels, batch_flips = pending.popleft().result()
                    yield self.convert(self._to_device(pixels), self._to_device(batch_flips))
            finally:  # a run that stops early leaves no gathering behind
                for future in pending:
                    future.cancel()


class ChunkCheck:
    """Each checksummed chunk of a mapped file verified the first time an image in it is read (once, whichever
    thread gets there first)."""

    def __init__(self, path: Path, flat: np.ndarray, manifest: dict, naming: Naming = DATA_FILE):
        self.path, self.flat, self.naming = path, flat, naming
        self.ranges = chunks(manifest)
        self.chunk_bytes = self.ranges[0][1] - self.ranges[0][0]
        self.image_bytes = manifest["image_size"] ** 2 * manifest["nc"]
        self.checked = np.zeros(len(self.ranges), dtype=bool)
        self.locks = [threading.Lock() for _ in self.ranges]

    def images(self, idx: np.ndarray) -> None:
        """Verify the chunks that hold the images `idx` and were not verified yet."""
        first = idx * self.image_bytes // self.chunk_bytes
        last = ((idx + 1) * self.image_bytes - 1) // self.chunk_bytes  # an image may span chunks
        spans = first if (last == first).all() else np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last)])
        needed = np.unique(spans)
        needed = needed[~self.checked[needed]]
        # in a shuffled order: the threads gathering the first batches need the same chunks, and hash different
        # ones at once (hashlib lets go of the GIL) instead of queueing for each in turn
        for number in np.random.default_rng().permutation(needed):
            with self.locks[number]:
                if self.checked[number]:  # another thread got there first
                    continue
                start, end, digest = self.ranges[number]
                if hashlib.sha256(memoryview(self.flat[start:end])).hexdigest() != digest:
                    raise fails_its_checksum(self.path, self.naming, f": chunk {number + 1} of {len(self.ranges)}")
                self.checked[number] = True


def map_pixels(path: str | os.PathLike, image_size: int, nc: int, advice: str,
               naming: Naming = DATA_FILE) -> tuple[np.ndarray, dict, ChunkCheck]:
    """The prepared file's pixels memory-mapped, read-only (N, S, S, C), with its manifest and the check of its
    chunks; the header, size and shape are checked now, the pixels as they are read."""
    path = Path(path).expanduser()
    manifest, offset = read_manifest(path, naming)
    check_shape(path, manifest, image_size, nc, advice)
    shape = (manifest["count"], image_size, image_size, nc)
    pixels = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
    return pixels, manifest, ChunkCheck(path, pixels.reshape(-1), manifest, naming)


def available_ram() -> int:
    """Bytes of memory the system can give without swapping (MemAvailable), or the free pages where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_memory(tier: str, device: torch.device) -> tuple[int, str]:
    """(bytes free, its name) where `tier` keeps the pixels."""
    if tier == "device" and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "GPU memory"
    return available_ram(), "RAM"


def choose_tier(requested: str, nbytes: int, device: torch.device, local_ranks: int = 1) -> tuple[str, str]:
    """(tier, why) for a prepared set of `nbytes`: the requested one, or under auto the first of device, host, disk
    that fits in half of its free memory (on the CPU host memory is device memory, so auto never picks host
    there). Each local rank holds its own copy in RAM; on a GPU each its own device. FastganError when the
    requested tier cannot hold the set, naming one that can."""
    def room(tier: str) -> tuple[bool, str]:
        free, where = free_memory(tier, device)
        copies = 1 if tier == "device" and device.type == "cuda" else local_ranks
        need = f"{gb(nbytes)}{f' x {copies} ranks' if copies > 1 else ''}"
        return nbytes * copies <= free * USABLE_SHARE, f"{need} of {gb(free)} free {where}"

    if requested == "disk":
        return "disk", "asked for"
    if requested in ("device", "host"):
        fits, why = room(requested)
        if not fits:
            other = "host" if requested == "device" and device.type == "cuda" and room("host")[0] else "disk"
            raise FastganError(f"--data-memory {requested} cannot hold the set: {why}, and a tier may fill half; "
                               f"--data-memory {other} would work")
        return requested, why
    for tier in (("device", "host") if device.type == "cuda" else ("device",)):
        fits, why = room(tier)
        if fits:
            return tier, f"auto: {why}"
    return "disk", f"auto: {why}, more than half"
