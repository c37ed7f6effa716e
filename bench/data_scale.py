"""Prepared data of any size: `fastgan prepare`'s time and memory, and each --data-memory tier's start-up and
images/s, for sets of growing size, beside the images/s the 64x64 training step consumes.

    python bench/data_scale.py                          # 10k, 100k and 1M images at 32x32 (3 GB at 1M)
    python bench/data_scale.py --counts 10000 100000 --image-size 64 --json scale.json
    python bench/data_scale.py --quick                  # 2k and 20k images, a first look in a minute

The images are copies of 1,000 synthetic faces (fastgan synth's drawing; --faces), saved as JPEGs at the image
size, so that `prepare` decodes one small JPEG per image (PIL on all cores) and a set of N holds each face N/1000
times.
Every figure comes from a fresh process (this script run with --measure), so that one measurement's memory does
not carry into the next:
  - prepare: seconds, images/s, and the preparing process's peak anonymous memory (its own: heap, buffers; also
    as growth over its value when the measurement starts, torch and the libraries already loaded) and peak
    file-backed memory (mapped files, the libraries), sampled every 20 ms; the decoding worker processes are not
    counted (each holds one image at a time);
  - each tier, as `fastgan train --data FILE --data-memory TIER` builds its loader: start-up (opening the file to
    the first batch, with the checksums the tier verifies at start), then the steady images/s of batches as the
    step takes them (gathered and converted to the step's dtype, channels_last), over --batches batches after a
    warm-up, and the peak memory as above: a mapped file's pages are the page cache's, not the process's own. The
    disk tier runs warm (the file read once just before) and cold (its pages dropped from the page cache with
    posix_fadvise, as far as the kernel lets go of them: the row says how much of the file was dropped);
  - the step: fastgan's best eager step at 64x64, batch 128, on this device (bf16 + channels_last on the CPU,
    fp16 on CUDA): what a tier must feed. The target (the data-of-any-size issue) is 10x the step's images/s.
On the CPU the host tier is the device tier (both are RAM), so it is not a row of its own there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loaders as loader_bench  # noqa: E402
from throughput import fastgan_loader, fastgan_step, sync, timed  # noqa: E402
from fastgan.config import Config  # noqa: E402
from fastgan.data.files import FileIndex, default_workers  # noqa: E402
from fastgan.data.prepared import prepare  # noqa: E402
from fastgan.data.synth import write_faces  # noqa: E402
from fastgan.distributed import resolve_device  # noqa: E402

SAMPLE_SECONDS = 0.02  # the memory sampler's period


class PeakMemory:
    """The process's peak anonymous and file-backed resident memory (/proc/self/status), sampled in a thread."""

    def __enter__(self) -> "PeakMemory":
        self.anonymous = self.file_backed = 0
        self.anonymous_at_start = self.status()["RssAnon:"]
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def status() -> dict:
        figures = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    key, value = line.split()[:2]
                    figures[key] = int(value) * 1024
        return figures

    def _sample(self) -> None:
        while self.running:
            figures = self.status()
            self.anonymous = max(self.anonymous, figures["RssAnon:"])
            self.file_backed = max(self.file_backed, figures["RssFile:"])
            time.sleep(SAMPLE_SECONDS)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()

    def figures(self) -> dict:
        """Peaks in MB, and the anonymous memory's growth over the measurement (torch's own share excluded)."""
        return {"peak_anonymous_mb": round(self.anonymous / 2**20),
                "anonymous_growth_mb": round((self.anonymous - self.anonymous_at_start) / 2**20),
                "peak_file_backed_mb": round(self.file_backed / 2**20)}


def page_cache_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


def drop_from_page_cache(path: Path) -> float:
    """Ask the kernel to drop the file's cached pages; the share of the file the page cache shrank by."""
    before = page_cache_bytes()
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # written pages must reach the disk before the kernel can drop them
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return max(0.0, min(1.0, (before - page_cache_bytes()) / path.stat().st_size))


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


