"""Where a run stands (Position), and which maintenance falls due after a step (Schedule): the loop asks once per
step and goes straight on to the next batch when nothing is due, which is almost always."""
from __future__ import annotations

from dataclasses import dataclass

from .config import Config


@dataclass
class Position:
    """`epoch` epochs done, `iteration` batches of the next one done, `step` steps in all."""
    epoch: int = 0
    iteration: int = 0
    step: int = 0

    @classmethod
    def of(cls, checkpoint: dict) -> "Position":
        return cls(checkpoint["epoch"], checkpoint.get("iteration", 0), checkpoint["step"])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch,          # epochs completed
                "iteration": self.iteration,  # batches of the next epoch completed (0 at an epoch's end)
                "step": self.step}

    def advance(self) -> None:
        """One step trained."""
        self.iteration += 1
        self.step += 1

    def end_epoch(self) -> None:
        self.epoch, self.iteration = self.epoch + 1, 0

    def copy(self) -> "Position":
        return Position(self.epoch, self.iteration, self.step)

    def describe(self, steps_per_epoch: int) -> str:
        """'iteration 5 (epoch 2, batch 2 of 3)', or 'iteration 6 (the end of epoch 2)'."""
        if self.iteration and self.iteration < steps_per_epoch:
            return f"iteration {self.step} (epoch {self.epoch + 1}, batch {self.iteration} of {steps_per_epoch})"
        epoch = self.epoch + (1 if self.iteration else 0)
        return f"iteration {self.step} (the end of epoch {epoch})"


@dataclass
class Due:
    """What falls due after a step; falsy when nothing does."""
    log: bool = False         # the log interval ends: read its statistics (the loop's regular host sync)
    sample: bool = False      # a fixed-noise grid (the epoch's end draws its own)
    vote: bool = False        # decide, together, whether to stop here
    checkpoint: bool = False  # --ckpt-every inside an epoch (the epoch's end writes its own)

    def __bool__(self) -> bool:
        return self.log or self.sample or self.vote or self.checkpoint


class Schedule:
    """Log intervals end at global step numbers (each multiple of --log-every, and each epoch's end), whatever the
    resume point, so an interrupted and resumed run writes the records of the run left alone. A stop request is a
    free local flag for one process; under torchrun the ranks agree on it at interval ends only (a host
    all-reduce), so a stop lands within --log-every steps."""

    def __init__(self, cfg: Config, steps_per_epoch: int, launched: bool):
        self.log_every, self.sample_every, self.ckpt_every = cfg.log_every, cfg.sample_every, cfg.ckpt_every
        self.steps_per_epoch, self.launched = steps_per_epoch, launched

    def after(self, position: Position, stops) -> Due:
        """`stops`: the StopRequests, whose flag is read here only where it is free (one process)."""
        epoch_end = position.iteration == self.steps_per_epoch
        log = position.step % self.log_every == 0 or epoch_end
        return Due(log=log,
                   sample=position.step % self.sample_every == 0 and not epoch_end,
                   vote=log if self.launched else stops.requested,
                   checkpoint=bool(self.ckpt_every) and position.step % self.ckpt_every == 0 and not epoch_end)
