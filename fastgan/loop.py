"""`train(cfg)`: the whole training run, from a Config to a run folder. `fastgan train` is a thin layer over it.

    from fastgan import Config, train
    run = train(Config(root="~/celeba", epochs=5))   # -> Path of the run folder

The run reads top to bottom: the set-up (every check before anything is written, then the run folder), the loop
(the hot path, then the maintenance that falls due: log, sample, stop, checkpoint; then each epoch's end), and the
end products. Performance switches (device, autocast, GradScaler, channels_last, torch.compile, CUDA graphs) are
decided once, in build_trainer; the loop never asks which are on. Statistics stay on the device and are read once
per log interval (the only host sync in the loop besides samples and checkpoints).
"""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint, distributed, runfolder
from .atomic import DiskFull
from .config import Config
from .cpu import use_threads
from .data import open_data, resolve_loader
from .distributed import resolve_device
from .errors import FastganError, TrainingStopped
from .interrupt import StopRequests
from .interval import IntervalStats, last_good_checkpoint
from .models import count_parameters
from .outputs import NoOutputs, RunOutputs, finish_from_checkpoint, open_outputs
from .report import RunProgress, console, format_stats
from .resume import check_resumable, find_resume_checkpoint, unfinished_interval
from .sampling import FIXED_NOISE_SIZE, make_fixed_noise
from .schedule import Position, Schedule
from .step import STAT_NAMES
from .tensorboard_log import summary_writer_class
from .trainer import Precision, Trainer, build_trainer, resolve_precision


def train(cfg: Config, resumed: Optional[dict] = None) -> Optional[Path]:
    """Train as cfg says; return the run folder (None for a dry run, which writes nothing, and on ranks other
    than 0 under torchrun, which write nothing either). `resumed`: cfg.resume's checkpoint when the caller has
    read it already (the CLI does, for the run's options), so that it is read once."""
    cfg.validate()
    ranks, device = distributed.start(cfg.device, cfg.batch_size, cfg.cuda_graphs, cfg.sync_bn)
    quiet_before, threads_before = console.quiet, torch.get_num_threads()
    console.quiet = quiet_before or not ranks.is_main  # under torchrun, rank 0 speaks for all
    try:
        with ExitStack() as held:  # the run folder's lock, released however the run ends
            run = train_ranked(cfg, ranks, device or resolve_device(cfg.device), resumed, held)
        return run.resolve() if run else None  # absolute: the caller may change directory after
    finally:
        console.quiet = quiet_before
        torch.set_num_threads(threads_before)  # the caller's count again (--threads)
        distributed.stop()


@dataclass
class RunState:
    """What a checkpoint holds besides the trainer's state: where the run stands, the fixed noise behind the
    grids, the loss history and the log interval in progress (`stats`), the data's size and the options."""
    cfg: Config
    position: Position
    fixed_noise: torch.Tensor
    stats: IntervalStats
    images: int  # the data's size: each epoch's order is a permutation of this many

    def state_dict(self) -> dict:
        # the log interval a checkpoint cuts short: its statistics, not yet in metrics.jsonl, so that the resumed
        # run finishes that interval and writes the record an unbroken run writes
        interval = self.stats.unfinished()
        return {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, **self.position.state_dict(),
                "images": self.images, "fixed_noise": self.fixed_noise.cpu(),
                # (step, 2): Loss_D and Loss_G of every step up to here, for the loss plot
                "loss_history": torch.cat([self.stats.loss_history(), interval["stats"][:, :2]]),
                "interval": interval, "config": self.cfg.to_dict()}


