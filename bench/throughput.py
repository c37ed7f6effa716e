"""fastgan's speed against the PyTorch DCGAN tutorial, measured in one run on whatever device is present.

    python bench/throughput.py                  # demo faces (CelebA-sized JPEGs), 64x64, batch 128
    python bench/throughput.py --quick          # smaller, for a first look
    python bench/throughput.py --root ~/celeba --json results.json

Three tables:
  1. loaders: start-up (a fresh loader to its first batch) and steady images/s delivered as training batches
     (bench/loaders.py's rows, plus a prepared file in memory), each loader built once and read epoch after
     epoch;
  2. the training step on a batch already on the device: the tutorial's own step (Sigmoid + BCELoss, four
     .item() calls) as the baseline, then fastgan's step with each ingredient added in turn (channels_last,
     AMP, CUDA graphs; torch.compile has its rows in table 3);
  3. end to end on the same images, the rows a user runs: the tutorial (its ImageFolder loader and eager fp32
     step) against fastgan's prepared data with each step variant (on CUDA: compile, CUDA graphs and both,
     in fp16 and in bf16), and DALI decoding (on the GPU where there is one) with the best of them. Each
     loader is built once, outside the timing, and read epoch after epoch as `fastgan train` reads it.
     The best row is named, and on a GPU whether it meets the targets (45,000 images/s end to end and
     25x the tutorial; stretch 85,000).
They are measured in the order 3, 2, 1, so that a run cut short (bench/gpu_check.py caps it) has the headline.
On a GPU each row also reports its peak device memory and its share of the FLOP floor (--peak-tflops; the FLOPs of
a step are counted from the model by bench/flops.py). On a GPU the fp32 rows run their convolutions in TF32, as
torch does by default (torch.backends.cudnn.allow_tf32), and say so. A row that fails records its error and the
bench goes on; every compiled row starts from a fresh torch.compile state, and a recompile limit hit fails the row
rather than letting it run uncompiled.
fastgan's loaders and steps are built by the functions `fastgan train` builds them with (data.open_data and
trainer.build_trainer), so the bench measures what users run. Every row warms up, synchronizes, and reports
the median of --repeats timings; rows that cannot run here say why. Device, versions and commit are printed
beside the numbers and written with them to --json.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loaders as loader_bench  # noqa: E402
from flops import step_flop_per_image  # noqa: E402
from loaders import sync  # noqa: E402
from fastgan.config import HW_DECODER_LOAD, Config  # noqa: E402
from fastgan.data.demo import demo_faces  # noqa: E402
from fastgan.errors import FastganError  # noqa: E402
from fastgan.data.files import default_workers, index_images  # noqa: E402
from fastgan.data import Data, open_data, resolve_loader  # noqa: E402
from fastgan.distributed import resolve_device  # noqa: E402
from fastgan.pipeline_dali import dali_version  # noqa: E402
from fastgan.data.prepared import prepare  # noqa: E402
from fastgan.trainer import build_trainer, resolve_precision  # noqa: E402
from fastgan.tutorial import TutorialDiscriminator, TutorialGenerator, tutorial_loader, tutorial_step  # noqa: E402

# dense bf16/fp16 matrix TFLOP/s, the figure the project's targets count with; the H200 is the H100's chip with
# more memory
PEAK_TFLOPS = {"H100": 800.0, "H200": 800.0}
SPEED_SETTINGS = ("amp", "channels_last", "compile", "cuda_graphs", "loader", "dali_decoder")  # in --json
TARGET_IMAGES_PER_SECOND, TARGET_RATIO, STRETCH_IMAGES_PER_SECOND = 45_000, 25.0, 85_000  # one GPU


def tutorial_stepper(cfg: Config, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """step(batch): the tutorial's own step, with its networks and Adam, drawing its noise as it does; the
    batch goes to the device first, as the tutorial's loop moves each one (`data[0].to(device)`)."""
    torch.manual_seed(cfg.seed)
    netG = TutorialGenerator(cfg.nz, cfg.ngf, cfg.nc).to(device)
    netD = TutorialDiscriminator(cfg.ndf, cfg.nc).to(device)
    optD = torch.optim.Adam(netD.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    optG = torch.optim.Adam(netG.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    return lambda batch: tutorial_step(netG, netD, optG, optD, batch.to(device),
                                       torch.randn(batch.shape[0], cfg.nz, 1, 1, device=device))


def fastgan_step(cfg: Config, device: torch.device, data: Optional[Data] = None,
                 in_graph: bool = True) -> Callable[[Optional[torch.Tensor]], torch.Tensor]:
    """step(batch) -> statistics: fastgan's step exactly as `fastgan train` runs it for cfg (compile,
    channels_last, amp, cuda_graphs). Given the run's data, prepared data in device memory under cuda_graphs is
    gathered inside the graph (its loader then yields placeholders), as in training, unless `in_graph` is False:
    then each batch is copied into the graph, as the other loaders' are."""
    feed = data.graph_feed if data is not None and in_graph else None
    return build_trainer(cfg, device, resolve_precision(cfg.amp, device, cfg.cuda_graphs), graph_feed=feed)


def fastgan_data(cfg: Config, device: torch.device) -> Data:
    """The data `fastgan train` opens for cfg (prepared data for cfg.data, else image files in cfg.root)."""
    precision = resolve_precision(cfg.amp, device, cfg.cuda_graphs)
    return open_data(cfg, device, precision.dtype, *resolve_loader(cfg, device))


def fastgan_loader(cfg: Config, device: torch.device):
    """The loader `fastgan train` builds for cfg."""
    return fastgan_data(cfg, device).loader


def timed(step, batches: Iterator, steps: int, warmup: int, repeats: int, batch: int, device: torch.device) -> dict:
    """Median images/s of `repeats` timings of `steps` steps on `batches`, after `warmup` steps (which hold
    torch.compile's compilation and the CUDA graph's capture: their seconds are reported as warmup_s)."""
    sink = None  # the statistics are added up on their device, as the training loop's log interval does

    def run(n: int) -> None:
        nonlocal sink
        for _ in range(n):
            stats = step(next(batches))
            sink = stats.clone() if sink is None else sink.add_(stats)

    sync(device)
    start = time.perf_counter()
    run(warmup)
    sync(device)
    warmup_s = time.perf_counter() - start
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(steps)
        sync(device)
        rates.append(steps * batch / (time.perf_counter() - start))
    return {"images_per_second": round(statistics.median(rates), 1), "warmup_s": round(warmup_s, 2)}


@dataclasses.dataclass
class Bench:
    """One bench run: its settings, the same images for every row, and the figures as they come."""
    args: argparse.Namespace
    device: torch.device
    batch: int
    steps: int  # per timing: 2 steps of ~2.3 s each on a 2-core CPU; 50 on a GPU, where one step is ~2 ms
    warmup: int
    repeats: int
    loader_batches: int  # per loader timing: see bench/loaders.py
    peak: Optional[float]  # the device's peak matrix TFLOP/s, where known
    flop_per_image: float  # one training step of the model measured (bench/flops.py)
    info: dict
    console: Console
    base: Config
    paths: list = dataclasses.field(default_factory=list)  # the images every row reads
    folder: Optional[Path] = None  # the same images in the tutorial's ImageFolder layout
    prepared_file: Optional[Path] = None  # the same images prepared (fastgan prepare)
    results: dict = dataclasses.field(default_factory=lambda: {"loaders": [], "steps": [], "end_to_end": []})
    configs: dict = dataclasses.field(default_factory=dict)  # each timed row's Config, by row name

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def save(self, **extra) -> None:
        """Every figure so far to --json: a run cut short (a time limit) still leaves the rows it measured."""
        if self.args.json:
            Path(self.args.json).write_text(json.dumps({**self.info, **self.results, **extra}, indent=2) + "\n")

    def peak_figures(self, rate: float) -> dict:
        """Peak device memory since the last reset, and the step's share of the device's FLOP floor."""
        figures = {}
        if self.gpu:
            figures["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        if self.peak:
            figures["fraction_of_flop_floor"] = round(rate * self.flop_per_image / (self.peak * 1e12), 4)
        return figures

    def run_rows(self, section: str, rows, make_batches) -> None:
        """Time each (name, cfg or "skipped: why"[, in_graph]) row; cfg None is the tutorial, the section's first
        row and the baseline of every row's ratio; in_graph False copies prepared batches into a CUDA graph
        instead of gathering them inside it. A row that raises is recorded as failed, with its error, and the
        next row runs: one broken loader or step variant must not take the rows after it."""
        for name, cfg, *in_graph in rows:
            if not isinstance(cfg, str):
                try:
                    self.results[section].append(self.measure_row(section, name, cfg, make_batches,
                                                                  *in_graph))
                    row = self.results[section][-1]
                    ratio = f"{row['ratio']:.2f}x the tutorial" if row["ratio"] else "no tutorial figure"
                    self.console.print(f"{section}  {name}: {row['images_per_second']:,.1f} images/s, {ratio} "
                                       f"(warm-up {row['warmup_s']:.1f} s)")
                    self.save()
                    continue
                except Exception as e:  # noqa: BLE001 (any error of a row is that row's result)
                    cfg = f"failed: {type(e).__name__}: {first_line(e)}"
            self.results[section].append({"row": name, "images_per_second": None, "ratio": None, "note": cfg})
            self.console.print(f"{section}  {name}: {cfg}")
            self.save()

    def measure_row(self, section: str, name: str, cfg: Optional[Config], make_batches, in_graph: bool = True
                    ) -> dict:
        if self.gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        if cfg is not None and cfg.compile:
            # A fresh compile state: the rows before would otherwise fill torch.compile's cache of versions of
            # each forward (autocast dtype, requires_grad, input dtype each make one) up to its limit of 8,
            # past which the row would run uncompiled (main() makes that an error rather than a warning)
            torch._dynamo.reset()
        batches, data = make_batches(cfg)
        try:
            step = (tutorial_stepper(self.base, self.device) if cfg is None else
                    fastgan_step(cfg, self.device, data, in_graph))
            figures = timed(step, batches, self.steps, self.warmup, self.repeats, self.batch, self.device)
        finally:
            if hasattr(batches, "close"):
                batches.close()  # ends the loader's pass (DALI frees its pipeline)
        rate = figures["images_per_second"]
        tutorial = self.results[section][0]["images_per_second"] if self.results[section] else rate
        row = {"row": name, **figures, "ratio": round(rate / tutorial, 3) if tutorial else None,
               **self.peak_figures(rate)}
        if cfg is not None:
            self.configs[name] = cfg
            row["settings"] = {k: getattr(cfg, k) for k in SPEED_SETTINGS}
        return row


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", help="image folder (default: the demo faces)")
    parser.add_argument("--quick", action="store_true", help="fewer images, smaller batches, fewer repeats")
    parser.add_argument("--images", type=int, default=None, help="images for the loader and end-to-end rows")
    parser.add_argument("--batch-size", type=int, default=None, help="[128; --quick 32]")
    parser.add_argument("--ngf", type=int, default=64, help="network widths (ngf = ndf); 64 is the tutorial's")
    parser.add_argument("--steps", type=int, default=None, help="steps per timing [CPU 2, GPU 50; --quick 2]")
    parser.add_argument("--repeats", type=int, default=None, help="timings per row, the median is reported [3]")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when there is one")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak matrix TFLOP/s, to report steps against the FLOP floor "
                             "[H100, H200: 800 bf16]")
    parser.add_argument("--dali-only", action="store_true",
                        help="only the tutorial and DALI's rows: DALI decoding (on the GPU where there is one) with "
                             "the best mode's step (CUDA: compile, CUDA graphs, bf16, channels_last), end to end "
                             "against the tutorial, and that DALI loader alone; for a machine where DALI arrives "
                             "after the other rows ran")
    parser.add_argument("--json", help="write every figure here")
    return parser.parse_args()


def settings(args: argparse.Namespace, device: torch.device) -> Bench:
    """The run's sizes for this device and --quick, printed with the device, versions and commit."""
    gpu = device.type == "cuda"
    batch = args.batch_size or (32 if args.quick else 128)
    steps = args.steps or (2 if args.quick else (50 if gpu else 2))
    # compile and capture happen in the warm-up's first calls; on a GPU more warm-up settles cuDNN's autotuning
    # and the clocks, on the CPU every step costs seconds and is steady from the second
    warmup = steps if gpu else 2
    repeats = args.repeats or (2 if args.quick else 3)
    n_images = args.images or (512 if args.quick else 2048)
    loader_batches = 100 if gpu else (4 if args.quick else 24)
    gpu_name = torch.cuda.get_device_name(device) if gpu else None
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu_name), None)
    if gpu:
        torch.backends.cudnn.benchmark = True  # as fastgan train sets it: fixed shapes, each conv tuned once
    # a compiled row that runs out of torch.compile's versions would fall back to eager with a warning, and its
    # figure would be eager's under a compiled row's name: an error instead, which fails that row alone
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    flop = step_flop_per_image(100, args.ngf, args.ngf, 3, 64)
    console = Console(width=None if sys.stdout.isatty() else 150)  # a log file gets whole rows
    info = {"device": gpu_name or f"CPU, {default_workers()} cores", "torch": torch.__version__,
            "dali": dali_version(), "commit": loader_bench.commit(), "date": time.strftime("%Y-%m-%d"),
            "image_size": 64, "batch_size": batch, "ngf": args.ngf, "steps_per_timing": steps,
            "warmup_steps": warmup, "repeats": repeats, "images": n_images, "loader_batches_per_timing": loader_batches,
            "gflop_per_image": round(flop / 1e9, 3), "tf32_convolutions": gpu and torch.backends.cudnn.allow_tf32}
    console.print(" · ".join(f"{k} {v}" for k, v in info.items()))
    return Bench(args, device, batch, steps, warmup, repeats, loader_batches, peak, flop, info, console,
                 Config(batch_size=batch, ngf=args.ngf, ndf=args.ngf, quiet=True))


