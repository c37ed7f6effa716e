"""A torch.profiler summary of the best mode's training step, to decide the next speed work: what the step spends its
time on, and how far it is from the FLOP floor.

    python bench/profile_step.py --data faces.fgd --json out.json   # CUDA: compile, graphs, bf16, channels_last
    python bench/profile_step.py --data tiny.fgd --device cpu --image-size 16 --batch-size 16 --ngf 8 --ndf 8 --nz 16

The step is built as `fastgan train --data FILE` builds it for that mode (the prepared loader in device memory,
its batches gathered inside the graph), warmed up (compile, capture), timed without the profiler (the median of
three timings), then profiled over --steps steps. Reported, per step: the kernels launched on the GPU (those the
graph replays included; on the CPU, the aten operators run), the 15 longest by their time, the time per kind of
work (convolutions, batch norm, fused elementwise code, Adam, random numbers, copies, the rest), the step's time and
its share of the FLOP floor (bench/flops.py's count; H100/H200: 800 TFLOP/s bf16). Where the profiler sees no
kernel inside the graph's replays (CUPTI versions differ), the same step is profiled launched without the graph,
and the summary says so. Phases of the step (D's update, G's) are not told apart: inside a graph only kernels are
seen, and their kinds say more about what to speed up.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loaders as loader_bench  # noqa: E402
from flops import step_flop_per_image  # noqa: E402
from loaders import sync  # noqa: E402
from throughput import PEAK_TFLOPS, fastgan_data, fastgan_step  # noqa: E402
from fastgan.config import Config  # noqa: E402
from fastgan.distributed import resolve_device  # noqa: E402
from fastgan.errors import FastganError  # noqa: E402

LONGEST = 15
# (kind, pattern on the lower-cased kernel or operator name), the first that matches
KINDS = [
    ("convolutions", r"conv|cudnn|xmma|implicit_gemm|cutlass|gemm|wgrad|dgrad|fprop|mkldnn|onednn"),
    ("batch norm", r"batch_norm|batchnorm|bn_fw|bn_bw"),
    ("Adam", r"adam|multi_tensor|foreach"),
    ("random numbers", r"randn|philox|normal_|random|uniform"),
    ("copies and gathers", r"copy|memcpy|memset|index|gather|\bcat\b|fill"),
    ("fused elementwise (torch.compile)", r"^triton|^cpp_fused|fused"),
    ("other elementwise and reductions", r"."),
]


def kind_of(name: str) -> str:
    lower = name.lower()
    return next(kind for kind, pattern in KINDS if re.search(pattern, lower))


def profile(step, batches, steps: int, device: torch.device) -> dict:
    """{name: [count, microseconds]} over `steps` steps: kernels on a GPU (their own time), aten operators on the
    CPU (their self time: nested operators are not counted twice)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step(next(batches))
        sync(device)
    found: dict = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if device.type == "cuda":
            if event.device_type != DeviceType.CUDA:
                continue
            micros = event.time_range.elapsed_us()
        else:
            if not event.name.startswith("aten::"):
                continue
            micros = event.self_cpu_time_total
        found[event.name][0] += 1
        found[event.name][1] += micros
    return found


