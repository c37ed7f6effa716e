"""What a run writes into its folder, and only rank 0 writes: metrics.jsonl and the TensorBoard events (each record
to both), the sample grids (each to its PNG and to TensorBoard), the checkpoints, and the end products (the loss
plot, the animation, netG.pth). The other ranks get NoOutputs, which writes nothing, so the loop never asks which
rank it is on. Also the bookkeeping of a resume: what the first attempt wrote after its checkpoint moves aside.

Files in run/checkpoints/: epochNNN.pt at each epoch's end (kept), last.pt the latest checkpoint (a hard link to
the newest epoch file, or its own file when written mid-epoch by --ckpt-every or on a stop). Every file is written
to a temporary name and renamed, so a write cut short (disk full, kill -9) leaves the previous one whole.
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Optional

import torch

from . import checkpoint, runfolder
from .atomic import atomic_write
from .config import Config
from .data.files import write_skipped
from .plot import plot_losses
from .report import (MetricsLog, console, grid_step, image_grid, plural, sample_grids, save_animation,
                     save_image_atomic, write_json)
from .sampling import sample


class RunOutputs:
    """Rank 0's writer of the run folder `run` (created and locked by open_outputs)."""

    def __init__(self, run: Path, tensorboard: bool, ema: bool, real_images: Callable[[], torch.Tensor]):
        """`real_images()`: the first images of epoch 1 for samples/real.png, the tutorial's "Training Images"
        (drawn once: a resumed run keeps the first attempt's)."""
        self.run = run
        real = run / "samples" / "real.png"
        if not real.exists():  # (before TensorBoard opens: a new events file shows it at step 0)
            save_image_atomic(image_grid(real_images(), nrow=8), real)
        self.metrics = MetricsLog(run / "metrics.jsonl")
        if tensorboard:
            from .tensorboard_log import TensorBoardLog
            self.tensorboard = TensorBoardLog(run)
        else:
            self.tensorboard = None
        self.grid_prefix = "fake_ema_" if ema else "fake_"  # with --ema the grids are the average's, and say so

    def record(self, record: dict) -> None:
        """A metrics record (a log interval's statistics, or a quality measurement): metrics.jsonl, TensorBoard."""
        self.metrics.write(record)
        if self.tensorboard:
            self.tensorboard.write(record)

    def grid(self, netG: torch.nn.Module, noise: torch.Tensor, tag: str, batch_statistics: bool = False) -> None:
        """A fixed-noise grid of `netG` (the sampler: the average with --ema), samples/<prefix><tag>.png."""
        grid = image_grid(sample(netG, noise, batch_statistics), nrow=8)
        path = self.run / "samples" / f"{self.grid_prefix}{tag}.png"
        save_image_atomic(grid, path)
        if self.tensorboard:
            self.tensorboard.sample(grid, path)

    def checkpoint(self, state: Callable[[], dict]) -> Path:
        """Write `state()` into checkpoints/: epochNNN.pt and last.pt linked to it at an epoch's end, last.pt alone
        mid-epoch."""
        content = state()
        folder = self.run / "checkpoints"
        if content["iteration"] == 0:
            epoch_file = folder / f"epoch{content['epoch']:03d}.pt"
            checkpoint.write_file(epoch_file, content)
            checkpoint.link_or_copy(epoch_file, folder / "last.pt")
            return epoch_file
        checkpoint.write_file(folder / "last.pt", content)  # replaces the name only: a linked epoch file stays whole
        return folder / "last.pt"

    def finish(self, netG: torch.nn.Module, loss_history: torch.Tensor, ema=None) -> None:
        """The end products (at the end, and on a stop: the run so far): the loss plot, the animation of the
        progress grids, netG.pth (pytorch/examples' format: the unwrapped generator's state dict, on the CPU) and
        netG_ema.pth."""
        weights = {k: v.cpu() for k, v in checkpoint.unwrap(netG).state_dict().items()}
        write_end_products(self.run, weights, loss_history, ema.state_dict()["netG_ema"] if ema is not None else None)

    def close(self) -> None:
        self.metrics.close()
        if self.tensorboard:
            self.tensorboard.close()


def write_end_products(run: Path, netG: dict, loss_history: torch.Tensor, netG_ema: Optional[dict] = None) -> None:
    """loss.png, progress.gif, netG.pth (and netG_ema.pth) from G's state dict and the (step, 2) loss history."""
    steps = torch.arange(1, loss_history.shape[0] + 1)
    plot_losses(steps, loss_history[:, 1], loss_history[:, 0], run / "loss.png")
    save_animation(sample_grids(run / "samples"), run / "progress.gif")
    checkpoint.write_file(run / "netG.pth", netG)
    if netG_ema is not None:
        checkpoint.write_file(run / "netG_ema.pth", netG_ema)


