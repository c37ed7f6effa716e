"""`train(cfg)`: the whole training run, from a Config to a run folder. `fastgan train` is a thin layer over it.

    from fastgan import Config, train
    run = train(Config(root="~/celeba", epochs=5))   # -> Path of the run folder

Performance switches (device, autocast, GradScaler, channels_last, torch.compile) are decided once, before
the loop, as null objects where off; the loop never asks which are on. Statistics stay on the device and
are read once per log interval (the only host sync in the loop besides samples and checkpoints).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from rich.progress import Progress

from . import checkpoint
from .config import MODEL_FIELDS, Config
from .errors import FastganError
from .files import FileIndex, default_workers, index_images, write_skipped
from .models import Discriminator, Generator, init_weights
from .pipeline_torch import ImageFiles, TorchLoader, epoch_permutation
from .plot import plot_losses
from .report import (MetricsLog, RunProgress, console, format_stats, image_grid, prepare_run_folder,
                     save_animation, save_image_atomic, write_json)
from .step import STAT_NAMES, train_step

FIXED_NOISE_SIZE = 64  # the tutorial's 8x8 progress grid


# ---------------------------------------------------------------------------------------------------------
# decided once, before the loop

def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise FastganError("--device cuda asked for, but torch sees no CUDA GPU (torch.cuda.is_available() "
                           "is False); use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@dataclass
class Precision:
    name: str           # fp32 | fp16 | bf16
    autocast: object    # a context manager: nullcontext() for fp32
    scaler: torch.amp.GradScaler  # disabled unless fp16


def resolve_precision(amp: str, device: torch.device, cuda_graphs: bool = False) -> Precision:
    """--amp: off -> fp32; auto -> fp16 + GradScaler on CUDA, bf16 on the CPU (where fp16 autocast is poor)."""
    name = {"off": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(amp) or ("fp16" if device.type == "cuda" else "bf16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FastganError("--amp bf16 asked for, but this GPU does not support bfloat16; use --amp fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name)
    # CUDA graphs need autocast's cast cache off: cached casts would outlive the captured region
    autocast = torch.autocast(device.type, dtype=dtype, cache_enabled=not cuda_graphs) if dtype else nullcontext()
    # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none
    scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")
    return Precision(name, autocast, scaler)


def cpu_has_native_bf16() -> Optional[bool]:
    """Whether the CPU has bf16 matrix instructions (AVX512-BF16 or AMX); None where /proc/cpuinfo is absent.

    Without them oneDNN emulates bf16: measured 2x slower than fp32 for the 64x64 step on such a Xeon."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_models(cfg: Config, device: torch.device) -> tuple[Generator, Discriminator]:
    """G and D with the DCGAN init, drawn on the CPU from torch's global RNG so they match on every device."""
    netG = Generator(cfg.nz, cfg.ngf, cfg.nc, cfg.image_size)
    netG.apply(init_weights)
    netD = Discriminator(cfg.ndf, cfg.nc, cfg.image_size)
    netD.apply(init_weights)
    memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
    return netG.to(device, memory_format=memory_format), netD.to(device, memory_format=memory_format)


