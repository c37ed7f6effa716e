"""How long fastgan.metrics.swd takes: the sliced Wasserstein distance of two sets of random uint8 images, ProGAN's recipe.

    python bench/swd_speed.py                  # 16,384 real and 16,384 fake 64x64 images (ProGAN's count)
    python bench/swd_speed.py --runs 3         # three timed runs and their median (a shared machine varies)
    python bench/swd_speed.py --n 2048 --threads 1 --json swd.json

The work (pyramid, 128 neighbourhoods per image and level, 512 sorted projections of N x 128 descriptors per
level and side) depends on the shapes only, but for gap_sum's: it sorts the values where the two sets'
distribution functions cross, which they do most often when both sets come from one distribution, as two sets of
random images do. So this is SWD's slow case; a generator's images against real ones cost no more. Timed runs
without warm-up: at full size each takes a minute and start-up costs nothing worth subtracting. Prints each run's
total and the seconds of each level (the time between progress calls), the figures, and the device, versions and
commit beside them.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epoch_gap import commit, cpu_name  # noqa: E402
from fastgan.metrics.swd import DEFAULT_IMAGES, DIRECTION_REPEATS, sliced_wasserstein_distance, swd_resolutions  # noqa: E402


def random_images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=DEFAULT_IMAGES, help="images per set (real and fake)")
    parser.add_argument("--size", type=int, default=64, help="image side in px")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads and sort threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the projections and sorts run: cpu or cuda [cpu]")
    parser.add_argument("--runs", type=int, default=1, help="timed runs, each printed; the median is reported [1]")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs takes a count of at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    real, fake = random_images(args.n, args.size, seed=1), random_images(args.n, args.size, seed=2)
    resolutions = swd_resolutions(args.size)
    runs = []
    for run in range(args.runs):
        stamps = []
        start = time.perf_counter()
        figures = sliced_wasserstein_distance(real, fake, seed=args.seed, device=args.device,
                                              progress=lambda k: stamps.append(time.perf_counter()))
        seconds = time.perf_counter() - start
        level_ends = [stamps[(i + 1) * DIRECTION_REPEATS - 1] for i in range(len(resolutions))]
        level_seconds = {f"swd{res}": round(end - begin, 1)
                         for res, begin, end in zip(resolutions, [start] + level_ends, level_ends)}
        runs.append({"seconds": round(seconds, 1), "level_seconds": level_seconds})
        print(f"run {run + 1}: SWD of {args.n:,} + {args.n:,} {args.size}x{args.size} images: {seconds:.1f} s "
              f"({', '.join(f'{k} {v} s' for k, v in level_seconds.items())})", flush=True)
    seconds = float(np.median([run["seconds"] for run in runs]))
    result = {
        "images_per_set": args.n, "size": args.size, "seconds": round(seconds, 1), "runs": runs,
        "figures": {key: round(value, 3) for key, value in figures.items()},
        "device": (f"{torch.cuda.get_device_name()} (descriptors on {cpu_name()})" if args.device != "cpu" else
                   f"{cpu_name()}, {torch.get_num_threads()} threads (of {torch.multiprocessing.cpu_count()} CPUs)"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "commit": commit(),
    }
    if args.runs > 1:
        print(f"median of {args.runs} runs: {seconds:.1f} s (fastest {min(run['seconds'] for run in runs):.1f} s)")
    print("figures: " + ", ".join(f"{k} {v:.3f}" for k, v in result["figures"].items()))
    print(f"device: {result['device']}; python {platform.python_version()}, torch {torch.__version__}, "
          f"numpy {np.__version__}; commit {result['commit']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