def finish_from_checkpoint(run: Path, payload: dict, path: Path, held: Optional[ExitStack]) -> Path:
    """A run whose final checkpoint `payload` (at `path`) was written but whose end products were not (a kill, a
    full disk): write them from it, under the run folder's lock, training nothing."""
    lock, _ = runfolder.create(run, resuming=True)
    if held is not None:
        held.callback(lock.release)
    write_end_products(run, checkpoint.strip_prefixes(payload["netG"]), payload["loss_history"][:payload["step"]],
                       payload.get("netG_ema"))
    console.print(f"fastgan: {path} is the run's final checkpoint ({plural(payload['epoch'], 'epoch')}): wrote the "
                  f"end products it lacked (loss.png, progress.gif, netG.pth); results in {run}")
    return run


class NoOutputs:
    """What the ranks other than 0 write: nothing."""
    run = None

    def record(self, record: dict) -> None: ...
    def grid(self, netG, noise, tag: str, batch_statistics: bool = False) -> None: ...
    def checkpoint(self, state) -> None: ...
    def finish(self, netG, loss_history, ema=None) -> None: ...
    def close(self) -> None: ...


def open_outputs(cfg: Config, run: Path, resumed: Optional[dict], carried: int, skipped: list,
                 real_images: Callable[[], torch.Tensor], held: Optional[ExitStack]) -> RunOutputs:
    """Rank 0's part of the set-up, once every check has passed: the run folder created and locked (for as long
    as `held` lasts), an earlier run that ended before its first checkpoint moved aside, what a resumed run's first
    attempt wrote after its checkpoint moved aside, the config and the skipped-file list written."""
    lock, moved = runfolder.create(run, resuming=resumed is not None)
    if held is not None:
        held.callback(lock.release)
    if moved:
        console.print(f"fastgan: {run} held a run that ended before its first checkpoint: its files moved to {moved}")
    step = resumed["step"] if resumed else 0
    if resumed:
        records, grids = set_aside_later_results(run, step, carried)
        moved = [f"{plural(count, what)} to {where}" for count, what, where in (
            (records, "metrics record", run / f"metrics.after-{step}.jsonl"),
            (grids, "sample grid", run / "samples" / f"after-{step}")) if count]  # only what moved, where it went
        if moved:
            console.print(f"fastgan: what was written after the checkpoint at iteration {step} is made again now, "
                          f"so it moves aside: {', '.join(moved)}")
    config_file = run / "config.json"
    write_json(config_file if not config_file.exists() else run / f"config.resumed-at-{step}.json", cfg.to_dict())
    if skipped:
        write_skipped(skipped, run / "skipped_files.txt")
        console.print(f"fastgan: the {len(skipped):,} skipped files are listed in {run / 'skipped_files.txt'}")
    return RunOutputs(run, cfg.tensorboard, cfg.ema_kimg is not None, real_images)


def set_aside_later_results(run: Path, step: int, carried: int = 0) -> tuple[int, int]:
    """Before resuming from iteration `step`, whose checkpoint carries the last `carried` steps' statistics (an
    interval it cut short): what the first attempt wrote after its checkpoint is made again now, so it moves
    aside instead of being overwritten or duplicated. metrics.jsonl's records after step - carried (the later
    ones, and the record of the interval cut short, which the resumed run writes whole) go to
    metrics.after-<step>.jsonl, later sample grids to samples/after-<step>/. Returns (records, grids)."""
    return (trim_metrics(run / "metrics.jsonl", step - carried, aside=f"metrics.after-{step}.jsonl"),
            move_later_samples(run / "samples", step))


def parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def move_later_samples(folder: Path, step: int) -> int:
    later = [p for p in sample_grids(folder) if grid_step(p) > step]
    if later:
        aside = folder / f"after-{step}"
        aside.mkdir(exist_ok=True)
        for p in later:
            os.replace(p, aside / p.name)
    return len(later)


def trim_metrics(path: Path, step: int, aside: Optional[str] = None) -> int:
    """Move metrics.jsonl's records after `step` (written after the checkpoint being resumed, and about to be
    written again) into `aside` beside it (metrics.after-<step>.jsonl), so each step has one record; return how
    many."""
    if not path.exists():
        return 0
    keep, later, text = [], [], path.read_text()
    lines = text.splitlines()
    torn = bool(lines) and not text.endswith("\n") and not parses(lines[-1])
    for line in lines[:-1] if torn else lines:  # a last record cut short (a full disk, a kill): dropped
        try:
            (later if json.loads(line).get("step", 0) > step else keep).append(line)
        except ValueError:
            keep.append(line)  # not ours to judge: left in place
    if torn and not later:
        with atomic_write(path, "w") as f:
            f.write("".join(line + "\n" for line in keep))
    if later:
        with open(path.with_name(aside or f"metrics.after-{step}.jsonl"), "a") as f:
            f.write("\n".join(later) + "\n")
        with atomic_write(path, "w") as f:
            f.write("".join(line + "\n" for line in keep))
    return len(later)