def build_optimizers(cfg: Config, netG, netD, capturable: bool = False) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam(lr, (beta1, 0.999)) for each network, fused: one kernel for all of a network's weights instead of
    several per tensor (tested against the tutorial's default Adam). capturable keeps its step count on the
    device, which a CUDA graph needs."""
    options = dict(lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=True, capturable=capturable)
    return torch.optim.Adam(netG.parameters(), **options), torch.optim.Adam(netD.parameters(), **options)


def make_fixed_noise(cfg: Config) -> torch.Tensor:
    """The noise behind every progress grid: its own generator, so it does not shift the training noise."""
    return torch.randn(FIXED_NOISE_SIZE, cfg.nz, 1, 1, generator=torch.Generator().manual_seed(cfg.seed))


@torch.no_grad()
def sample(netG: torch.nn.Module, noise: torch.Tensor) -> torch.Tensor:
    """G(noise) with BatchNorm on its running statistics: deterministic per image, leaves G's state alone."""
    was_training = netG.training
    netG.eval()
    try:
        return netG(noise).float()
    finally:
        netG.train(was_training)


# ---------------------------------------------------------------------------------------------------------
# data

def index_data(cfg: Config) -> FileIndex:
    if cfg.root is None:
        from .demo import demo_faces
        root = demo_faces(cfg.demo_images, quiet=cfg.quiet)
    else:
        root = Path(cfg.root).expanduser()
    with Progress(console=console, transient=True, disable=cfg.quiet) as bar:
        task = bar.add_task("checking images", total=None)
        index = index_images(root, cfg.workers, progress=lambda done, total: bar.update(task, completed=done,
                                                                                          total=total))
    return index


def resolve_loader(cfg: Config, device: torch.device) -> tuple[str, str]:
    """(loader, DALI decoder): --loader auto is DALI on CUDA when it is installed, torch otherwise."""
    from .pipeline_dali import INSTALL_HINT, dali_available
    if cfg.data is not None:
        if cfg.loader != "auto":
            raise FastganError(f"--loader {cfg.loader} decodes image files; --data is decoded already: "
                               "leave --loader out")
        return "prepared", ""
    loader = cfg.loader
    if loader == "auto":
        loader = "dali" if device.type == "cuda" and dali_available() else "torch"
    if loader == "torch":
        return loader, ""
    if not dali_available():
        raise FastganError(f"--loader dali needs NVIDIA DALI, which is not installed: {INSTALL_HINT}")
    decoder = cfg.dali_decoder if cfg.dali_decoder != "auto" else ("mixed" if device.type == "cuda" else "cpu")
    if decoder == "mixed" and device.type != "cuda":
        raise FastganError("--dali-decoder mixed decodes on the GPU and needs --device cuda")
    return loader, decoder


def build_loader(cfg: Config, paths, device: torch.device, precision: Precision, loader: str, decoder: str):
    """The loader the run asked for; the loop only sees the shared contract (len, set_epoch, iter)."""
    workers = default_workers() if cfg.workers is None else cfg.workers
    if loader == "torch":
        return TorchLoader(paths, cfg.image_size, cfg.nc, cfg.batch_size, device,
                           channels_last=cfg.channels_last, workers=workers, seed=cfg.seed), \
            f"loader torch ({workers} workers)"
    from .pipeline_dali import DaliLoader
    # Half-precision batches halve the hand-off; autocast casts them for the first convolution. DALI has no
    # bfloat16, so a bf16 run gets float16 batches too. The CPU keeps float32 (its fp16 kernels are slow).
    half = device.type == "cuda" and precision.name in ("fp16", "bf16")
    threads = cfg.dali_threads or default_workers()
    dali = DaliLoader(paths, cfg.image_size, cfg.nc, cfg.batch_size, device, channels_last=cfg.channels_last,
                      seed=cfg.seed, decoder=decoder, threads=threads, hw_decoder_load=cfg.hw_decoder_load,
                      dtype=torch.float16 if half else torch.float32)
    detail = f", hw_decoder_load {cfg.hw_decoder_load}" if decoder == "mixed" else ""
    return dali, f"loader dali (decoder {decoder}, {threads} threads{detail})"


def check_enough_images(index: FileIndex, cfg: Config) -> None:
    if len(index.good) < cfg.batch_size:
        raise FastganError(f"batch size {cfg.batch_size} is larger than the {len(index.good):,} usable images "
                           f"under {index.root}; lower --batch-size")


@dataclass
class Data:
    loader: object          # len(), set_epoch(), iteration: the contract every loader shares
    description: str        # which loader, for the run's first lines
    summary: str            # how many images, from where, how many set aside
    bad: list               # (path, reason) of the files set aside
    preview: Callable[[int], torch.Tensor]  # the first n images of the first epoch, for samples/real.png


def open_data(cfg: Config, device: torch.device, precision: Precision, loader_name: str, decoder: str) -> Data:
    """The run's images and the loader over them: image files (torch or DALI), or a prepared file."""
    if loader_name == "prepared":
        from .prepared import PreparedLoader, load_pixels
        pixels, manifest = load_pixels(cfg.data, cfg.image_size, cfg.nc)
        loader = PreparedLoader(pixels, cfg.batch_size, device, channels_last=cfg.channels_last, seed=cfg.seed,
                                mirror=cfg.mirror)
        return Data(loader, f"loader prepared ({device.type} memory{', mirrored' if cfg.mirror else ''})",
                    f"{len(pixels):,} prepared images in {cfg.data} (from {manifest['source_root']})", [],
                    loader.preview)
    index = index_data(cfg)
    if loader_name == "dali":
        from .pipeline_dali import readable_by_dali
        index = readable_by_dali(index)
    check_enough_images(index, cfg)
    loader, description = build_loader(cfg, index.good, device, precision, loader_name, decoder)

    def preview(count: int) -> torch.Tensor:
        dataset = ImageFiles(index.good, cfg.image_size, cfg.nc)
        return torch.stack([dataset[int(j)] for j in epoch_permutation(len(dataset), cfg.seed, 0)[:count]])
    return Data(loader, description, index.summary(), index.bad, preview)


# ---------------------------------------------------------------------------------------------------------
# resume

def find_resume_checkpoint(cfg: Config) -> Optional[Path]:
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        return Path(cfg.resume).expanduser()
    if cfg.out is None:
        raise FastganError("--resume auto needs --out, the run folder to continue")
    last = Path(cfg.out).expanduser() / "checkpoints" / "last.pt"
    if not last.is_file():
        raise FastganError(f"--resume auto: no checkpoint to resume in {last.parent}")
    return last


def check_model_shape(cfg: Config, saved: dict, path: Path) -> None:
    mismatched = [f"{k}={saved.get(k)} (asked {getattr(cfg, k)})" for k in MODEL_FIELDS
                  if saved.get(k) != getattr(cfg, k)]
    if mismatched:
        raise FastganError(f"checkpoint {path} does not match the model: it was trained with "
                           + ", ".join(mismatched))


def load_resume(path: Path, cfg: Config) -> dict:
    payload = checkpoint.load(path)
    if not checkpoint.is_fastgan_checkpoint(payload):
        raise FastganError(f"{path} is not a fastgan training checkpoint (a plain state dict can be used "
                           "with `fastgan generate`, not resumed)")
    check_model_shape(cfg, payload["config"], path)
    if payload["epoch"] >= cfg.epochs:
        raise FastganError(f"checkpoint {path} has already trained {payload['epoch']} epochs; pass "
                           f"--epochs larger than {payload['epoch']} to train more")
    return payload


def restore(resumed: dict, netG, netD, optimizerG, optimizerD, scaler, device: torch.device) -> None:
    """Load a checkpoint's networks, optimizers, scaler and RNG states into this run's objects."""
    netG.load_state_dict(resumed["netG"])
    netD.load_state_dict(resumed["netD"])
    optimizerG.load_state_dict(resumed["optimizerG"])
    optimizerD.load_state_dict(resumed["optimizerD"])
    if scaler.is_enabled() and resumed["scaler"]:  # a run that changes precision starts a fresh scaler
        scaler.load_state_dict(resumed["scaler"])
    torch.set_rng_state(resumed["rng"]["torch"])
    if device.type == "cuda" and resumed["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(resumed["rng"]["cuda"])


# ---------------------------------------------------------------------------------------------------------
# the run

def train(cfg: Config) -> Optional[Path]:
    """Train as cfg says; return the run folder (None for a dry run, which writes nothing)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.cuda_graphs and device.type != "cuda":
        raise FastganError("--cuda-graphs needs a CUDA device (--device cuda)")
    precision = resolve_precision(cfg.amp, device, cfg.cuda_graphs)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: autotune each convolution once
    loader_name, decoder = resolve_loader(cfg, device)
    resume_path = find_resume_checkpoint(cfg)
    resumed = load_resume(resume_path, cfg) if resume_path else None

    if cfg.dry_run:
        return dry_run(cfg, device, precision, loader_name, decoder)
    data = open_data(cfg, device, precision, loader_name, decoder)

    out = cfg.out
    if out is None and resume_path is not None and resume_path.parent.name == "checkpoints":
        out = str(resume_path.parent.parent)  # continue in the run folder the checkpoint belongs to
    run = prepare_run_folder(out, resuming=resumed is not None)
    if resumed:
        refuse_overwriting_later_epochs(run, resumed["epoch"])
    console.print(f"fastgan: {data.summary}" + (f" (listed in {run / 'skipped_files.txt'})" if data.bad else ""))
    if device.type == "cpu" and precision.name == "bf16" and cpu_has_native_bf16() is False:
        console.print("fastgan: note: this CPU has no bf16 instructions (avx512_bf16, amx_bf16), so bf16 "
                      "autocast is emulated and usually slower than fp32 here")
    loader = data.loader
    console.print(f"fastgan: device {device}, precision {precision.name}, {data.description}, "
                  f"channels_last {'on' if cfg.channels_last else 'off'}, compile {'on' if cfg.compile else 'off'}, "
                  f"CUDA graphs {'on' if cfg.cuda_graphs else 'off'} -> {run}")

    torch.manual_seed(cfg.seed)
    netG, netD = build_models(cfg, device)
    optimizerG, optimizerD = build_optimizers(cfg, netG, netD, capturable=cfg.cuda_graphs)
    scaler = precision.scaler
    start_epoch, step, loss_history, fixed_noise = 0, 0, torch.zeros(0, 2), make_fixed_noise(cfg)
    if resumed:
        restore(resumed, netG, netD, optimizerG, optimizerD, scaler, device)
        start_epoch, step = resumed["epoch"], resumed["step"]
        loss_history, fixed_noise = resumed["loss_history"], resumed["fixed_noise"]
        console.print(f"fastgan: resumed from {resume_path} at epoch {start_epoch + 1}, iteration {step}")
    config_file = run / "config.json"
    write_json(config_file if not config_file.exists() else run / f"config.resumed-at-{step}.json", cfg.to_dict())
    if data.bad:
        write_skipped(data.bad, run / "skipped_files.txt")
    fixed_noise = fixed_noise.to(device)

    # The step runs the (possibly compiled) modules, possibly captured in a CUDA graph; samples and checkpoints
    # use the plain modules
    stepG, stepD = (torch.compile(netG), torch.compile(netD)) if cfg.compile else (netG, netD)
    step_fn = functools.partial(train_step, stepG, stepD, optimizerG, optimizerD, autocast=precision.autocast,
                                scaler=scaler)
    if cfg.cuda_graphs:
        from .graphs import GraphedStep
        step_fn = GraphedStep(step_fn, (netG, netD), (optimizerG, optimizerD), scaler)
    if not (run / "samples" / "real.png").exists():  # the tutorial's "Training Images" figure
        save_image_atomic(image_grid(data.preview(FIXED_NOISE_SIZE), nrow=8), run / "samples" / "real.png")

    steps_per_epoch = len(loader)
    history = torch.zeros(cfg.log_every, len(STAT_NAMES), device=device)  # per-step stats, read per interval
    losses = [loss_history]
    metrics = MetricsLog(run / "metrics.jsonl")
    in_interval, interval_start = 0, time.perf_counter()
    run_start, images_seen = time.perf_counter(), 0

    def read_interval(epoch: int, i: int) -> None:
        nonlocal in_interval, interval_start
        values = history[:in_interval].cpu()  # note: the host sync of this interval
        now = time.perf_counter()
        losses.append(values[:, :2].clone())
        stats = dict(zip(STAT_NAMES, values.mean(0).tolist()))
        images_per_second = in_interval * cfg.batch_size / max(now - interval_start, 1e-9)
        metrics.write({"epoch": epoch + 1, "iteration": i + 1, "step": step, **stats,
                       "images_per_second": round(images_per_second, 1), "time": round(now - run_start, 3)})
        progress.log(f"[{epoch + 1}/{cfg.epochs}][{i + 1}/{steps_per_epoch}]  {format_stats(stats)}  "
                     f"{images_per_second:,.0f} img/s", stats, images_per_second)
        in_interval, interval_start = 0, now

    def save_samples(tag: str) -> None:
        grid = image_grid(sample(netG, fixed_noise), nrow=8)
        save_image_atomic(grid, run / "samples" / f"fake_{tag}.png")

    if step == 0:
        save_samples(f"step{step:07d}")  # the untrained generator: the animation's first frame
    total_steps = cfg.epochs * steps_per_epoch
    try:
        with RunProgress(total_steps, start_epoch * steps_per_epoch, cfg.quiet) as progress:
            for epoch in range(start_epoch, cfg.epochs):
                loader.set_epoch(epoch)
                progress.epoch(epoch, cfg.epochs)
                for i, real in enumerate(loader):
                    noise = torch.randn(cfg.batch_size, cfg.nz, 1, 1, device=device)
                    history[in_interval] = step_fn(real, noise)
                    in_interval += 1
                    step += 1
                    images_seen += cfg.batch_size
                    progress.advance()
                    if in_interval == cfg.log_every or i + 1 == steps_per_epoch:
                        read_interval(epoch, i)
                    if step % cfg.sample_every == 0 and i + 1 < steps_per_epoch:  # the epoch end samples anyway
                        save_samples(f"step{step:07d}")
                save_samples(f"step{step:07d}_epoch{epoch + 1:03d}")
                progress.epoch_end()
                loss_history = torch.cat(losses)
                losses = [loss_history]
                save_checkpoint(run, epoch, step, cfg, netG, netD, optimizerG, optimizerD, scaler, fixed_noise,
                                loss_history, device)
    except KeyboardInterrupt:
        last = run / "checkpoints" / "last.pt"
        console.print(f"fastgan: interrupted at iteration {step}; " + (
            f"continue from the last finished epoch with: fastgan train --out {run} --resume auto"
            if last.exists() else "no epoch had finished, so there is no checkpoint to resume"))
        raise
    finally:
        metrics.close()
    elapsed = time.perf_counter() - run_start

    finish(run, netG, loss_history)
    console.print(f"fastgan: trained {cfg.epochs - start_epoch} epochs ({images_seen:,} images) in "
                  f"{format_seconds(elapsed)}: {images_seen / max(elapsed, 1e-9):,.0f} images/s; "
                  f"results in {run}")
    return run


def refuse_overwriting_later_epochs(run: Path, epochs_done: int) -> None:
    """Resuming from an older checkpoint of a run would overwrite its later epochs' files: refuse."""
    later = sorted(p.name for p in (run / "checkpoints").glob("epoch*.pt")
                   if p.stem[5:].isdigit() and int(p.stem[5:]) > epochs_done)
    if later:
        raise FastganError(f"{run} already holds later checkpoints ({', '.join(later)}); resume into a "
                           "new --out folder so that they are kept")


def save_checkpoint(run: Path, epoch: int, step: int, cfg: Config, netG, netD, optimizerG, optimizerD,
                    scaler, fixed_noise, loss_history, device) -> None:
    payload = {
        "format": checkpoint.FORMAT, "version": checkpoint.VERSION,
        "netG": checkpoint.unwrap(netG).state_dict(), "netD": checkpoint.unwrap(netD).state_dict(),
        "optimizerG": optimizerG.state_dict(), "optimizerD": optimizerD.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch + 1,  # epochs completed
        "step": step,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
        "fixed_noise": fixed_noise.cpu(),
        "loss_history": loss_history,  # (step, 2): Loss_D and Loss_G of every iteration, for the loss plot
        "config": cfg.to_dict(),
    }
    epoch_file = run / "checkpoints" / f"epoch{epoch + 1:03d}.pt"
    checkpoint.save(epoch_file, payload)
    checkpoint.link_or_copy(epoch_file, run / "checkpoints" / "last.pt")


def finish(run: Path, netG, loss_history: torch.Tensor) -> None:
    """The run's end products: the loss plot, the animation of the progress grids, netG.pth."""
    steps = torch.arange(1, loss_history.shape[0] + 1)
    plot_losses(steps, loss_history[:, 1], loss_history[:, 0], run / "loss.png")
    save_animation(sorted((run / "samples").glob("fake_step*.png")), run / "progress.gif")
    # pytorch/examples format: a plain state dict of the unwrapped generator, on the CPU
    state = {k: v.cpu() for k, v in checkpoint.unwrap(netG).state_dict().items()}
    checkpoint.save(run / "netG.pth", state)


def dry_run(cfg: Config, device: torch.device, precision: Precision, loader_name: str, decoder: str) -> None:
    """Print the resolved config and run two steps on a tiny batch from the chosen loader; write nothing."""
    batch = min(cfg.batch_size, 4)
    data = open_data(dataclasses.replace(cfg, batch_size=batch, workers=0), device, precision, loader_name, decoder)
    console.print(json.dumps({**cfg.to_dict(), "resolved": {
        "device": str(device), "precision": precision.name, "loader": data.description, "data": data.summary,
        "skipped": len(data.bad)}}, indent=2))
    torch.manual_seed(cfg.seed)
    netG, netD = build_models(cfg, device)
    optimizerG, optimizerD = build_optimizers(cfg, netG, netD)
    stepG, stepD = (torch.compile(netG), torch.compile(netD)) if cfg.compile else (netG, netD)
    real = next(iter(data.loader))
    for _ in range(2):
        noise = torch.randn(batch, cfg.nz, 1, 1, device=device)
        stats = train_step(stepG, stepD, optimizerG, optimizerD, real, noise, precision.autocast,
                           precision.scaler)
    console.print(f"dry run: 2 steps on {batch} images OK; {format_stats(dict(zip(STAT_NAMES, stats.tolist())))}")
    return None


def format_seconds(seconds: float) -> str:
    minutes, s = divmod(seconds, 60)
    return f"{int(minutes)}m{s:04.1f}s" if minutes else f"{s:.1f}s"
