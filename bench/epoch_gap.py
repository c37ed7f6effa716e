"""What an epoch boundary costs each loader: the wait from the last batch of epoch e to the first of e+1.

    python bench/epoch_gap.py                   # 2,048 demo faces, 64x64, batch 128, 2 workers/threads
    python bench/epoch_gap.py --epochs 5 --step-ms 50 --json gap.json

The loop is the training loop's (set_epoch, then iterate, epoch after epoch). Each batch's arrival time is
taken when the loader hands it over (on CUDA, after synchronizing, so that it is the time the batch is
ready); --step-ms stands in for a training step between batches. The gap at each boundary is compared
with the median time between two batches inside an epoch: a gap of about 1 batch means that the boundary
costs nothing extra. The first epoch's start (builds, worker start-up) is not a boundary and is not counted.
Rows: fastgan's torch loader, DALI decoding on the CPU, DALI decoding on the GPU (where there is one).
"""
from __future__ import annotations

import argparse
import json
import platform
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastgan.data.demo import demo_faces  # noqa: E402
from fastgan.data.files import find_images  # noqa: E402
from fastgan.pipeline_dali import DaliLoader, dali_available, dali_version  # noqa: E402
from fastgan.data.pipeline_torch import TorchLoader  # noqa: E402


def epoch_boundary_gap(loader, epochs: int = 3, device: torch.device = torch.device("cpu"),
                       step_s: float = 0.0) -> dict:
    """Arrival times of every batch over `epochs` epochs -> the boundary gaps against the median interval.

    Returns gap_ms (median over the epochs - 1 boundaries), interval_ms (median time between two batches of
    the same epoch), gap_batches (their ratio), and every boundary's gap_ms."""
    if epochs < 2:
        raise ValueError("an epoch boundary needs at least 2 epochs")
    arrivals: list[list[float]] = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        times = []
        for batch in loader:
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # the batch is ready, not only promised
            times.append(time.perf_counter())
            if step_s:
                time.sleep(step_s)
        arrivals.append(times)
    intervals = [b - a for times in arrivals for a, b in zip(times, times[1:])]
    gaps = [later[0] - earlier[-1] for earlier, later in zip(arrivals, arrivals[1:])]
    interval, gap = statistics.median(intervals), statistics.median(gaps)
    return {"gap_ms": round(gap * 1e3, 2), "interval_ms": round(interval * 1e3, 2),
            "gap_batches": round(gap / interval, 2), "gaps_ms": [round(g * 1e3, 2) for g in gaps]}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for the device line beside a bench's figures."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    """The commit the figures belong to: $FASTGAN_COMMIT where set (bench/gpu_check.py sets it from its --commit,
    for a copy of the tree without git), else git's short hash."""
    if os.environ.get("FASTGAN_COMMIT"):
        return os.environ["FASTGAN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git here: set FASTGAN_COMMIT)"


def loaders(paths, size: int, batch: int, device: torch.device, workers: int):
    """(name, make) per row, make() -> a loader; or (name, "skipped: why")."""
    rows: list[tuple[str, object]] = [
        (f"fastgan torch loader, {workers} workers",
         lambda: TorchLoader(paths, size, 3, batch, device, True, workers=workers))]
    dali = dali_available()
    rows.append((f"DALI, CPU decode, {workers} threads",
                 (lambda: DaliLoader(paths, size, 3, batch, device, True, decoder="cpu", threads=workers))
                 if dali else "skipped: DALI not installed"))
    rows.append((f"DALI, GPU decode, {workers} threads",
                 (lambda: DaliLoader(paths, size, 3, batch, device, True, decoder="mixed", threads=workers,
                                     dtype=torch.float16))
                 if dali and device.type == "cuda" else
                 "skipped: " + ("no CUDA GPU" if device.type != "cuda" else "DALI not installed")))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="image folder (default: the demo faces)")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="torch loader workers and DALI threads")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per row (epochs - 1 boundaries)")
    parser.add_argument("--step-ms", type=float, default=0.0, help="a stand-in training step after each batch")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    root = Path(args.root).expanduser() if args.root else demo_faces(max(args.images, 2048))
    paths = find_images(root)[: args.images]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU", "torch": torch.__version__,
            "dali": dali_version(), "commit": commit(), "images": len(paths), "image_size": args.image_size,
            "batch_size": args.batch_size, "workers": args.workers, "epochs": args.epochs, "step_ms": args.step_ms}
    results = []
    for name, make in loaders(paths, args.image_size, args.batch_size, device, args.workers):
        if isinstance(make, str):
            results.append({"loader": name, "note": make})
            print(f"{name}: {make}")
            continue
        figures = epoch_boundary_gap(make(), args.epochs, device, args.step_ms / 1e3)
        results.append({"loader": name, **figures})
        print(f"{name}: epoch boundary {figures['gap_ms']:.1f} ms = {figures['gap_batches']:.2f} batches "
              f"(a batch inside an epoch: {figures['interval_ms']:.1f} ms; each boundary: {figures['gaps_ms']} ms)")
    print(" · ".join(f"{k} {v}" for k, v in info.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
