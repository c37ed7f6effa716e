"""`train(cfg)`: the whole training run, from a Config to a run folder. `fastgan train` is a thin layer over it.

    from fastgan import Config, train
    run = train(Config(root="~/celeba", epochs=5))   # -> Path of the run folder

Performance switches (device, autocast, GradScaler, channels_last, torch.compile) are decided once, before
the loop, as null objects where off; the loop never asks which are on. Statistics stay on the device and
are read once per log interval (the only host sync in the loop besides samples and checkpoints).
"""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint, distributed, runfolder, state
from .config import Config
from .distributed import resolve_device
from .errors import FastganError, TrainingStopped
from .data import open_data, resolve_loader
from .files import write_skipped
from .interrupt import StopRequests
from .interval import IntervalStats, last_good_checkpoint
from .models import count_parameters
from .plot import plot_losses
from .report import (MetricsLog, RunProgress, console, format_stats, image_grid, plural, sample_grids,
                     save_animation, save_image_atomic, write_json)
from .sampling import FIXED_NOISE_SIZE, make_fixed_noise, sample
from .state import check_resumable, find_resume_checkpoint
from .step import STAT_NAMES
from .tensorboard_log import TensorBoardLog, summary_writer_class
from .trainer import Precision, build_trainer, resolve_precision

# ---------------------------------------------------------------------------------------------------------
# decided once, before the loop