def fp32(bench: "Bench") -> str:
    """The name of fp32 in a row: on a GPU cuDNN runs fp32 convolutions in TF32 by default (torch's
    cudnn.allow_tf32), as the tutorial and fastgan train both run them, and the row says so."""
    return "fp32 (TF32 convolutions)" if bench.info["tf32_convolutions"] else "fp32"


def same_images(bench: Bench) -> None:
    """The images every row reads: --root's (or the demo faces), as the tutorial's ImageFolder and prepared."""
    n_images = bench.info["images"]
    root = Path(bench.args.root).expanduser() if bench.args.root else demo_faces(max(n_images, 2048))
    bench.paths = index_images(root).good[:n_images]
    work = Path(tempfile.mkdtemp(prefix="fastgan-bench-"))
    bench.folder = work / "images" / "faces"  # the tutorial's ImageFolder layout, as links to these files
    bench.folder.mkdir(parents=True)
    for p in bench.paths:
        (bench.folder / p.name).symlink_to(p)
    if not bench.args.dali_only:  # DALI's rows read the JPEGs
        bench.prepared_file = prepare(index_images(bench.folder.parent), work / "images.fgd", 64, 3)


def end_to_end(bench: Bench) -> None:
    """Table 3, measured first: it is the headline, which a run cut short (bench/gpu_check.py's time cap) must
    have. Each loader is built once and read epoch after epoch; the DALI row runs the best prepared row's step."""
    def loader_batches_for(cfg: Optional[Config]):
        if cfg is None:  # the tutorial: ImageFolder + DataLoader(shuffle=True, num_workers=2)
            return loader_bench.epochs(loader_bench.ImagesOnly(tutorial_loader(bench.folder.parent, 64, bench.batch,
                                                                               2))), None
        data = fastgan_data(cfg, bench.device)
        return loader_bench.epochs(data.loader), data

    if bench.args.dali_only:
        mode = best_mode(bench)
        rows, best = [TUTORIAL_ROW], (" + ".join(["channels_last"] + ["compile"] * mode.compile
                                                 + ["CUDA graphs"] * mode.cuda_graphs
                                                 + [mode.amp if mode.amp != "off" else fp32(bench)]), mode)
    else:
        rows = end_to_end_rows(bench)
        bench.run_rows("end_to_end", rows, loader_batches_for)
        ran = [r for r in bench.results["end_to_end"][1:] if r["images_per_second"]]
        best_row = max(ran, key=lambda r: r["images_per_second"], default=None)
        best = (best_row["row"], bench.configs[best_row["row"]]) if best_row else (None, None)
        rows = []
    name, cfg = best
    if cfg is not None:
        cfg = dataclasses.replace(cfg, data=None, root=str(bench.folder.parent), loader="dali",
                                  dali_decoder="mixed" if bench.gpu else "cpu")
    row = (f"DALI {'GPU' if bench.gpu else 'CPU'} decode + the best step ({name})",
           loader_bench.dali_skip() or cfg or "skipped: no prepared row ran to take the best step from")
    bench.run_rows("end_to_end", rows + [row], loader_batches_for)


