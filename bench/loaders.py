"""Loader throughput: images/s of decode + resize + crop + normalise, delivered as training batches.

    python bench/loaders.py                     # 2,048 demo faces (178x218 JPEGs like CelebA), 64x64, batch 128
    python bench/loaders.py --root ~/celeba --images 20000 --json loaders.json

Rows: the tutorial's torchvision ImageFolder DataLoader (its settings: 2 workers), the same with one worker
per core, fastgan's torch loader, DALI decoding on the CPU, and DALI decoding on the GPU (where there is one).
Each row warms up on a few batches, then times whole passes over the images; the median of --repeats passes
is reported, with the device, versions and commit beside it. Rows that cannot run here say why.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastgan.demo import demo_faces  # noqa: E402
from fastgan.files import default_workers, find_images  # noqa: E402
from fastgan.pipeline_dali import DaliLoader, dali_available, dali_version  # noqa: E402
from fastgan.pipeline_torch import TorchLoader  # noqa: E402
from fastgan.tutorial import tutorial_loader  # noqa: E402


def images_only(loader):
    return (images for images, _ in loader), len(loader)


def measure(make_iter, batch_size: int, repeats: int, device: torch.device) -> float:
    """Median images/s over `repeats` full passes, after a warm-up pass over a few batches."""
    iterator, _ = make_iter()
    for i, _ in zip(range(3), iterator):
        pass
    rates = []
    for _ in range(repeats):
        iterator, steps = make_iter()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in iterator:
            batch = batch.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def loader_rows(paths, folder: Path, size: int, batch: int, device: torch.device, threads, hw_loads):
    """(name, make) per loader, make() -> (iterator of batches, number of batches); or (name, "skipped: why")."""
    cores = default_workers()
    cuda = device.type == "cuda"
    rows: list[tuple[str, object]] = [
        ("torchvision ImageFolder, tutorial settings (2 workers)",
         lambda: images_only(tutorial_loader(folder.parent, size, batch, 2))),
        (f"torchvision ImageFolder, {cores} workers (one per core)",
         lambda: images_only(tutorial_loader(folder.parent, size, batch, cores))),
        (f"fastgan torch loader, {cores} workers",
         lambda: (lambda l: (iter(l), len(l)))(TorchLoader(paths, size, 3, batch, device, False, cores))),
    ]
    for n in threads:
        rows.append((f"DALI, CPU decode, {n} threads", (lambda n=n: (lambda l: (iter(l), len(l)))(
            DaliLoader(paths, size, 3, batch, device, True, decoder="cpu", threads=n)))
            if dali_available() else "skipped: DALI not installed"))
    for n in threads:
        for load in hw_loads:
            rows.append((f"DALI, GPU decode, {n} threads, hw_decoder_load {load}", (
                lambda n=n, load=load: (lambda l: (iter(l), len(l)))(DaliLoader(
                    paths, size, 3, batch, device, True, decoder="mixed", threads=n, hw_decoder_load=load,
                    dtype=torch.float16)))
                if dali_available() and cuda else
                "skipped: " + ("no CUDA GPU" if not cuda else "DALI not installed")))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="image folder (default: the demo faces)")
    parser.add_argument("--images", type=int, default=2048, help="images per pass")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hw-decoder-load", type=float, nargs="*", default=[0.65],
                        help="GPU rows: one per hardware-decoder share (e.g. 0 0.65 1)")
    parser.add_argument("--dali-threads", type=int, nargs="*", default=None,
                        help="DALI rows: one per CPU thread count [one per core]")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    cores = default_workers()
    root = Path(args.root).expanduser() if args.root else demo_faces(max(args.images, 2048))
    paths = find_images(root)[: args.images]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    threads = args.dali_threads or [cores]
    # ImageFolder wants root/<class>/*.jpg: a folder of links to exactly these files
    folder = Path(tempfile.mkdtemp(prefix="fastgan-bench-")) / "faces"
    folder.mkdir()
    for p in paths:
        os.symlink(p, folder / p.name)

    size, batch = args.image_size, args.batch_size
    rows = loader_rows(paths, folder, size, batch, device, threads, args.hw_decoder_load)

    console = Console()
    info = {"device": torch.cuda.get_device_name() if cuda else f"CPU, {cores} cores", "torch": torch.__version__,
            "dali": dali_version(), "commit": commit(), "images": len(paths), "image_size": size,
            "batch_size": batch, "root": str(root), "date": time.strftime("%Y-%m-%d")}
    results = []
    for name, make in rows:
        if isinstance(make, str):
            results.append({"loader": name, "images_per_second": None, "note": make})
            console.print(f"{name}: {make}")
            continue
        rate = measure(make, batch, args.repeats, device)
        results.append({"loader": name, "images_per_second": round(rate, 1)})
        console.print(f"{name}: {rate:,.0f} images/s")

    baseline = results[0]["images_per_second"]
    table = Table(title=f"loaders, {size}x{size}, batch {batch}, {len(paths):,} images per pass")
    table.add_column("loader")
    table.add_column("images/s", justify="right")
    table.add_column("vs tutorial", justify="right")
    for r in results:
        rate = r["images_per_second"]
        table.add_row(r["loader"], f"{rate:,.0f}" if rate else r["note"], f"{rate / baseline:.2f}x" if rate else "")
    console.print(table)
    console.print(" · ".join(f"{k} {v}" for k, v in info.items() if k != "root"))
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
