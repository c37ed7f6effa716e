"""fastgan's speed against the PyTorch DCGAN tutorial, measured in one run on whatever device is present.

    python bench/throughput.py                  # demo faces (CelebA-sized JPEGs), 64x64, batch 128
    python bench/throughput.py --quick          # smaller, for a first look
    python bench/throughput.py --root ~/celeba --json results.json

Three tables:
  1. loaders: images/s delivered as training batches (bench/loaders.py's rows, plus a prepared file in memory);
  2. the training step on a batch already on the device: the tutorial's own step (Sigmoid + BCELoss, four
     .item() calls) as the baseline, then fastgan's step with each ingredient added in turn;
  3. end to end on the same images: the tutorial's loader + step against fastgan's prepared data + fastest
     step, with the ratio.
Every row warms up, synchronizes, and reports the median of --repeats timings; rows that cannot run here say
why. Device, versions and commit are printed beside the numbers and written with them to --json.
"""
from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loaders as loader_bench  # noqa: E402
from fastgan.config import Config  # noqa: E402
from fastgan.demo import demo_faces  # noqa: E402
from fastgan.files import default_workers, index_images  # noqa: E402
from fastgan.graphs import GraphedStep  # noqa: E402
from fastgan.loop import build_models, build_optimizers, resolve_precision  # noqa: E402
from fastgan.pipeline_dali import dali_version  # noqa: E402
from fastgan.prepared import PreparedLoader, load_pixels, prepare  # noqa: E402
from fastgan.step import train_step  # noqa: E402
from fastgan.tutorial import TutorialDiscriminator, TutorialGenerator, tutorial_loader, tutorial_step  # noqa: E402

GFLOP_PER_IMAGE = 2.4  # one 64x64 DCGAN step, forward and backward of both networks (DESIGN.md: 2.3-2.5)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # note: the timing needs the device to have finished