TUTORIAL_ROW = ("tutorial: ImageFolder DataLoader (2 workers) + its eager fp32 step", None)


def best_mode(bench: Bench) -> Config:
    """--dali-only's step: the fastest mode as the full bench finds it (on CUDA compile, CUDA graphs, bf16 and
    channels_last, gpu_check's train-best flags); on the CPU channels_last in fp32, fast on any CPU."""
    if bench.gpu:
        return dataclasses.replace(bench.base, channels_last=True, amp="bf16", compile=not bench.args.no_compile,
                                   cuda_graphs=True)
    return dataclasses.replace(bench.base, channels_last=True)


def end_to_end_rows(bench: Bench) -> list:
    """The tutorial, then prepared data with each step variant this device can run."""
    prepared = dataclasses.replace(bench.base, data=str(bench.prepared_file))
    on_gpu = (lambda cfg: cfg) if bench.gpu else (lambda cfg: "skipped: no CUDA GPU")
    compiled = (lambda cfg: "skipped: --no-compile") if bench.args.no_compile else (lambda cfg: cfg)
    rows = [
        TUTORIAL_ROW,
        (f"prepared, eager {fp32(bench)}", prepared),
        ("prepared + channels_last", dataclasses.replace(prepared, channels_last=True)),
        ("prepared + channels_last + bf16", dataclasses.replace(prepared, channels_last=True, amp="bf16")),
        # compile in fp32 is the CPU's row (bf16 is emulated on many CPUs); on CUDA it runs in fp16 and bf16 below,
        # a compile fewer for the GPU check's few minutes
        ("prepared + channels_last + compile (fp32)",
         "skipped: a CPU row; on CUDA compile runs in fp16 and bf16 (rows below)" if bench.gpu else
         compiled(dataclasses.replace(prepared, channels_last=True, compile=True))),
    ]
    for precision in ("fp16", "bf16"):
        fast = dataclasses.replace(prepared, channels_last=True, amp=precision)
        rows += [
            # compile alone is shown once, in bf16: a compile fewer for the GPU check's few minutes
            *([(f"prepared + compile ({precision})", on_gpu(compiled(dataclasses.replace(fast, compile=True))))]
              if precision == "bf16" else []),
            (f"prepared + CUDA graphs ({precision})", on_gpu(dataclasses.replace(fast, cuda_graphs=True))),
            (f"prepared + compile + CUDA graphs ({precision})",
             on_gpu(compiled(dataclasses.replace(fast, compile=True, cuda_graphs=True)))),
        ]
    # the in-graph gather's own row: the same best mode with each batch copied into the graph instead, so that a
    # GPU shows whether the gather earns its place (at least a tenth of the step, the project's rule for a trick)
    rows.append(("prepared + compile + CUDA graphs (bf16), each batch copied into the graph",
                 on_gpu(compiled(dataclasses.replace(prepared, channels_last=True, amp="bf16", compile=True,
                                                     cuda_graphs=True))), False))
    return rows