def train_ranked(cfg: Config, ranks: distributed.Ranks, device: torch.device, resumed: Optional[dict] = None,
                 held: Optional[ExitStack] = None) -> Optional[Path]:
    # ---- set-up: every check that can fail on bad input passes before anything is written ------------------
    if cfg.cuda_graphs and device.type != "cuda":
        raise FastganError("--cuda-graphs needs a CUDA device (--device cuda)")
    threads = use_threads(cfg.threads)
    precision = resolve_precision(cfg.amp, device, cfg.cuda_graphs)
    if precision.note:  # a dry run says it too
        console.print(f"fastgan: note: {precision.note}")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: autotune each convolution once
    loader_name, decoder = resolve_loader(cfg, device)
    if cfg.tensorboard:
        summary_writer_class()  # without the package: one line naming the extra, before anything is written
    resume_path = find_resume_checkpoint(cfg, console.print)
    out = run_folder_of(cfg, resume_path)
    resumed = check_resumable(resume_path, cfg, resumed, Path(out).expanduser() if out else None) \
        if resume_path else None
    if cfg.dry_run:
        return dry_run(cfg, device, threads, precision, loader_name, decoder)
    run = None  # rank 0's: chosen and checked now, created once every other check has passed
    with ranks.together("checking the run folder"):
        if ranks.is_main:
            run = runfolder.choose(out, resuming=resumed is not None)
    if resumed and resumed["epoch"] >= cfg.epochs:  # its final checkpoint: a kill or a full disk cut the end short
        return finish_from_checkpoint(run, resumed, resume_path, held) if ranks.is_main else None
    batch_size = distributed.per_rank_batch(cfg.batch_size, ranks.world_size)  # this rank's share
    with ranks.local_main_first("reading the data"):  # local rank 0 fills the file index's cache first
        data = open_data(cfg, device, precision.dtype, loader_name, decoder, ranks)
    loader, steps_per_epoch = data.loader, len(data.loader)
    console.print(f"fastgan: {data.summary}")
    announce(cfg, ranks, device, threads, precision, batch_size, data.description, run)

    trainer = build_trainer(cfg, device, precision, ranks, data.graph_feed)
    position, fixed_noise, loss_history, carried = Position(), make_fixed_noise(cfg), torch.zeros(0, 2), None
    if resumed:
        trainer.load_state_dict(resumed)
        position, fixed_noise = Position.of(resumed), resumed["fixed_noise"]
        loss_history = resumed["loss_history"][:position.step]
        carried = unfinished_interval(resumed)  # the log interval the checkpoint cut short: continued here
    with ranks.together("preparing the run folder"):  # every check has passed: the first things written
        outputs = open_outputs(cfg, run, resumed, len(carried["stats"]) if carried else 0, data.bad,
                               lambda: data.preview(FIXED_NOISE_SIZE), held) if ranks.is_main else NoOutputs()
    stats = IntervalStats(cfg.log_every, trainer, ranks, batch_size, run, loss_history, carried)
    state = RunState(cfg, position, fixed_noise.to(device), stats, data.count)
    if resumed:
        console.print(f"fastgan: resumed from {resume_path} at {position.describe(steps_per_epoch)}")
        if position.iteration and resumed.get("images", data.count) != data.count:
            console.print(f"fastgan: note: the data now holds {data.count:,} images, {resumed['images']:,} when the "
                          "checkpoint was written, so the rest of this epoch follows a different order")
    measure = None  # --eval-every: rank 0 measures, the others wait at the next vote
    if cfg.eval_every and ranks.is_main:
        from .metrics.evaluate import DuringTraining
        measure = DuringTraining(cfg.to_dict(), cfg.eval_images, device, cfg.inception)
        console.print(f"fastgan: every {cfg.eval_every} epoch{'s' if cfg.eval_every > 1 else ''}: "
                      f"{', '.join(m.upper() for m in measure.metrics)} of {min(cfg.eval_images, data.count):,} "
                      "images into metrics.jsonl"  # (all the real images where the data holds fewer)
                      + ("" if "fid" in measure.metrics else " (FID/KID: no Inception weights at hand, see --inception)"))
    schedule = Schedule(cfg, steps_per_epoch, ranks.launched)
    first_step = position.step

    # ---- the loop -----------------------------------------------------------------------------------------
    stop, saved = False, None  # saved: (path, position) of this run's latest checkpoint (path None off rank 0)
    try:
        with StopRequests(announce=ranks.is_main) as stops, RunProgress(
                cfg.epochs * steps_per_epoch, position.epoch * steps_per_epoch + position.iteration, cfg.quiet,
                cfg.epochs, steps_per_epoch) as progress:
            if position.step == 0:  # the untrained G, the animation's first frame (its initial running statistics)
                outputs.grid(trainer.sampler, state.fixed_noise, f"step{0:07d}", batch_statistics=True)
            while position.epoch < cfg.epochs and not stop:
                loader.set_epoch(position.epoch, position.iteration)
                progress.epoch(position.epoch, cfg.epochs)
                for batch in loader:
                    stats.add(trainer(batch))  # the hot path: one D and one G update, statistics kept on the device
                    position.advance()
                    progress.advance()
                    due = schedule.after(position, stops)
                    if not due:
                        continue
                    # log: the interval's statistics, read once
                    if due.log:
                        log(stats.read(position), outputs, progress)
                    # sample: a fixed-noise grid
                    if due.sample:
                        outputs.grid(trainer.sampler, state.fixed_noise, f"step{position.step:07d}")
                    # stop: every rank after the same step
                    if due.vote:
                        stop = ranks.vote(stops.requested)
                    # checkpoint inside the epoch (its end has its own)
                    if position.iteration < steps_per_epoch and (stop or due.checkpoint):
                        saved = save_checkpoint(trainer, state, outputs, ranks)
                    if stop:
                        break
                if position.iteration < steps_per_epoch:  # stopped inside the epoch
                    if stats.pending:  # the interval cut short, logged now; the checkpoint carries it, and a
                        log(stats.read(position), outputs, progress)  # resumed run writes the whole one instead
                    break
                # ---- the epoch's end: its grid, its measurement (before its checkpoint: a run resumed from an
                # earlier one measures it again), its checkpoint
                outputs.grid(trainer.sampler, state.fixed_noise,
                             f"step{position.step:07d}_epoch{position.epoch + 1:03d}")
                progress.epoch_end()
                with ranks.together("measuring the generator (--eval-every)"):
                    if measure is not None and (position.epoch + 1) % cfg.eval_every == 0:
                        measure_epoch(measure, trainer, position, stats, outputs, cfg.epochs)
                position.end_epoch()
                saved = save_checkpoint(trainer, state, outputs, ranks)
    except DiskFull as e:  # a checkpoint, grid or record cut short: the checkpoint before it is whole
        raise FastganError(f"{e}; free some room there, then {way_on(run, ranks)}") from None
    except KeyboardInterrupt:
        last = run / "checkpoints" / "last.pt" if run else None
        console.print(f"fastgan: interrupted at once at iteration {position.step}; " + (
            f"the last checkpoint {last} is intact: continue with {resume_command(run, ranks)}"
            if last and last.exists() else "no checkpoint had been written yet"))
        raise
    finally:
        outputs.close()

    # ---- the end products -----------------------------------------------------------------------------------
    try:
        outputs.finish(trainer.netG, stats.loss_history(), trainer.ema)  # on a stop: the run so far
    except DiskFull as e:
        raise FastganError(f"{e}; free some room there, then {way_on(run, ranks)}") from None
    if stop and saved[1].epoch < cfg.epochs:  # (a stop asked for during the very last step changes nothing)
        path, at = saved
        # a rank can be outvoted into stopping before its own copy of the signal arrives
        why = signal.Signals(stops.signum).name if stops.signum else "another rank's stop request"
        raise TrainingStopped(f"stopped by {why} at {at.describe(steps_per_epoch)}"
                              + (f"; checkpoint {path}; loss.png, progress.gif and netG.pth show the run so far. "
                                 f"Continue with: {resume_command(run, ranks)}" if path else ""),
                              stops.signum or signal.SIGTERM)
    elapsed = time.perf_counter() - stats.run_start - stats.aside
    images = (position.step - first_step) * cfg.batch_size  # all ranks together
    console.print(f"fastgan: trained {images:,} images in {format_seconds(elapsed)}: "
                  f"{images / max(elapsed, 1e-9):,.0f} images/s"
                  + (f" ({images / ranks.world_size / max(elapsed, 1e-9):,.0f} per rank)" if ranks.launched else "")
                  + (f", and {format_seconds(stats.aside)} measuring (--eval-every)" if stats.aside else "")
                  + f"; results in {run}")
    return run