# ---- the measurements, each in its own process (--measure) -------------------------------------------------

def measure_prepare(args) -> dict:
    sources = sorted(Path(args.sources).glob("*.jpg"))
    index = FileIndex(Path(args.sources), [sources[i % len(sources)] for i in range(args.count)])
    with PeakMemory() as memory:
        start = time.perf_counter()
        prepare(index, args.file, args.image_size, 3)
        seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "images_per_second": round(args.count / seconds), **memory.figures()}


def measure_tier(args) -> dict:
    device = resolve_device(args.device)
    cfg = Config(data=args.file, data_memory=args.tier, batch_size=args.batch_size, image_size=args.image_size,
                 channels_last=True, amp="fp16" if device.type == "cuda" else "bf16", quiet=True)
    with PeakMemory() as memory:
        start = time.perf_counter()
        loader = fastgan_loader(cfg, device)
        batches = loader_bench.epochs(loader)
        next(batches)
        sync(device)
        startup = time.perf_counter() - start
        for _ in range(args.warmup):
            next(batches)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        sync(device)
        rate = args.batches * args.batch_size / (time.perf_counter() - start)
    return {"startup_s": round(startup, 2), "images_per_second": round(rate), **memory.figures()}


def measure_step(args) -> dict:
    device = resolve_device(args.device)
    cfg = Config(batch_size=128, ngf=args.ngf, ndf=args.ngf, channels_last=True,
                 amp="fp16" if device.type == "cuda" else "bf16", quiet=True)
    real = (torch.rand(128, 3, 64, 64, device=device) * 2 - 1).to(memory_format=torch.channels_last)
    real = real.to(torch.float16 if device.type == "cuda" else torch.bfloat16)
    steps = 2 if device.type == "cpu" else 50
    figures = timed(fastgan_step(cfg, device), iter(lambda: real, None), steps, steps, 3, 128, device)
    return {"images_per_second": figures["images_per_second"], "setting": f"64x64, batch 128, {cfg.amp}, channels_last"}


MEASURES = {"prepare": measure_prepare, "tier": measure_tier, "step": measure_step}


def run_measure(kind: str, **options) -> dict:
    """One measurement in a fresh process: its JSON, or {"error": its last line}."""
    argv = [sys.executable, __file__, "--measure", kind]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the bench -----------------------------------------------------------------------------------------------