def step_alone(bench: Bench) -> None:
    """Table 2, measured second: the step on a batch already on the device, handed over as each row's loader
    would. torch.compile's rows are end-to-end rows only (table 3): on prepared data the loader costs next to
    nothing, so they show compile's share as well, and each compile costs a minute of the run."""
    real = torch.rand(bench.batch, 3, 64, 64, device=bench.device) * 2 - 1
    amp = "fp16" if bench.gpu else "bf16"  # what --amp picks on this device
    last = dataclasses.replace(bench.base, channels_last=True)
    rows = [
        ("tutorial step: eager fp32, Sigmoid + BCELoss, 4 .item() per step", None),
        (f"fastgan step, eager {fp32(bench)} (logits, no host sync, fused Adam, no D grads in G's update)",
         bench.base),
        ("+ channels_last", last),
        (f"+ AMP ({amp})", dataclasses.replace(last, amp=amp)),
        (f"+ CUDA graphs ({amp}, channels_last)",
         dataclasses.replace(last, amp=amp, cuda_graphs=True) if bench.gpu else "skipped: no CUDA GPU"),
    ]

    def batch_as_loaded(cfg: Optional[Config]):
        """The batch as cfg's loader would hand it over: channels_last when asked, in the compute dtype (a
        prepared loader's batches are already bf16/fp16 under AMP); fp32 NCHW for the tutorial."""
        if cfg is None:
            return itertools.repeat(real), None
        dtype = resolve_precision(cfg.amp, bench.device, cfg.cuda_graphs).dtype
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        return itertools.repeat(real.to(dtype=dtype, memory_format=memory_format)), None
    bench.run_rows("steps", rows, batch_as_loaded)