# ---------------------------------------------------------------------------------------------------------
# the maintenance blocks

def log(record: dict, outputs: RunOutputs, progress: RunProgress) -> None:
    outputs.record(record)
    progress.log(record)


def save_checkpoint(trainer: Trainer, state: RunState, outputs: RunOutputs,
                    ranks: distributed.Ranks) -> tuple[Optional[Path], Position]:
    """Refuse non-finite weights (every rank together), then write (rank 0). A log interval in progress is carried
    in the checkpoint, not logged: records end at the same steps whatever the checkpoints."""
    if ranks.vote(not trainer.all_finite()):
        raise FastganError(f"the weights are no longer finite at iteration {state.position.step}; not saving them. "
                           + last_good_checkpoint(outputs.run) + " Lower --lr.")
    return outputs.checkpoint(lambda: {**trainer.state_dict(), **state.state_dict()}), state.position.copy()


def measure_epoch(measure, trainer: Trainer, position: Position, stats: IntervalStats, outputs: RunOutputs,
                  epochs: int) -> None:
    """--eval-every: the epoch's sampler (the average with --ema) measured; its time kept out of images/s."""
    started = time.perf_counter()
    record = {"step": position.step, "epoch": position.epoch + 1, "generator": "ema" if trainer.ema else "raw",
              **measure(trainer.sampler)}
    stats.set_aside(time.perf_counter() - started)
    outputs.record(record)
    console.print(f"[{position.epoch + 1}/{epochs}] eval: " + "  ".join(
        f"{k.upper()}: {v:.4f}" if k == "kid" else f"{k.upper()}: {v:.2f}" for k, v in record.items()
        if k.startswith("swd") or k in ("fid", "kid")))


