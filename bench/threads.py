"""torch's CPU threads for training: each candidate as a whole `fastgan train` process, quiet and beside busy loops.

    python bench/threads.py                              # the demo, 1 epoch; default, 1 thread, a thread per core
    python bench/threads.py --repeats 5 --epochs 2 --json threads.json
    python bench/threads.py --candidate "passive:OMP_WAIT_POLICY=PASSIVE --threads 2" --candidate "default:"

Why: torch's OpenMP threads wait for each other at the end of every parallel region (thousands per step), and
between regions they spin. Where other programs take the cores, a thread that the scheduler has put aside holds
up the others until its next turn, and the spinning ones burn the time that the others need, so a team of a
thread per core can train several times slower than one thread. This bench measures that on the machine it runs
on, for each candidate thread setting.

Each candidate is a label, environment variables (NAME=VALUE, read before torch starts) and `fastgan train`
arguments, e.g. "1 thread:--threads 1". Without --candidate: fastgan's default (torch's count, one per core,
sleeping while they wait), --threads 1, and the same threads spinning while they wait as OpenMP (libgomp) has them
by default and fastgan had them before (GOMP_SPINCOUNT=300000, its default count, in place of the sleeping policy
fastgan sets). Every run is a whole process, `python -m fastgan train` on the demo faces
(cache decoded before the first timed run) with --epochs, timed from its start to its exit; its training images/s
is its own closing line's. Conditions: quiet (nothing started by this bench), and loaded: one busy-loop process
pinned to each core (--busy), started before the run and killed after it, as other programs on a shared machine.
Each repeat runs every candidate once in each condition, in a rotated order (paired: a drift in the machine's speed
falls on all candidates alike); the table gives medians, and each candidate's ratio to the first one, the median
of the per-repeat ratios. The machine's load average before and after is printed: other work on the cores
disturbs the quiet figures, so rerun when it is not near 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_gap import commit, cpu_name  # noqa: E402

TRAINED = re.compile(r"trained ([\d,]+) images in (?:(\d+)m)?([\d.]+)s")
CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
BUSY_LOOP = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def parse_candidate(text: str) -> tuple[str, dict, list]:
    """'label:NAME=VALUE ... --flag value ...' -> (label, environment, fastgan train arguments)."""
    label, _, rest = text.partition(":")
    env, args = {}, []
    for word in shlex.split(rest):
        name, equals, value = word.partition("=")
        if equals and not args and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
            env[name] = value
        else:
            args.append(word)
    return label, env, args


def cpu_flags() -> str:
    """The bf16 flags the CPU reports (/proc/cpuinfo), for the machine line."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "flags unknown"
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (("avx512f, " if "avx512f" in flags else "no avx512f, ")
            + (", ".join(bf16) if bf16 else "no avx512_bf16/amx_bf16"))


def start_busy_loops(cores: list[int]) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(core)]) for core in cores]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
    for process in processes:
        process.wait()


def run_once(env: dict, args: list, epochs: int, work: Path) -> dict:
    out = tempfile.mkdtemp(prefix="run-", dir=work)
    argv = [sys.executable, "-m", "fastgan", "train", "--epochs", str(epochs), "--quiet", "--out", out, *args]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env},
                          cwd=Path(__file__).resolve().parents[1])
    whole = time.perf_counter() - start
    said = " ".join((done.stdout + done.stderr).split())
    match = TRAINED.search(said)
    if done.returncode or not match:
        raise SystemExit(f"{' '.join(argv)} failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    images = int(match.group(1).replace(",", ""))
    training = int(match.group(2) or 0) * 60 + float(match.group(3))
    return {"whole_s": whole, "training_images_per_second": images / training}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--candidate", action="append", metavar="'LABEL:[NAME=VALUE ...] [ARGS ...]'",
                        help="a thread setting to measure (repeatable); the first is the yardstick [fastgan's "
                             "default, --threads 1, and torch's spinning threads as fastgan had them before]")
    parser.add_argument("--epochs", type=int, default=1, help="demo epochs per run (4,096 images each)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each candidate in each condition")
    parser.add_argument("--busy", type=int, default=len(CORES), help="busy-loop processes when loaded, one per core")
    parser.add_argument("--conditions", nargs="+", choices=("quiet", "loaded"), default=["quiet", "loaded"])
    parser.add_argument("--json", help="write every run's figures here")
    args = parser.parse_args()
    candidates = [parse_candidate(c) for c in args.candidate or
                  ["default:", "1 thread:--threads 1", "spinning (before 2026-12):GOMP_SPINCOUNT=300000"]]
    import torch
    machine = {"cpu": cpu_name(), "flags": cpu_flags(), "cores": len(CORES), "python": platform.python_version(),
               "torch": torch.__version__, "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "load_before": os.getloadavg()}
    print(" · ".join(f"{k} {v}" for k, v in machine.items()), flush=True)
    work = Path(tempfile.mkdtemp(prefix="fastgan-threads-"))
    run_once(*candidates[0][1:], 1, work)  # draws and decodes the demo faces once, outside the timings
    runs = {condition: {label: [] for label, _, _ in candidates} for condition in args.conditions}
    for repeat in range(args.repeats):
        order = candidates[repeat % len(candidates):] + candidates[:repeat % len(candidates)]
        for condition in args.conditions:
            for label, env, extra in order:
                busy = start_busy_loops(CORES[i % len(CORES)] for i in range(args.busy)) \
                    if condition == "loaded" else []
                try:
                    figures = run_once(env, extra, args.epochs, work)
                finally:
                    stop(busy)
                runs[condition][label].append(figures)
                print(f"  repeat {repeat + 1} {condition:6} {label:24} {figures['whole_s']:7.1f} s whole, "
                      f"{figures['training_images_per_second']:7.0f} images/s training", flush=True)
    machine["load_after"] = os.getloadavg()
    yardstick = candidates[0][0]
    print(f"\nmedians of {args.repeats} ({args.epochs} demo epoch{'s' if args.epochs > 1 else ''} per run); "
          f"ratio: whole seconds against '{yardstick}', pair by pair; load average after {machine['load_after']}")
    print(f"| condition | candidate | whole process, s | training, images/s | time vs {yardstick} |")
    print("|---|---|---:|---:|---:|")
    for condition, by_label in runs.items():
        for label, figures in by_label.items():
            ratios = [f["whole_s"] / y["whole_s"] for f, y in zip(figures, by_label[yardstick])]
            print(f"| {condition} | {label} | {statistics.median(f['whole_s'] for f in figures):.1f} | "
                  f"{statistics.median(f['training_images_per_second'] for f in figures):,.0f} | "
                  f"{statistics.median(ratios):.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "epochs": args.epochs, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
