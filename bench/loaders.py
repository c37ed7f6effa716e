"""Loader throughput: images/s of decode + resize + crop + normalise, delivered as training batches.

    python bench/loaders.py                     # 2,048 demo faces (178x218 JPEGs like CelebA), 64x64, batch 128
    python bench/loaders.py --root ~/celeba --images 20000 --json loaders.json

Rows: the tutorial's torchvision ImageFolder DataLoader (its settings: 2 workers), the same with one worker
per core, fastgan's torch loader, DALI decoding on the CPU, and DALI decoding on the GPU (where there is one).

Two figures per row, from one loader object as training uses it:
  - start-up: seconds from building a fresh loader to its first batch on the device (worker processes, the
    DALI pipeline build, the first decodes);
  - steady images/s: after a warm-up, the median of --repeats timings of --batches batches each. The same
    loader object is read epoch after epoch (set_epoch before each), so a small set is reused and each
    timing includes the epoch boundaries that fall inside it, as training sees them.
  - the epoch boundary: bench/epoch_gap.py's wait from the last batch of an epoch to the first of the next,
    also in batches of the same epoch (about 1: the boundary costs nothing extra); where it is cheap to read.
The device, versions and commit are printed beside the numbers. Rows that cannot run here say why.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epoch_gap import commit, epoch_boundary_gap  # noqa: E402,F401 (commit: also the other scripts')
from fastgan.data.demo import demo_faces  # noqa: E402
from fastgan.errors import FastganError  # noqa: E402
from fastgan.data.files import default_workers, find_images  # noqa: E402
from fastgan.distributed import resolve_device  # noqa: E402
from fastgan.pipeline_dali import NOT_INSTALLED, DaliLoader, dali_available, dali_unusable, dali_version  # noqa: E402,E501
from fastgan.data.pipeline_torch import TorchLoader  # noqa: E402
from fastgan.tutorial import tutorial_loader  # noqa: E402

WARMUP_BATCHES = 8  # before the steady timings: 2 workers x prefetch 2, or DALI's queue of 2, are full by then
# The epoch boundary (bench/epoch_gap.py): the median over GAP_EPOCHS - 1 boundaries, read from the same loader
# after the timings; measured only where those epochs cost at most GAP_BUDGET timings' worth of batches (or
# GAP_FLOOR batches, seconds on any loader here)
GAP_EPOCHS, GAP_BUDGET, GAP_FLOOR = 3, 2, 64


class ImagesOnly:
    """The tutorial's DataLoader as a loader: its image batches (the labels dropped), len() in batches.

    Its RandomSampler reshuffles by itself on each pass, so set_epoch has nothing to set."""

    def __init__(self, loader):
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return (images for images, _ in self.loader)


def epochs(loader) -> Iterator:
    """Batches from one loader object, epoch after epoch, as training reads it."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # note: the timing needs the device to have finished


def measure(make: Callable[[], object], batch_size: int, repeats: int, device: torch.device,
            batches: int) -> dict:
    """One loader's figures: startup_s, the time to the first batch of a fresh loader; images_per_second,
    the median of `repeats` timings of `batches` batches each, after a warm-up, from the same loader; and
    epoch_gap (bench/epoch_gap.py's figures) where GAP_EPOCHS of its epochs cost at most GAP_BUDGET timings."""
    sync(device)
    start = time.perf_counter()
    loader = make()
    stream = epochs(loader)
    next(stream).to(device, non_blocking=True)  # host batches go to the device, as training moves them
    sync(device)
    startup = time.perf_counter() - start
    try:
        for _ in range(WARMUP_BATCHES):
            next(stream).to(device, non_blocking=True)
        rates = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            for _ in range(batches):
                next(stream).to(device, non_blocking=True)
            sync(device)
            rates.append(batches * batch_size / (time.perf_counter() - start))
    finally:
        stream.close()  # ends the loader's pass: DALI frees its pipeline
    figures = {"startup_s": round(startup, 3), "images_per_second": round(statistics.median(rates), 1)}
    figures["epoch_gap"] = None
    if len(loader) < 2:
        figures["epoch_gap_note"] = "not measured: an epoch of one batch has no interval to compare the gap with"
    elif GAP_EPOCHS * len(loader) > max(GAP_BUDGET * batches, GAP_FLOOR):
        figures["epoch_gap_note"] = f"not measured: {GAP_EPOCHS} epochs of {len(loader):,} batches cost too long"
    else:
        figures["epoch_gap"] = epoch_boundary_gap(loader, GAP_EPOCHS, device)
    return figures


def describe_gap(figures: dict) -> str:
    """The epoch boundary's cost as a cell: its wait, and that wait in batches of the same epoch."""
    gap = figures.get("epoch_gap")
    if gap is None:
        return figures.get("epoch_gap_note", "")
    return f"{gap['gap_ms']:,.0f} ms = {gap['gap_batches']:.1f} batches"


