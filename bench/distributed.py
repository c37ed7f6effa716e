"""`fastgan train` in one process against the same run under torchrun with N processes, on the same images with
the same total batch: images/s per process and in all, read from each run's metrics.jsonl.

    python bench/distributed.py                  # the demo preset, 2 epochs, 2 processes
    python bench/distributed.py --nproc 2 --epochs 3 --json ddp.json

On a GPU machine each process takes one GPU (NCCL); on the CPU they are gloo processes, and the one-process run
gets all the cores as torch threads while each of the N processes gets cores / N, so both use the same cores.
Intervals of the first epoch are left out (warm-up); the figure is the median of the rest.
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
from fastgan.data.files import default_workers  # noqa: E402
from loaders import commit  # noqa: E402


def run(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench: {' '.join(command[:6])} ... failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def rates(run_folder: Path) -> tuple[float, float]:
    """(median images/s in all, median per process) over the intervals after the first epoch."""
    records = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    later = [r for r in records if r["epoch"] > 1] or records
    total = statistics.median(r["images_per_second"] for r in later)
    per_rank = statistics.median(r.get("images_per_second_per_rank", r["images_per_second"]) for r in later)
    return total, per_rank


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes under torchrun")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--root", help="image folder (default: the demo faces, with the demo preset)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="further fastgan train flags, after --")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    cores = default_workers()
    cuda = torch.cuda.is_available()
    out = Path(tempfile.mkdtemp(prefix="fastgan-ddp-bench-"))
    flags = ["--epochs", str(args.epochs), "--quiet", "--workers", "0" if not cuda else str(max(1, cores // args.nproc)),
             *(["--root", args.root] if args.root else []), *(["--device", "cpu"] if not cuda else []), *extra]
    threads = {"OMP_NUM_THREADS": str(cores)}
    single_s = run([sys.executable, "-m", "fastgan", "train", *flags, "--out", str(out / "single")], threads)
    threads = {"OMP_NUM_THREADS": str(max(1, cores // args.nproc))}
    ddp_s = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
                 "-m", "fastgan", "train", *flags, "--out", str(out / "ddp")], threads)
    single, _ = rates(out / "single")
    total, per_rank = rates(out / "ddp")
    config = json.loads((out / "ddp" / "config.json").read_text())

    info = {"device": torch.cuda.get_device_name() if cuda else f"CPU, {cores} cores", "torch": torch.__version__,
            "commit": commit(), "date": time.strftime("%Y-%m-%d"), "image_size": config["image_size"],
            "ngf": config["ngf"], "batch_size": config["batch_size"], "epochs": args.epochs}
    results = {"single_images_per_second": round(single, 1), "single_wall_s": round(single_s, 1),
               "nproc": args.nproc, "ddp_images_per_second": round(total, 1),
               "ddp_images_per_second_per_rank": round(per_rank, 1), "ddp_wall_s": round(ddp_s, 1),
               "scaling": round(total / single, 3)}
    console = Console()
    table = Table(title=f"fastgan train, {config['image_size']}x{config['image_size']}, ngf {config['ngf']}, "
                        f"total batch {config['batch_size']}, {args.epochs} epochs")
    for column in ("run", "images/s in all", "images/s per process", "wall (s)"):
        table.add_column(column, justify="left" if column == "run" else "right")
    table.add_row("one process", f"{single:,.0f}", f"{single:,.0f}", f"{single_s:.1f}")
    table.add_row(f"torchrun, {args.nproc} processes", f"{total:,.0f}", f"{per_rank:,.0f}", f"{ddp_s:.1f}")
    console.print(table)
    console.print(f"scaling {total / single:.2f}x · " + " · ".join(f"{k} {v}" for k, v in info.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({**info, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