def loaders_alone(bench: Bench) -> None:
    """Table 1, measured last: bench/loaders.py's rows and the prepared file, start-up then images/s."""
    rows = loader_bench.loader_rows(bench.paths, bench.folder, 64, bench.batch, bench.device, [default_workers()],
                                    [HW_DECODER_LOAD])
    if bench.args.dali_only:  # DALI's decoder on this device alone: the other loaders ran with the full bench
        rows = [(name, make) for name, make in rows if name.startswith("DALI, GPU" if bench.gpu else "DALI, CPU")]
    else:
        rows.append(("prepared file in memory (fastgan train --data)",
                     lambda: fastgan_loader(dataclasses.replace(bench.base, data=str(bench.prepared_file),
                                                                channels_last=True), bench.device)))
    for name, make in rows:
        if not isinstance(make, str):
            try:
                figures = loader_bench.measure(make, bench.batch, bench.repeats, bench.device, bench.loader_batches)
                bench.results["loaders"].append({"row": name, **figures})
                bench.save()
                bench.console.print(f"loader  {name}: start-up {figures['startup_s']:.2f} s, "
                                    f"{figures['images_per_second']:,.0f} images/s, "
                                    f"{loader_bench.describe_gap(figures)}")
                continue
            except Exception as e:  # noqa: BLE001 (the row's result: the rows after it still run)
                make = f"failed: {type(e).__name__}: {first_line(e)}"
        bench.results["loaders"].append({"row": name, "images_per_second": None, "note": make})
        bench.console.print(f"loader  {name}: {make}")
        bench.save()