def timed(run_steps, steps: int, repeats: int, batch: int, device: torch.device) -> float:
    """Median images/s of `repeats` timings of `steps` calls, after a warm-up of `steps` calls."""
    run_steps(steps)
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run_steps(steps)
        sync(device)
        rates.append(steps * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def tutorial_stepper(cfg: Config, device: torch.device):
    """step(real): the tutorial's own step, with its networks and Adam, drawing its noise as it does."""
    torch.manual_seed(cfg.seed)
    netG = TutorialGenerator(cfg.nz, cfg.ngf, cfg.nc).to(device)
    netD = TutorialDiscriminator(cfg.ndf, cfg.nc).to(device)
    optD = torch.optim.Adam(netD.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    optG = torch.optim.Adam(netG.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    return lambda real: tutorial_step(netG, netD, optG, optD, real,
                                      torch.randn(real.shape[0], cfg.nz, 1, 1, device=device))


def fastgan_stepper(cfg: Config, device: torch.device, compile: bool = False, graphs: bool = False):
    """step(real): fastgan's step as `fastgan train` builds it for cfg (statistics copied out, as the loop does)."""
    torch.manual_seed(cfg.seed)
    netG, netD = build_models(cfg, device)
    optG, optD = build_optimizers(cfg, netG, netD, capturable=graphs)
    precision = resolve_precision(cfg.amp, device, cuda_graphs=graphs)
    stepG, stepD = (torch.compile(netG), torch.compile(netD)) if compile else (netG, netD)
    step = functools.partial(train_step, stepG, stepD, optG, optD, autocast=precision.autocast,
                             scaler=precision.scaler)
    if graphs:
        step = GraphedStep(step, (netG, netD), (optG, optD), precision.scaler)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    stats = torch.zeros(5, device=device)

    def run(real):
        noise = torch.randn(real.shape[0], cfg.nz, 1, 1, device=device)
        stats.copy_(step(real.contiguous(memory_format=memory_format), noise))
    return run


def forever(batches):
    """Batches from a loader, epoch after epoch (a loader made once, as in training)."""
    while True:
        yield from batches()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", help="image folder (default: the demo faces)")
    parser.add_argument("--quick", action="store_true", help="fewer images, smaller batches, fewer repeats")
    parser.add_argument("--images", type=int, default=None, help="images for the loader and end-to-end rows")
    parser.add_argument("--batch-size", type=int, default=None, help="[128; --quick 32]")
    parser.add_argument("--ngf", type=int, default=64, help="network widths (ngf = ndf); 64 is the tutorial's")
    parser.add_argument("--steps", type=int, default=None, help="steps per timing [CPU 3, GPU 50; --quick 2]")
    parser.add_argument("--repeats", type=int, default=None, help="timings per row, the median is reported [3]")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak matrix TFLOP/s, to report steps against the FLOP floor "
                             "[H100: 800 bf16]")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    batch = args.batch_size or (32 if args.quick else 128)
    steps = args.steps or (2 if args.quick else (50 if gpu else 3))
    repeats = args.repeats or (2 if args.quick else 3)
    n_images = args.images or (512 if args.quick else 2048)
    peak = args.peak_tflops or (800.0 if gpu and "H100" in torch.cuda.get_device_name() else None)
    if gpu:
        torch.backends.cudnn.benchmark = True
    console = Console()
    info = {"device": torch.cuda.get_device_name() if gpu else f"CPU, {default_workers()} cores",
            "torch": torch.__version__, "dali": dali_version(), "commit": loader_bench.commit(),
            "date": time.strftime("%Y-%m-%d"), "image_size": 64, "batch_size": batch, "ngf": args.ngf,
            "steps_per_timing": steps, "repeats": repeats, "images": n_images}
    console.print(" · ".join(f"{k} {v}" for k, v in info.items()))

    # ---- data: the same images for every row
    root = Path(args.root).expanduser() if args.root else demo_faces(max(n_images, 2048))
    paths = index_images(root).good[:n_images]
    work = Path(tempfile.mkdtemp(prefix="fastgan-bench-"))
    folder = work / "images" / "faces"  # the tutorial's ImageFolder layout, as links to these files
    folder.mkdir(parents=True)
    for p in paths:
        (folder / p.name).symlink_to(p)
    prepared_file = prepare(index_images(folder.parent), work / "images.fgd", 64, 3)
    pixels, _ = load_pixels(prepared_file, 64, 3)

    # ---- 1. loaders
    cores = default_workers()
    loader_rows = loader_bench.loader_rows(paths, folder, 64, batch, device, [cores], [0.65])
    loader_rows.append(("prepared file in memory (fastgan train --data)",
                        lambda: (lambda l: (iter(l), len(l)))(PreparedLoader(pixels, batch, device, True))))
    results = {"loaders": [], "steps": [], "end_to_end": []}
    for name, make in loader_rows:
        rate = None if isinstance(make, str) else loader_bench.measure(make, batch, repeats, device)
        results["loaders"].append({"row": name, "images_per_second": rate and round(rate, 1),
                                   "note": make if isinstance(make, str) else ""})
        console.print(f"loader  {name}: " + (f"{rate:,.0f} images/s" if rate else make))

    # ---- 2. the step, on a batch already on the device
    base = Config(batch_size=batch, ngf=args.ngf, ndf=args.ngf)
    real = torch.rand(batch, 3, 64, 64, device=device) * 2 - 1
    amp = "fp16" if gpu else "bf16"  # what --amp picks on this device
    last = dict(base.to_dict(), channels_last=True)
    step_rows = [
        ("tutorial step: eager fp32, Sigmoid + BCELoss, 4 .item() per step", lambda: tutorial_stepper(base, device)),
        ("fastgan step, eager fp32 (logits, no host sync, fused Adam, no D grads in G's update)",
         lambda: fastgan_stepper(base, device)),
        ("+ channels_last", lambda: fastgan_stepper(Config(**last), device)),
        (f"+ AMP ({amp})", lambda: fastgan_stepper(Config(**{**last, "amp": amp}), device)),
    ]
    if not args.no_compile:
        step_rows += [
            ("+ compile (fp32, channels_last)", lambda: fastgan_stepper(Config(**last), device, compile=True)),
            (f"+ compile ({amp}, channels_last)",
             lambda: fastgan_stepper(Config(**{**last, "amp": amp}), device, compile=True)),
        ]
    step_rows.append(("+ CUDA graphs (bf16, channels_last)",
                      (lambda: fastgan_stepper(Config(**{**last, "amp": "bf16"}), device, graphs=True))
                      if gpu else "skipped: no CUDA GPU"))
    best_name, best_make, best_rate = None, None, 0.0
    for name, make in step_rows:
        if isinstance(make, str):
            results["steps"].append({"row": name, "images_per_second": None, "note": make})
            console.print(f"step    {name}: {make}")
            continue
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        step = make()
        rate = timed(lambda n: [step(real) for _ in range(n)], steps, repeats, batch, device)
        row = {"row": name, "images_per_second": round(rate, 1),
               "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20) if gpu else None}
        if peak:
            row["fraction_of_flop_floor"] = round(rate * GFLOP_PER_IMAGE / (peak * 1e3), 4)
        results["steps"].append(row)
        if not name.startswith("tutorial") and rate > best_rate:
            best_name, best_make, best_rate = name, make, rate
        console.print(f"step    {name}: {rate:,.1f} images/s")

    # ---- 3. end to end on the same images: the tutorial's loader + step; prepared data + the fastest step
    def end_to_end(batches, step):
        def run(n):
            for _, images in zip(range(n), batches):
                step(images.to(device, non_blocking=True))
        return run

    tutorial_batches = forever(lambda: (x for x, _ in tutorial_loader(folder.parent, 64, batch, 2)))
    tutorial_rate = timed(end_to_end(tutorial_batches, tutorial_stepper(base, device)), steps, repeats, batch,
                          device)
    prepared_batches = forever(lambda: iter(PreparedLoader(pixels, batch, device, channels_last=True)))
    fastgan_rate = timed(end_to_end(prepared_batches, best_make()), steps, repeats, batch, device)
    results["end_to_end"] = [
        {"row": "tutorial: ImageFolder DataLoader (2 workers) + the tutorial's step",
         "images_per_second": round(tutorial_rate, 1)},
        {"row": f"fastgan: prepared data in memory + step '{best_name}'", "images_per_second": round(fastgan_rate, 1)},
    ]
    console.print(f"end to end: tutorial {tutorial_rate:,.1f}, fastgan {fastgan_rate:,.1f} images/s")

    # ---- tables
    for title, rows, base_rate in [("loaders (images/s)", results["loaders"], results["loaders"][0]["images_per_second"]),
                                   ("training step, data on the device (images/s)", results["steps"],
                                    results["steps"][0]["images_per_second"]),
                                   ("end to end, same images (images/s)", results["end_to_end"], tutorial_rate)]:
        table = Table(title=title)
        table.add_column("")
        table.add_column("images/s", justify="right")
        table.add_column("vs tutorial", justify="right")
        for r in rows:
            rate = r["images_per_second"]
            table.add_row(r["row"], f"{rate:,.1f}" if rate else r.get("note", ""), f"{rate / base_rate:.2f}x" if rate else "")
        console.print(table)
    ratio = fastgan_rate / tutorial_rate
    console.print(f"end to end: fastgan {ratio:.2f}x the tutorial · peak host memory "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB · "
                  + " · ".join(f"{k} {v}" for k, v in info.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({**info, **results, "end_to_end_ratio": round(ratio, 3)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