def summary(found: dict, steps: int, unit: str) -> dict:
    total = sum(us for _, us in found.values())
    kinds: dict = defaultdict(float)
    for name, (_, us) in found.items():
        kinds[kind_of(name)] += us
    longest = sorted(found.items(), key=lambda item: -item[1][1])[:LONGEST]
    return {
        "unit": unit,
        "kernels_per_step": round(sum(count for count, _ in found.values()) / steps, 1),
        "busy_ms_per_step": round(total / steps / 1e3, 4),
        "kinds": [{"kind": kind, "ms_per_step": round(us / steps / 1e3, 4), "share": round(us / total, 4)}
                  for kind, us in sorted(kinds.items(), key=lambda item: -item[1])] if total else [],
        "longest": [{"name": name[:160], "per_step": round(count / steps, 2), "ms_per_step": round(us / steps / 1e3, 4),
                     "kind": kind_of(name)} for name, (count, us) in longest],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a prepared file (fastgan prepare)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--image-size", type=int, default=64, help="the prepared file's size [64]")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--ndf", type=int, default=64)
    parser.add_argument("--nz", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="steps profiled and timed [CUDA 20, CPU 3]")
    parser.add_argument("--no-compile", action="store_true", help="CUDA: the mode without torch.compile")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak [H100, H200: 800]")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except FastganError as e:
        print(f"profile: {e}", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    # the best mode as gpu_check's train-best runs it; on the CPU channels_last in fp32 (fast on any CPU)
    cfg = Config(data=args.data, image_size=args.image_size, batch_size=args.batch_size, ngf=args.ngf, ndf=args.ndf,
                 nz=args.nz, channels_last=True, amp="bf16" if cuda else "off", compile=cuda and not args.no_compile,
                 cuda_graphs=cuda, quiet=True)
    steps = args.steps or (20 if cuda else 3)
    if cuda:
        torch.backends.cudnn.benchmark = True  # as fastgan train sets it
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if cuda and k in name), None)
    flop = step_flop_per_image(args.nz, args.ngf, args.ndf, 3, args.image_size)

    def build(config: Config):
        data = fastgan_data(config, device)
        return fastgan_step(config, device, data), loader_bench.epochs(data.loader)

    step, batches = build(cfg)
    start = time.perf_counter()
    for _ in range(max(steps, 5)):  # compile, capture, cuDNN's autotuning
        step(next(batches))
    sync(device)
    warmup_s = time.perf_counter() - start
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            step(next(batches))
        sync(device)
        timings.append((time.perf_counter() - start) / steps)
    step_s = statistics.median(timings)
    found = profile(step, batches, steps, device)
    note = ""
    if cuda and not found:  # no kernel reported inside the graph's replays: the same step, launched one by one
        note = ("the profiler saw no kernel inside the CUDA graph's replays here: the kernels are those of the same "
                "step launched without the graph")
        step, batches = build(Config(**{**cfg.__dict__, "cuda_graphs": False}))
        for _ in range(5):
            step(next(batches))
        found = profile(step, batches, steps, device)
    figures = {"device": name, "torch": torch.__version__, "commit": loader_bench.commit(),
               "date": time.strftime("%Y-%m-%d"),
               "mode": {k: getattr(cfg, k) for k in ("amp", "channels_last", "compile", "cuda_graphs")},
               "image_size": args.image_size, "batch_size": args.batch_size, "steps_profiled": steps,
               "warmup_s": round(warmup_s, 2), "step_ms": round(step_s * 1e3, 4),
               "images_per_second": round(args.batch_size / step_s, 1), "gflop_per_image": round(flop / 1e9, 4),
               "fraction_of_flop_floor": round(args.batch_size * flop / step_s / (peak * 1e12), 4) if peak else None,
               "note": note, **summary(found, steps, "kernel" if cuda else "operator")}
    print(f"{name}, {figures['mode']}: {figures['step_ms']:.3f} ms a step, {figures['images_per_second']:,.0f} "
          f"images/s, {figures['kernels_per_step']:,.0f} {figures['unit']}s a step, busy "
          f"{figures['busy_ms_per_step']:.3f} ms" + (f", {figures['fraction_of_flop_floor']:.1%} of the FLOP floor"
                                                     if peak else ""))
    if note:
        print(f"note: {note}")
    for row in figures["kinds"]:
        print(f"  {row['kind']:36s} {row['ms_per_step']:9.3f} ms  {row['share']:6.1%}")
    print(f"the {len(figures['longest'])} longest:")
    for row in figures["longest"]:
        print(f"  {row['ms_per_step']:9.3f} ms  x{row['per_step']:<5g} {row['kind']:20s} {row['name'][:90]}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