def print_tables(bench: Bench) -> None:
    results, console = bench.results, bench.console
    loader_table = Table(title="loaders: start-up, then steady images/s from the same loader, epoch after epoch")
    for column in ("", "start-up (s)", "images/s", "vs tutorial", "epoch boundary"):
        loader_table.add_column(column, justify="right" if column else "left")
    loader_base = results["loaders"][0]["images_per_second"] if results["loaders"] else None
    for r in results["loaders"]:
        rate = r["images_per_second"]
        loader_table.add_row(r["row"], f"{r['startup_s']:.2f}" if rate else "", f"{rate:,.0f}" if rate else r["note"],
                             f"{rate / loader_base:.2f}x" if rate and loader_base else "",
                             loader_bench.describe_gap(r) if rate else "")
    console.print(loader_table)
    for title, section in [("training step, data on the device (images/s)", "steps"),
                           ("end to end, same images (images/s)", "end_to_end")]:
        if not results[section]:  # --dali-only measures no step table
            continue
        table = Table(title=title)
        columns = ["", "images/s", "vs tutorial"] + ["peak MB"] * bench.gpu + ["of FLOP floor"] * bool(bench.peak)
        for column in columns:
            table.add_column(column, justify="right" if column else "left")
        for r in results[section]:
            rate = r["images_per_second"]
            cells = [r["row"], f"{rate:,.1f}" if rate else r["note"], f"{r['ratio']:.2f}x" if r["ratio"] else ""]
            if bench.gpu:
                cells.append(f"{r['peak_memory_mb']:,}" if rate else "")
            if bench.peak:
                cells.append(f"{r['fraction_of_flop_floor']:.1%}" if rate else "")
            table.add_row(*cells)
        console.print(table)