# ---------------------------------------------------------------------------------------------------------
# set-up helpers

def announce(cfg: Config, ranks: distributed.Ranks, device: torch.device, threads: int, precision: Precision,
             batch_size: int, loader: str, run: Optional[Path]) -> None:
    """The run's first line: what it decided (device, torch's CPU threads, processes, precision, loader, speed
    switches, folder)."""
    processes = (f"{ranks.world_size} process{'es' if ranks.world_size > 1 else ''} "
                 f"({'NCCL' if device.type == 'cuda' else 'gloo'}), batch "
                 f"{batch_size} each{', SyncBatchNorm' if cfg.sync_bn else ''}, " if ranks.launched else "")
    console.print(f"fastgan: device {device}, {threads} CPU thread{'s' if threads > 1 else ''}, {processes}"
                  f"precision {precision.name}, {loader}, channels_last {'on' if cfg.channels_last else 'off'}, "
                  f"compile {'on' if cfg.compile else 'off'}, CUDA graphs {'on' if cfg.cuda_graphs else 'off'} "
                  f"-> {run}")


def run_folder_of(cfg: Config, resume_path: Optional[Path]) -> Optional[str]:
    """--out, or the run folder of the checkpoint being resumed, or None (runs/<timestamp>)."""
    if cfg.out is None and resume_path is not None and resume_path.parent.name == "checkpoints":
        return str(resume_path.parent.parent)  # continue in the run folder the checkpoint belongs to
    return cfg.out


def way_on(run: Optional[Path], ranks: distributed.Ranks) -> str:
    """The next command after a fault: resume from the last checkpoint, or (none yet) start again."""
    if run and (run / "checkpoints" / "last.pt").exists():
        return f"continue with: {resume_command(run, ranks)}"
    return "run the same command again"


def resume_command(run: Path, ranks: distributed.Ranks) -> str:
    launcher = "the same torchrun command with" if ranks.launched else "fastgan train"
    return f"{launcher} --out {run} --resume auto"


def dry_run(cfg: Config, device: torch.device, threads: int, precision: Precision, loader_name: str,
            decoder: str) -> None:
    """Print the run's plan (its options and what they resolve to) as JSON on stdout, so that `--dry-run >
    plan.json` keeps it, then run two steps on a tiny batch from the loader the run would build (its worker
    processes or threads included); write nothing."""
    # no bars without a terminal, where rich leaves a blank line for each
    trial = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, 4), quiet=cfg.quiet or not console.is_interactive)
    data = open_data(trial, device, precision.dtype, loader_name, decoder)
    trainer = build_trainer(trial, device, precision, graph_feed=data.graph_feed)
    plan = {**cfg.to_dict(), "resolved": {
        "device": str(device), "threads": threads, "precision": precision.name, "loader": data.description,
        "data": data.summary, "skipped": len(data.bad),
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