def loader_rows(paths, folder: Path, size: int, batch: int, device: torch.device, threads, hw_loads):
    """(name, make) per loader, make() -> a fresh loader (len() in batches, set_epoch, iterable);
    or (name, "skipped: why")."""
    cores = default_workers()
    cuda = device.type == "cuda"
    rows: list[tuple[str, object]] = [
        ("torchvision ImageFolder, tutorial settings (2 workers)",
         lambda: ImagesOnly(tutorial_loader(folder.parent, size, batch, 2))),
        (f"torchvision ImageFolder, {cores} workers (one per core)",
         lambda: ImagesOnly(tutorial_loader(folder.parent, size, batch, cores))),
        (f"fastgan torch loader, {cores} workers",
         lambda: TorchLoader(paths, size, 3, batch, device, False, cores)),
    ]
    for n in threads:
        rows.append((f"DALI, CPU decode, {n} threads",
                     (lambda n=n: DaliLoader(paths, size, 3, batch, device, True, decoder="cpu", threads=n))
                     if dali_available() else dali_skip()))
    for n in threads:
        for load in hw_loads:
            rows.append((f"DALI, GPU decode, {n} threads, hw_decoder_load {load}", (
                lambda n=n, load=load: DaliLoader(paths, size, 3, batch, device, True, decoder="mixed", threads=n,
                                                  hw_decoder_load=load, dtype=torch.float16))
                if dali_available() and cuda else ("skipped: no CUDA GPU" if not cuda else dali_skip())))
    return rows


def dali_skip() -> str:
    """A DALI row's note where DALI cannot be used here, saying why; "" where it can."""
    if dali_available():
        return ""
    why = dali_unusable()
    return f"skipped: DALI does not load: {why}" if why and why != NOT_INSTALLED else "skipped: DALI not installed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="image folder (default: the demo faces)")
    parser.add_argument("--images", type=int, default=2048, help="images in the set (reused epoch after epoch)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=None, help="batches per timing [GPU 100, CPU 24]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where batches are delivered; auto: cuda when there is one")
    parser.add_argument("--hw-decoder-load", type=float, nargs="*", default=[0.65],
                        help="GPU rows: one per hardware-decoder share (e.g. 0 0.65 1)")
    parser.add_argument("--dali-threads", type=int, nargs="*", default=None,
                        help="DALI rows: one per CPU thread count [one per core]")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except FastganError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"

    cores = default_workers()
    root = Path(args.root).expanduser() if args.root else demo_faces(max(args.images, 2048))
    paths = find_images(root)[: args.images]
    threads = args.dali_threads or [cores]
    # 100 batches on a GPU: long enough that the timing's ends (one sync each) do not count; the CPU's loaders
    # are ~100x slower, so 24 batches (1.5 epochs of 2,048 images, one boundary) take seconds, not minutes
    batches = args.batches or (100 if cuda else 24)
    # ImageFolder wants root/<class>/*.jpg: a folder of links to exactly these files
    folder = Path(tempfile.mkdtemp(prefix="fastgan-bench-")) / "faces"
    folder.mkdir()
    for p in paths:
        os.symlink(p, folder / p.name)

    size, batch = args.image_size, args.batch_size
    rows = loader_rows(paths, folder, size, batch, device, threads, args.hw_decoder_load)

    console = Console(width=None if sys.stdout.isatty() else 150)  # a log file gets whole rows
    info = {"device": torch.cuda.get_device_name(device) if cuda else f"CPU, {cores} cores",
            "torch": torch.__version__, "dali": dali_version(), "commit": commit(), "images": len(paths),
            "image_size": size, "batch_size": batch, "batches_per_timing": batches, "repeats": args.repeats,
            "root": str(root), "date": time.strftime("%Y-%m-%d")}
    results = []
    for name, make in rows:
        if isinstance(make, str):
            results.append({"loader": name, "images_per_second": None, "startup_s": None, "note": make})
            console.print(f"{name}: {make}")
            continue
        figures = measure(make, batch, args.repeats, device, batches)
        results.append({"loader": name, **figures})
        console.print(f"{name}: start-up {figures['startup_s']:.2f} s, {figures['images_per_second']:,.0f} images/s, "
                      f"epoch boundary {describe_gap(figures)}")

    baseline = results[0]["images_per_second"]
    table = Table(title=f"loaders, {size}x{size}, batch {batch}, {len(paths):,} images reused epoch after epoch, "
                        f"{batches} batches per timing")
    table.add_column("loader")
    table.add_column("start-up (s)", justify="right")
    table.add_column("steady images/s", justify="right")
    table.add_column("vs tutorial", justify="right")
    table.add_column("epoch boundary", justify="right")
    for r in results:
        rate = r["images_per_second"]
        table.add_row(r["loader"], f"{r['startup_s']:.2f}" if rate else "", f"{rate:,.0f}" if rate else r["note"],
                      f"{rate / baseline:.2f}x" if rate else "", describe_gap(r) if rate else "")
    console.print(table)
    console.print(" · ".join(f"{k} {v}" for k, v in info.items() if k != "root"))
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