def cpu_has_native_bf16() -> Optional[bool]:
    """Whether the CPU has bf16 matrix instructions (AVX512-BF16 or AMX); None where /proc/cpuinfo is absent.

    Without them oneDNN emulates bf16: measured 2x slower than fp32 for the 64x64 step on such a Xeon."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------------------------------------------------
# the run

def train(cfg: Config, resumed: Optional[dict] = None) -> Optional[Path]:
    """Train as cfg says; return the run folder (None for a dry run, which writes nothing, and on ranks other
    than 0 under torchrun, which write nothing either). `resumed`: cfg.resume's checkpoint when the caller has
    read it already (the CLI does, for the run's options), so that it is read once."""
    cfg.validate()
    ranks, device = distributed.start(cfg.device, cfg.batch_size, cfg.cuda_graphs, cfg.sync_bn)
    quiet_before = console.quiet
    console.quiet = quiet_before or not ranks.is_main  # under torchrun, rank 0 speaks for all
    try:
        with ExitStack() as held:  # the run folder's lock, released however the run ends
            run = train_ranked(cfg, ranks, device or resolve_device(cfg.device), resumed, held)
        return run.resolve() if run else None  # absolute: the caller may change directory after
    finally:
        console.quiet = quiet_before
        distributed.stop()


def train_ranked(cfg: Config, ranks: distributed.Ranks, device: torch.device, resumed: Optional[dict] = None,
                 held: Optional[ExitStack] = None) -> Optional[Path]:
    if cfg.cuda_graphs and device.type != "cuda":
        raise FastganError("--cuda-graphs needs a CUDA device (--device cuda)")
    precision = resolve_precision(cfg.amp, device, cfg.cuda_graphs)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: autotune each convolution once
    loader_name, decoder = resolve_loader(cfg, device)
    if cfg.tensorboard:
        summary_writer_class()  # without the package: one line naming the extra, before anything is written
    resume_path = find_resume_checkpoint(cfg)
    out = run_folder_of(cfg, resume_path)
    resumed = check_resumable(resume_path, cfg, resumed, Path(out).expanduser() if out else None) \
        if resume_path else None

    if cfg.dry_run:
        return dry_run(cfg, device, precision, loader_name, decoder)
    run = None  # rank 0's: chosen and checked now, created once every other check has passed
    with ranks.together("checking the run folder"):
        if ranks.is_main:
            run = runfolder.choose(out, resuming=resumed is not None)
    batch_size = distributed.per_rank_batch(cfg.batch_size, ranks.world_size)  # this rank's share
    with ranks.local_main_first("reading the data"):  # local rank 0 fills the file index's cache first
        data = open_data(cfg, device, precision.dtype, loader_name, decoder, ranks)
    position = state.position_of(resumed) if resumed else state.Position()
    console.print(f"fastgan: {data.summary}")
    if device.type == "cpu" and precision.name == "bf16" and cpu_has_native_bf16() is False:
        console.print("fastgan: note: this CPU has no bf16 instructions (avx512_bf16, amx_bf16), so bf16 "
                      "autocast is emulated and usually slower than fp32 here")
    loader = data.loader
    processes = (f"{ranks.world_size} process{'es' if ranks.world_size > 1 else ''} "
                 f"({'NCCL' if device.type == 'cuda' else 'gloo'}), batch "
                 f"{batch_size} each{', SyncBatchNorm' if cfg.sync_bn else ''}, " if ranks.launched else "")
    console.print(f"fastgan: device {device}, {processes}precision {precision.name}, {data.description}, "
                  f"channels_last {'on' if cfg.channels_last else 'off'}, compile {'on' if cfg.compile else 'off'}, "
                  f"CUDA graphs {'on' if cfg.cuda_graphs else 'off'} -> {run}")

    trainer = build_trainer(cfg, device, precision, ranks, loader)
    netG, netD, optimizerG, optimizerD = trainer.netG, trainer.netD, trainer.optimizerG, trainer.optimizerD
    loss_history, fixed_noise, carried = torch.zeros(0, 2), make_fixed_noise(cfg), None
    if resumed:
        state.restore(resumed, netG, netD, optimizerG, optimizerD, trainer.scaler, trainer.noise_generator, device,
                      trainer.ema)
        loss_history, fixed_noise = resumed["loss_history"][:position.step], resumed["fixed_noise"]
        carried = state.unfinished_interval(resumed)  # the log interval the checkpoint cut short: continued here
    with ranks.together("preparing the run folder"):
        if ranks.is_main:  # every check has passed: the first thing written to disk
            open_run_folder(cfg, run, resumed, data, held)
    if resumed:
        console.print(f"fastgan: resumed from {resume_path} at {position.describe(len(loader))}")
        if position.iteration and resumed.get("images", data.count) != data.count:
            console.print(f"fastgan: note: the data now holds {data.count:,} images, {resumed['images']:,} when the "
                          "checkpoint was written, so the rest of this epoch follows a different order")
    fixed_noise = fixed_noise.to(device)
    if ranks.is_main and not (run / "samples" / "real.png").exists():  # the tutorial's "Training Images"
        save_image_atomic(image_grid(data.preview(FIXED_NOISE_SIZE), nrow=8), run / "samples" / "real.png")

    steps_per_epoch = len(loader)
    stats = IntervalStats(cfg.log_every, device, precision.name, trainer.scaler, ranks, batch_size,
                          MetricsLog(run / "metrics.jsonl") if ranks.is_main else None, run, loss_history, carried,
                          tensorboard=TensorBoardLog(run) if cfg.tensorboard and ranks.is_main else None)
    images_seen = 0
    measure = None
    if cfg.eval_every and ranks.is_main:
        from .evaluate import DuringTraining
        measure = DuringTraining(cfg.to_dict(), cfg.eval_images, device, cfg.inception)
        compared = min(cfg.eval_images, data.count)  # all the real images where the data holds fewer
        console.print(f"fastgan: every {cfg.eval_every} epoch{'s' if cfg.eval_every > 1 else ''}: "
                      f"{', '.join(m.upper() for m in measure.metrics)} of {compared:,} images into metrics.jsonl"
                      + ("" if "fid" in measure.metrics else " (FID/KID: no Inception weights at hand, see --inception)"))

    def evaluate_at(epoch: int, step: int) -> None:
        """--eval-every: the epoch's generator measured (rank 0; the others wait at the next vote). Before the
        epoch's checkpoint, so that a run resumed from an earlier one measures this epoch again."""
        if measure is None or (epoch + 1) % cfg.eval_every:
            return
        started = time.perf_counter()
        record = {"step": step, "epoch": epoch + 1, "generator": "ema" if trainer.ema else "raw",
                  **measure(trainer.sampler)}
        stats.set_aside(time.perf_counter() - started)
        stats.metrics.write(record)
        if stats.tensorboard:
            stats.tensorboard.write(record)
        console.print(f"[{epoch + 1}/{cfg.epochs}] eval: " + "  ".join(
            f"{k.upper()}: {v:.4f}" if k == "kid" else f"{k.upper()}: {v:.2f}" for k, v in record.items()
            if k.startswith("swd") or k in ("fid", "kid")))

    def save_samples(tag: str, batch_statistics: bool = False) -> None:
        if ranks.is_main:  # with --ema the grids are the average's, and their names say so
            grid = image_grid(sample(trainer.sampler, fixed_noise, batch_statistics), nrow=8)
            path = run / "samples" / f"fake_{'ema_' if trainer.ema else ''}{tag}.png"
            save_image_atomic(grid, path)
            if stats.tensorboard:
                stats.tensorboard.sample(grid, path)

    def save_checkpoint(at: state.Position, epoch: int, i: int) -> tuple[Optional[Path], state.Position]:
        """Refuse non-finite weights, write (rank 0). A log interval in progress is carried in the checkpoint, not
        logged: records end at the same steps whatever the checkpoints, so a resumed run writes the same ones."""
        if ranks.vote(not state.all_finite(netG, netD, optimizerG, optimizerD)):
            raise FastganError(f"the weights are no longer finite at iteration {at.step}; not saving them. "
                               + last_good_checkpoint(run) + " Lower --lr.")
        interval = stats.unfinished()
        losses = torch.cat([stats.loss_history(), interval["stats"][:, :2]])  # every step's, up to `at`
        path = state.write_checkpoint(run, state.snapshot(cfg, at, netG, netD, optimizerG, optimizerD, trainer.scaler,
                                             trainer.noise_generator, fixed_noise, losses, device, data.count, interval,
                                             trainer.ema)
                          ) if ranks.is_main else None
        return path, at

    step = position.step
    if step == 0:
        # the untrained generator, the animation's first frame: its running statistics are still the initial ones
        save_samples(f"step{step:07d}", batch_statistics=True)
    total_steps = cfg.epochs * steps_per_epoch
    stop, saved = False, None  # saved: (path, position) of this run's latest checkpoint (path None off rank 0)
    try:
        with StopRequests(announce=ranks.is_main) as stops, \
                RunProgress(total_steps, position.epoch * steps_per_epoch + position.iteration, cfg.quiet) as progress:
            for epoch in range(position.epoch, cfg.epochs):
                start = position.iteration if epoch == position.epoch else 0
                loader.set_epoch(epoch, start)
                progress.epoch(epoch, cfg.epochs)
                for i, batch in enumerate(loader, start):
                    stats.add(trainer(batch))
                    step += 1
                    images_seen += batch_size
                    progress.advance()
                    # at global step numbers, whatever the resume point: a resumed run writes the same records
                    interval_end = step % cfg.log_every == 0 or i + 1 == steps_per_epoch
                    if interval_end:
                        stats.read(epoch, i, step, progress, cfg.epochs, steps_per_epoch)
                    if step % cfg.sample_every == 0 and i + 1 < steps_per_epoch:  # the epoch end samples anyway
                        save_samples(f"step{step:07d}")
                    # all ranks stop after the same step; under torchrun they agree at interval ends only (a host
                    # all-reduce), so a stop lands within --log-every steps
                    if interval_end or not ranks.launched:
                        stop = ranks.vote(stops.requested)
                    mid_epoch = i + 1 < steps_per_epoch  # (the epoch's end has its own checkpoint below)
                    if mid_epoch and (stop or (cfg.ckpt_every and step % cfg.ckpt_every == 0)):
                        saved = save_checkpoint(state.Position(epoch, i + 1, step), epoch, i)
                    if stop:
                        if stats.pending:  # the interval cut short: logged now; its checkpoint carries it, and
                            # a resumed run replaces this record with the whole interval's (state.set_aside_...)
                            stats.read(epoch, i, step, progress, cfg.epochs, steps_per_epoch)
                        break
                if stop and mid_epoch:
                    break
                save_samples(f"step{step:07d}_epoch{epoch + 1:03d}")
                progress.epoch_end()
                with ranks.together("measuring the generator (--eval-every)"):
                    evaluate_at(epoch, step)
                saved = save_checkpoint(state.Position(epoch + 1, 0, step), epoch, steps_per_epoch - 1)
                if stop:
                    break
    except KeyboardInterrupt:
        last = run / "checkpoints" / "last.pt" if run else None
        console.print(f"fastgan: interrupted at once at iteration {step}; " + (
            f"the last checkpoint {last} is intact: continue with {resume_command(run, ranks)}"
            if last and last.exists() else "no checkpoint had been written yet"))
        raise
    finally:
        if stats.metrics:
            stats.metrics.close()
        if stats.tensorboard:
            stats.tensorboard.close()
    if stop and saved[1].epoch < cfg.epochs:  # (a stop asked for during the very last step changes nothing)
        path, at = saved
        # a rank can be outvoted into stopping before its own copy of the signal arrives
        why = signal.Signals(stops.signum).name if stops.signum else "another rank's stop request"
        if ranks.is_main:  # what the run has so far: the loss plot, the animation, the generator
            finish(run, netG, stats.loss_history(), trainer.ema)
        raise TrainingStopped(f"stopped by {why} at {at.describe(steps_per_epoch)}"
                              + (f"; checkpoint {path}; loss.png, progress.gif and netG.pth show the run so far. "
                                 f"Continue with: {resume_command(run, ranks)}" if path else ""),
                              stops.signum or signal.SIGTERM)
    elapsed = time.perf_counter() - stats.run_start - stats.aside

    if ranks.is_main:
        finish(run, netG, stats.loss_history(), trainer.ema)
    console.print(f"fastgan: trained {images_seen * ranks.world_size:,} images in {format_seconds(elapsed)}: "
                  f"{images_seen * ranks.world_size / max(elapsed, 1e-9):,.0f} images/s"
                  + (f" ({images_seen / max(elapsed, 1e-9):,.0f} per rank)" if ranks.launched else "")
                  + (f", and {format_seconds(stats.aside)} measuring (--eval-every)" if stats.aside else "")
                  + f"; results in {run}")
    return run


def run_folder_of(cfg: Config, resume_path: Optional[Path]) -> Optional[str]:
    """--out, or the run folder of the checkpoint being resumed, or None (runs/<timestamp>)."""
    if cfg.out is None and resume_path is not None and resume_path.parent.name == "checkpoints":
        return str(resume_path.parent.parent)  # continue in the run folder the checkpoint belongs to
    return cfg.out


def open_run_folder(cfg: Config, run: Path, resumed: Optional[dict], data, held: Optional[ExitStack]) -> None:
    """Rank 0's part of the set-up, once every check has passed: the run folder created and locked (for as long
    as `held` lasts), an earlier run that ended before its first checkpoint moved aside, metrics trimmed to the
    checkpoint being resumed, the config and the skipped-file list written."""
    lock, moved = runfolder.create(run, resuming=resumed is not None)
    if held is not None:
        held.callback(lock.release)
    if moved:
        console.print(f"fastgan: {run} held a run that ended before its first checkpoint: its files moved to {moved}")
    if resumed:
        step = resumed["step"]
        records, grids = state.set_aside_later_results(run, step, state.carried_steps(resumed))
        if records or grids:
            console.print(f"fastgan: what was written after the checkpoint at iteration {step} is made again now, "
                          f"so it moves aside: {plural(records, 'metrics record')} to "
                          f"{run / f'metrics.after-{step}.jsonl'}, {plural(grids, 'sample grid')} to "
                          f"{run / 'samples' / f'after-{step}'}")
    config_file = run / "config.json"
    step = resumed["step"] if resumed else 0
    write_json(config_file if not config_file.exists() else run / f"config.resumed-at-{step}.json", cfg.to_dict())
    if data.bad:
        write_skipped(data.bad, run / "skipped_files.txt")
        console.print(f"fastgan: the {len(data.bad):,} skipped files are listed in {run / 'skipped_files.txt'}")


def resume_command(run: Path, ranks: distributed.Ranks) -> str:
    launcher = "the same torchrun command with" if ranks.launched else "fastgan train"
    return f"{launcher} --out {run} --resume auto"


def finish(run: Path, netG, loss_history: torch.Tensor, ema=None) -> None:
    """The run's end products: the loss plot, the animation of the progress grids, netG.pth (and netG_ema.pth)."""
    steps = torch.arange(1, loss_history.shape[0] + 1)
    plot_losses(steps, loss_history[:, 1], loss_history[:, 0], run / "loss.png")
    save_animation(sample_grids(run / "samples"), run / "progress.gif")
    # pytorch/examples format: a plain state dict of the unwrapped generator, on the CPU
    weights = {k: v.cpu() for k, v in checkpoint.unwrap(netG).state_dict().items()}
    checkpoint.write_file(run / "netG.pth", weights)
    if ema is not None:
        checkpoint.write_file(run / "netG_ema.pth", ema.state_dict()["netG_ema"])


def dry_run(cfg: Config, device: torch.device, precision: Precision, loader_name: str, decoder: str) -> None:
    """Print the run's plan (its options and what they resolve to) as JSON on stdout, so that `--dry-run >
    plan.json` keeps it, then run two steps on a tiny batch from the loader the run would build (its worker
    processes or threads included); write nothing."""
    # no bars without a terminal, where rich leaves a blank line for each
    trial = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, 4), quiet=cfg.quiet or not console.is_interactive)
    data = open_data(trial, device, precision.dtype, loader_name, decoder)
    trainer = build_trainer(trial, device, precision, loader=data.loader)
    plan = {**cfg.to_dict(), "resolved": {
        "device": str(device), "precision": precision.name, "loader": data.description, "data": data.summary,
        "skipped": len(data.bad),
        "parameters": {"generator": count_parameters(trainer.netG), "discriminator": count_parameters(trainer.netD)}}}
    where = distributed.environment()
    if where is None or where[0] == 0:  # under torchrun, one plan
        print(json.dumps(plan, indent=2), flush=True)
    for epoch in range(2):  # the first batch of two epochs: one batch is enough data for any loader
        data.loader.set_epoch(epoch)
        stats = trainer(next(iter(data.loader)))
    console.print(f"dry run: 2 steps on {trial.batch_size} images OK; "
                  f"{format_stats(dict(zip(STAT_NAMES, stats.tolist())))}")
    return None


def format_seconds(seconds: float) -> str:
    minutes, s = divmod(seconds, 60)
    return f"{int(minutes)}m{s:04.1f}s" if minutes else f"{s:.1f}s"