def face_sources(folder: Path, image_size: int, faces: int) -> Path:
    """`faces` synthetic faces as JPEGs at the image size (made once per folder)."""
    if len(list(folder.glob("*.jpg"))) == faces:
        return folder
    drawn = write_faces(folder / "drawn", faces)
    for path in drawn:
        Image.open(path).convert("RGB").resize((image_size, image_size)).save(folder / path.name, quality=95)
        path.unlink()
    (folder / "drawn").rmdir()
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=None, help="set sizes [10000 100000 1000000]")
    parser.add_argument("--image-size", type=int, default=32, help="pixels per side of the prepared images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=None, help="batches per tier timing [400; --quick 100]")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--ngf", type=int, default=64, help="the step's network widths (ngf = ndf); 64 is the tutorial's")
    parser.add_argument("--work", help="folder for the images and files (default: a new temporary folder, "
                                       "removed at the end; the 1M file is 3 GB at 32x32)")
    parser.add_argument("--quick", action="store_true", help="2,000 and 20,000 images")
    parser.add_argument("--faces", type=int, default=1000, help="distinct synthetic faces; a set repeats them")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--measure", choices=tuple(MEASURES), help=argparse.SUPPRESS)
    for hidden, kind in (("--count", int), ("--file", str), ("--sources", str), ("--tier", str), ("--warmup", int)):
        parser.add_argument(hidden, type=kind, help=argparse.SUPPRESS)  # a measurement's, from run_measure
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(MEASURES[args.measure](args)))
        return 0

    device = resolve_device(args.device)
    counts = args.counts or ([2_000, 20_000] if args.quick else [10_000, 100_000, 1_000_000])
    batches = args.batches or (100 if args.quick else 400)
    console = Console(width=None if sys.stdout.isatty() else 150)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"CPU, {default_workers()} cores", "torch": torch.__version__, "commit": loader_bench.commit(),
            "date": time.strftime("%Y-%m-%d"), "image_size": args.image_size, "batch_size": args.batch_size,
            "batches_per_timing": batches, "images": f"copies of {args.faces:,} synthetic faces", "step_ngf": args.ngf}
    console.print(" · ".join(f"{k} {v}" for k, v in info.items()))
    temporary = None if args.work else tempfile.TemporaryDirectory(prefix="fastgan-scale-")
    work = Path(args.work or temporary.name)
    sources = face_sources(work / f"faces{args.image_size}_{args.faces}", args.image_size, args.faces)
    results = {**info, "step": run_measure("step", device=args.device, ngf=args.ngf), "sets": []}
    console.print(f"the step consumes {results['step'].get('images_per_second', '?'):,} images/s "
                  f"({results['step'].get('setting', results['step'].get('error'))})")
    tiers = ("device", "host", "disk") if device.type == "cuda" else ("device", "disk")

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    for count in counts:
        file = work / f"set{count}_{args.image_size}.fgd"
        file.unlink(missing_ok=True)
        row = {"count": count, "prepare": run_measure("prepare", count=count, file=file, sources=sources,
                                                       image_size=args.image_size)}
        row["file_mb"] = round(file.stat().st_size / 2**20) if file.exists() else None
        console.print(f"{count:,} images: prepare {row['prepare']}")
        options = dict(file=file, image_size=args.image_size, batch_size=args.batch_size, batches=batches,
                       warmup=10, device=args.device)
        for tier in tiers:
            warm_page_cache(file)
            row[tier] = run_measure("tier", tier=tier, **options)
            console.print(f"{count:,} images: {tier} {row[tier]}")
        dropped = drop_from_page_cache(file)
        row["disk_cold"] = {**run_measure("tier", tier="disk", **options), "dropped_share": round(dropped, 2)}
        console.print(f"{count:,} images: disk, cold {row['disk_cold']}")
        results["sets"].append(row)
        save()
        file.unlink()
    print_table(console, results, tiers)
    if temporary:
        temporary.cleanup()
    return 0


def print_table(console: Console, results: dict, tiers: tuple[str, ...]) -> None:
    """A row per set and measurement: prepare, then each tier (the disk's warm and cold)."""
    step = results["step"].get("images_per_second")
    size = results["image_size"]
    table = Table(title=f"prepared data of any size, {size}x{size}" +
                        (f"; the 64x64 step consumes {step:,.0f} images/s" if step else ""))
    for column in ("images", "file MB", "", "seconds", "images/s", "x the step", "anon growth MB", "peak anon MB",
                   "peak file MB"):
        table.add_column(column, justify="left" if column == "" else "right")
    for row in results["sets"]:
        for what, label in [("prepare", "prepare"), *((t, f"{t} tier") for t in tiers), ("disk_cold", "disk, cold")]:
            m = row[what]
            if "error" in m:
                table.add_row(f"{row['count']:,}", str(row["file_mb"]), label, m["error"], *[""] * 5)
                continue
            rate = m["images_per_second"]
            table.add_row(f"{row['count']:,}", str(row["file_mb"]), label,
                          f"{m.get('seconds', m.get('startup_s')):.2f}", f"{rate:,}",
                          f"{rate / step:.0f}x" if step and what != "prepare" else "",
                          str(m["anonymous_growth_mb"]), str(m["peak_anonymous_mb"]), str(m["peak_file_backed_mb"]))
    console.print(table)
    console.print("seconds: prepare's whole run; a tier's start-up, opening the file to the first batch. "
                  "anon growth: the process's own memory over the measurement; file: mapped pages (page cache)")


if __name__ == "__main__":
    sys.exit(main())
