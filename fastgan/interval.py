"""The statistics of a log interval: kept on the device step by step, read once per interval.

Each step's statistics (Loss_D, Loss_G, D(x), D(G(z)) before and after D's update) are copied into a device
history without a host sync; `read` moves the interval to the host once (the loop's only regular host sync),
extends the loss history, checks the losses are finite, and returns the metrics record (which the run's outputs
write and the progress shows).

Intervals end at global step numbers (each multiple of --log-every, and each epoch's end), never at a checkpoint:
a checkpoint taken inside an interval carries its rows (`unfinished`), and the run resumed from it continues
that interval, so an interrupted and resumed run writes the records of the run left alone.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from .distributed import Ranks
from .errors import FastganError
from .schedule import Position
from .step import STAT_NAMES

NONFINITE_PATIENCE = 100  # fp16: consecutive steps with non-finite losses (each skipped by the scaler) tolerated


class IntervalStats:
    def __init__(self, log_every: int, trainer, ranks: Ranks, batch_size: int, run: Optional[Path],
                 loss_history: torch.Tensor, carried: Optional[dict] = None):
        """`trainer`: its device, precision and GradScaler; `batch_size`: this rank's; `run`: the run folder, for the
        last good checkpoint's name when the losses stop being finite. loss_history: Loss_D and Loss_G of every step
        so far, (steps, 2); carried: `unfinished()` of the checkpoint being resumed, whose rows are the last of
        loss_history's and continue this run's first interval."""
        rows = carried["stats"] if carried else torch.zeros(0, len(STAT_NAMES))
        # + len(rows): a run resumed with a smaller --log-every than the checkpoint's has a longer first interval
        self.history = torch.zeros(log_every + len(rows), len(STAT_NAMES), device=trainer.device)
        self.history[:len(rows)] = rows.to(trainer.device)
        self.precision, self.scaler = trainer.precision.name, trainer.scaler
        self.ranks, self.batch_size, self.run = ranks, batch_size, run
        # (steps, 2) host pieces: the carried rows' losses come back with their interval's read
        self.losses = [loss_history[:len(loss_history) - len(rows)]]
        self.pending = len(rows)  # steps recorded since the last read
        self.timed = 0  # of those, the steps this process trained, since interval_start: its images/s
        self.nonfinite_streak = carried["nonfinite_streak"] if carried else 0
        self.run_start = self.interval_start = time.perf_counter()
        self.aside = 0.0  # seconds spent on other work than training (--eval-every): not in any images/s

    def set_aside(self, seconds: float) -> None:
        """Keep `seconds` of other work (between two steps) out of the interval's and the run's images/s."""
        self.interval_start += seconds
        self.aside += seconds

    def add(self, stats: torch.Tensor) -> None:
        """One step's statistics (a device tensor): a device copy, no host sync."""
        self.history[self.pending] = stats
        self.pending += 1
        self.timed += 1

    def unfinished(self) -> dict:
        """The interval read so far, for a checkpoint: its rows (pending, len(STAT_NAMES)) on the CPU (a host sync,
        at saves only) and the non-finite streak before them. `IntervalStats(carried=...)` continues from it."""
        return {"stats": self.history[:self.pending].cpu(), "nonfinite_streak": self.nonfinite_streak}

    def loss_history(self) -> torch.Tensor:
        """Loss_D and Loss_G of every step read so far, (steps, 2) on the CPU."""
        if len(self.losses) > 1:
            self.losses = [torch.cat(self.losses)]
        return self.losses[0]

    def read(self, at: Position) -> dict:
        """The metrics record of the steps since the last read, ending at `at` (in the middle of an epoch, or at its
        last batch): the loss history extended, the losses checked (every rank stops together), the statistics'
        means, images/s (and the loss scale under fp16)."""
        values = self.history[:self.pending].cpu()  # note: the host sync of this interval
        now = time.perf_counter()
        first_step = at.step - self.pending + 1
        self.losses.append(values[:, :2].clone())
        problem = self.nonfinite(values, first_step)
        if self.ranks.vote(problem is not None):
            advice = " Lower --lr." if self.precision == "fp16" else (
                " Lower --lr, or try --amp fp16 (its GradScaler skips steps that overflow).")
            raise FastganError(f"{problem or 'another rank saw non-finite losses'}; training stopped. "
                               + last_good_checkpoint(self.run) + advice)
        stats = dict(zip(STAT_NAMES, values.mean(0).tolist()))
        per_rank = self.timed * self.batch_size / max(now - self.interval_start, 1e-9)
        images_per_second = per_rank * self.ranks.world_size  # rank 0's pace, for all ranks: they run in step
        self.pending, self.timed, self.interval_start = 0, 0, now
        return {"epoch": at.epoch + 1, "iteration": at.iteration, "step": at.step, **stats,
                "images_per_second": round(images_per_second, 1),
                **({"images_per_second_per_rank": round(per_rank, 1)} if self.ranks.launched else {}),
                **({"loss_scale": self.scaler.get_scale()} if self.scaler.is_enabled() else {}),
                "time": round(now - self.run_start, 3)}

    def nonfinite(self, values: torch.Tensor, first_step: int) -> Optional[str]:
        """What is wrong with the interval's losses, or None. fp32/bf16 stop at the first non-finite loss; fp16
        lets the GradScaler skip such steps and stops after NONFINITE_PATIENCE in a row."""
        for k, finite in enumerate(torch.isfinite(values[:, :2]).all(1).tolist()):
            self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
            if not finite and (self.precision != "fp16" or self.nonfinite_streak >= NONFINITE_PATIENCE):
                bad = dict(zip(("Loss_D", "Loss_G"), values[k, :2].tolist()))
                return (f"the losses became non-finite at iteration {first_step + k} ("
                        + ", ".join(f"{name} {v:.4f}" for name, v in bad.items()) + ")"
                        + (f" for {self.nonfinite_streak} steps in a row, each skipped by the GradScaler"
                           if self.precision == "fp16" else ""))
        return None


def last_good_checkpoint(run: Optional[Path]) -> str:
    last = run / "checkpoints" / "last.pt" if run else None
    return (f"The last good checkpoint is {last}." if last and last.exists()
            else "No checkpoint had been written yet.")