def judge_targets(bench: Bench) -> int:
    """The best end-to-end row, and on a GPU whether it meets the targets; the last figures saved. The exit
    status: 0, or 1 when a row failed or no fastgan row ran (the rows measured are saved either way)."""
    gpu, console = bench.gpu, bench.console
    failed = [r["row"] for section in bench.results.values() for r in section
              if (r.get("note") or "").startswith("failed")]
    if failed:
        console.print(f"failed rows ({len(failed)}): " + "; ".join(failed))
    best = max((r for r in bench.results["end_to_end"][1:] if r["images_per_second"]),
               key=lambda r: r["images_per_second"], default=None)
    if best is None:
        console.print("no fastgan end-to-end row ran")
        bench.save(best_end_to_end=None, end_to_end_ratio=None, failed_rows=failed)
        return 1
    met = (gpu and best["images_per_second"] >= TARGET_IMAGES_PER_SECOND and best["ratio"] is not None
           and best["ratio"] >= TARGET_RATIO)
    stretch = gpu and best["images_per_second"] >= STRETCH_IMAGES_PER_SECOND
    targets = {"images_per_second": TARGET_IMAGES_PER_SECOND, "ratio": TARGET_RATIO,
               "stretch_images_per_second": STRETCH_IMAGES_PER_SECOND,
               "met": met if gpu else None, "stretch_met": stretch if gpu else None}
    console.print(f"best end to end: {best['row']}, {best['images_per_second']:,.1f} images/s, "
                  + (f"{best['ratio']:.2f}x the tutorial" if best["ratio"] else "no tutorial figure"))
    wanted = (f">= {TARGET_IMAGES_PER_SECOND:,} images/s end to end and >= {TARGET_RATIO:.0f}x the tutorial; "
              f"stretch {STRETCH_IMAGES_PER_SECOND:,}")
    console.print(f"GPU targets ({wanted}): " + (
        ("met" if met else "NOT met") + f"; stretch {'met' if stretch else 'not met'}" if gpu
        else "not judged, no CUDA GPU in this run"))
    console.print(f"peak host memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB · "
                  + " · ".join(f"{k} {v}" for k, v in bench.info.items()))
    bench.save(best_end_to_end=best["row"], end_to_end_ratio=best["ratio"], targets=targets, failed_rows=failed)
    return 1 if failed else 0


def main() -> int:
    args = parse_args()
    try:
        device = resolve_device(args.device)
    except FastganError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    bench = settings(args, device)
    same_images(bench)
    end_to_end(bench)  # measured in the order 3, 2, 1: a run cut short has the headline
    if not args.dali_only:
        step_alone(bench)
    loaders_alone(bench)
    print_tables(bench)
    return judge_targets(bench)


if __name__ == "__main__":
    sys.exit(main())
