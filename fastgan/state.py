"""A run's state: what its checkpoints hold (snapshot), where a run writes them (write_checkpoint), and how a
run finds, checks (check_resumable) and restores one. The file format itself is checkpoint.py's.

A checkpoint holds everything a resumed run needs to continue exactly where it stopped: both networks, both
optimizers, the GradScaler, the epoch and the batch inside it, the step, the training noise's generator and
torch's RNG states, the fixed noise, the loss history and the log interval it cut short. The data order needs
no state of its own: each epoch's order is a pure function of (seed, epoch) (pipeline_torch.rank_order), so a
resumed epoch skips the batches already trained on. In eager fp32 on the CPU a run stopped anywhere and resumed
ends with bit-for-bit the weights and metrics.jsonl records of the same run uninterrupted (tests/test_resume.py).

Files in run/checkpoints/: epochNNN.pt at each epoch's end (kept), last.pt the latest checkpoint (a hard link
to the newest epoch file, or its own file when written mid-epoch by --ckpt-every or on a stop). Every file is
written to a temporary name and renamed, so a write cut short (disk full, kill -9) leaves the previous one whole.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import checkpoint
from .atomic import atomic_write
from .config import MODEL_FIELDS, Config
from .errors import FastganError
from .report import grid_step, plural, sample_grids


@dataclass
class Position:
    """Where a run stands: `epoch` epochs done, `iteration` batches of the next one done, `step` in all."""
    epoch: int = 0
    iteration: int = 0
    step: int = 0

    def describe(self, steps_per_epoch: int) -> str:
        """'iteration 5 (epoch 2, batch 2 of 3)', or 'iteration 6 (the end of epoch 2)'."""
        if self.iteration:
            return f"iteration {self.step} (epoch {self.epoch + 1}, batch {self.iteration} of {steps_per_epoch})"
        return f"iteration {self.step} (the end of epoch {self.epoch})"


def noise_generator(seed: int, device: torch.device) -> torch.Generator:
    """The training noise's own generator, on the training device: its state is part of every checkpoint, and
    nothing else (loader workers, compile, libraries) can shift it. Seeded apart from the fixed noise's."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, 2]).generate_state(1)[0]))
    return generator


# ---------------------------------------------------------------------------------------------------------
# finding and checking a checkpoint to resume

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


def read_checkpoint(path: Path):
    """checkpoint.read_file, and when the file is broken, the error also names the newest readable one before it."""
    try:
        return checkpoint.read_file(path)
    except FastganError as e:
        if "corrupt or truncated" not in str(e):
            raise
        earlier = readable_earlier_checkpoint(path)
        hint = (f"; the newest readable checkpoint beside it is {earlier}: resume with --resume {earlier}"
                if earlier else "; there is no readable checkpoint beside it")
        raise FastganError(f"{e}{hint}") from None


def readable_earlier_checkpoint(broken: Path) -> Optional[Path]:
    """The newest other checkpoint in the same folder that loads (epoch files and last.pt), if any."""
    candidates = [p for p in broken.parent.glob("*.pt") if p.name != broken.name and not p.name.startswith(".")]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            if checkpoint.is_fastgan_checkpoint(checkpoint.read_file(path)):
                return path
        except (FastganError, OSError):
            continue
    return None


def check_model_shape(cfg: Config, saved: dict, path: Path) -> None:
    mismatched = [f"{k}={saved.get(k)} (asked {getattr(cfg, k)})" for k in MODEL_FIELDS
                  if saved.get(k) != getattr(cfg, k)]
    if mismatched:
        raise FastganError(f"checkpoint {path} does not match the model: it was trained with "
                           + ", ".join(mismatched))


def read_resumable(path: Path) -> dict:
    """The checkpoint at `path`, read once, if it is one a run can continue from."""
    payload = read_checkpoint(path)
    if not checkpoint.is_fastgan_checkpoint(payload):
        raise FastganError(f"{path} is not a fastgan training checkpoint (a plain state dict can be used "
                           "with `fastgan generate`, not resumed)")
    return payload


def check_resumable(path: Path, cfg: Config, payload: Optional[dict] = None, run: Optional[Path] = None) -> dict:
    """The checkpoint to resume (`payload` when the caller has read it already), checked against cfg and the run
    folder it goes on in (`run`, where known). Every check passes before the first error is reported, the ones
    that change the command the most first: a hint must not lead to another refusal."""
    payload = read_resumable(path) if payload is None else payload
    check_model_shape(cfg, payload["config"], path)
    if run is not None:
        check_same_run(run, payload, path)
        refuse_overwriting_later_epochs(run, payload["epoch"])
    if payload["config"].get("seed") != cfg.seed:
        raise FastganError(f"checkpoint {path} was trained with --seed {payload['config'].get('seed')}, which "
                           f"decides its data order; resume it without --seed {cfg.seed}")
    saved_batch = payload["config"].get("batch_size")
    if payload.get("iteration", 0) and saved_batch != cfg.batch_size:
        raise FastganError(f"checkpoint {path} stopped inside an epoch at batch size {saved_batch}; resume it "
                           f"with that batch size, or change --batch-size from an epoch's checkpoint (epochNNN.pt)")
    if payload["epoch"] >= cfg.epochs:
        raise FastganError(f"checkpoint {path} has already trained {plural(payload['epoch'], 'epoch')}; pass "
                           f"--epochs larger than {payload['epoch']} to train more")
    return payload


def check_same_run(run: Path, payload: dict, path: Path) -> None:
    """A run folder that holds a run (its config.json) takes only that run's checkpoints: the same model and seed."""
    try:
        theirs = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return  # a new or empty folder (runfolder.choose refuses one that holds other files)
    ours = payload["config"]
    differ = [k for k in (*MODEL_FIELDS, "seed") if theirs.get(k) != ours.get(k)]
    if differ:
        raise FastganError(f"--out {run} holds another run ({', '.join(f'{k}={theirs.get(k)}' for k in differ)}; "
                           f"checkpoint {path} has {', '.join(f'{k}={ours.get(k)}' for k in differ)}): resume into "
                           "the checkpoint's own run folder or a new --out")


def position_of(payload: dict) -> Position:
    return Position(payload["epoch"], payload.get("iteration", 0), payload["step"])


def refuse_overwriting_later_epochs(run: Path, epochs_done: int) -> None:
    """Resuming from an older checkpoint of a run would overwrite its later epochs' files: refuse."""
    later = sorted(p.name for p in (run / "checkpoints").glob("epoch*.pt")
                   if p.stem[5:].isdigit() and int(p.stem[5:]) > epochs_done)
    if later:
        raise FastganError(f"{run} already holds later checkpoints ({', '.join(later)}); resume into a "
                           "new --out folder so that they are kept")


# ---------------------------------------------------------------------------------------------------------
# saving and restoring

def all_finite(*modules_and_optimizers) -> bool:
    """Whether every weight and optimizer state tensor is finite (one pass; at checkpoints only).

    BatchNorm's running statistics are left out: training (in train mode) never reads them, and a batch that
    overflowed in fp16, whose step the GradScaler skipped, has already left non-finite values in D's."""
    tensors = []
    for thing in modules_and_optimizers:
        if isinstance(thing, torch.nn.Module):
            tensors += [t for t in thing.parameters()]
        else:
            tensors += [v for s in thing.state.values() for v in s.values()
                        if isinstance(v, torch.Tensor) and v.is_floating_point()]
    # note: one host sync, at saves only
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def snapshot(cfg: Config, position: Position, netG, netD, optimizerG, optimizerD, scaler,
            noise_generator: torch.Generator,
            fixed_noise: torch.Tensor, loss_history: torch.Tensor, device: torch.device, images: int,
            interval: Optional[dict] = None, ema=None) -> dict:
    return {
        # --ema: the generator's moving average and the images it has counted (absent before it, None when off)
        **(ema.state_dict() if ema is not None else {"netG_ema": None}),
        "format": checkpoint.FORMAT, "version": checkpoint.VERSION,
        "netG": checkpoint.unwrap(netG).state_dict(), "netD": checkpoint.unwrap(netD).state_dict(),
        "optimizerG": optimizerG.state_dict(), "optimizerD": optimizerD.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": position.epoch,          # epochs completed
        "iteration": position.iteration,  # batches of the next epoch completed (0 at an epoch's end)
        "step": position.step,
        "images": images,  # the data's size: each epoch's order is a permutation of this many
        # the training device's CUDA RNG state only: every visible GPU's would not restore on a machine with fewer
        "rng": {"noise": noise_generator.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        "fixed_noise": fixed_noise.cpu(),
        "loss_history": loss_history,  # (step, 2): Loss_D and Loss_G of every iteration, for the loss plot
        # the log interval this checkpoint cut short (IntervalStats.unfinished): its statistics, not yet in
        # metrics.jsonl, so the resumed run finishes that interval and writes the record an unbroken run writes.
        # Absent from checkpoints before it: they were written at an interval's end.
        "interval": interval,
        "config": cfg.to_dict(),
    }


def unfinished_interval(resumed: dict) -> Optional[dict]:
    """The log interval a checkpoint cut short (`snapshot`'s "interval": its rows, none at an interval's end, and
    the fp16 non-finite streak before them, which goes on across the resume either way), or None (old files)."""
    return resumed.get("interval")


def carried_steps(resumed: dict) -> int:
    interval = unfinished_interval(resumed)
    return len(interval["stats"]) if interval else 0


def write_checkpoint(run: Path, state: dict) -> Path:
    """Write a snapshot into the run folder's checkpoints/: epochNNN.pt and last.pt linked to it at an epoch's end, last.pt alone mid-epoch."""
    folder = run / "checkpoints"
    if state["iteration"] == 0:
        epoch_file = folder / f"epoch{state['epoch']:03d}.pt"
        checkpoint.write_file(epoch_file, state)
        checkpoint.link_or_copy(epoch_file, folder / "last.pt")
        return epoch_file
    checkpoint.write_file(folder / "last.pt", state)  # replaces the name only: an epoch file it linked stays whole
    return folder / "last.pt"


def restore(resumed: dict, netG, netD, optimizerG, optimizerD, scaler, noise_generator: torch.Generator,
            device: torch.device, ema=None) -> None:
    """Load a checkpoint's networks, optimizers, scaler, RNG states and --ema's average into this run's objects."""
    netG.load_state_dict(resumed["netG"])
    netD.load_state_dict(resumed["netD"])
    if ema is not None:
        if resumed.get("netG_ema") is not None:
            ema.load_state_dict(resumed)
        else:  # --ema added on resume: the average starts at the resumed G, its ramp-up over the images G has seen
            ema.start_from_generator(resumed["step"] * resumed["config"]["batch_size"])
    optimizerG.load_state_dict(with_run_options(resumed["optimizerG"], optimizerG))
    optimizerD.load_state_dict(with_run_options(resumed["optimizerD"], optimizerD))
    if scaler.is_enabled() and resumed["scaler"]:  # a run that changes precision starts a fresh scaler
        scaler.load_state_dict(resumed["scaler"])
    rng = resumed["rng"]
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda":
        cuda_state = training_device_rng(rng.get("cuda"), device)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
    if "noise" in rng and rng["noise"].numel() == noise_generator.get_state().numel():
        noise_generator.set_state(rng["noise"])
    else:  # a version 1 checkpoint, or one from another device type: a fresh stream, seeded by the step
        noise_generator.manual_seed(int(np.random.SeedSequence([resumed["config"]["seed"], 2, resumed["step"]])
                              .generate_state(1)[0]))


RUN_OPTIMIZER_OPTIONS = ("capturable", "fused")  # how this run steps, not what it learnt: never taken from a checkpoint


def with_run_options(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A copy of a saved optimizer state whose param groups carry this run's capturable and fused.

    load_state_dict restores the saved groups' options, so a checkpoint written without --cuda-graphs would
    come back with capturable False and fail at capture. Given this run's options, torch's own load also puts
    each `step` where they need it (on the parameter's device when capturable or fused)."""
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        return saved  # torch's load refuses it and says why
    groups = [{**group, **{k: current[k] for k in RUN_OPTIMIZER_OPTIONS if k in current}}
              for group, current in zip(saved["param_groups"], optimizer.param_groups)]
    return {**saved, "param_groups": groups}


def training_device_rng(saved, device: torch.device) -> Optional[torch.Tensor]:
    """The saved CUDA RNG state of the training device, or None when the checkpoint has none for it.

    Checkpoints hold that one state; older ones hold a list, one state per GPU visible when they were written,
    of which the entry at the training device's index is taken (none when that machine had fewer GPUs)."""
    if saved is None or isinstance(saved, torch.Tensor):
        return saved
    index = device.index if device.index is not None else torch.cuda.current_device()
    return saved[index] if index < len(saved) else None


def set_aside_later_results(run: Path, step: int, carried: int = 0) -> tuple[int, int]:
    """Before resuming from iteration `step`, whose checkpoint carries the last `carried` steps' statistics (an
    interval it cut short): what the first attempt wrote after its checkpoint is made again now, so it moves
    aside instead of being overwritten or duplicated. metrics.jsonl's records after step - carried (the later
    ones, and the record of the interval cut short, which the resumed run writes whole) go to
    metrics.after-<step>.jsonl, later sample grids to samples/after-<step>/. Returns (records, grids)."""
    return (trim_metrics(run / "metrics.jsonl", step - carried, aside=f"metrics.after-{step}.jsonl"),
            move_later_samples(run / "samples", step))


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
    keep, later = [], []
    for line in path.read_text().splitlines():
        try:
            (later if json.loads(line).get("step", 0) > step else keep).append(line)
        except ValueError:
            keep.append(line)  # not ours to judge: left in place
    if later:
        with open(path.with_name(aside or f"metrics.after-{step}.jsonl"), "a") as f:
            f.write("\n".join(later) + "\n")
        with atomic_write(path, "w") as f:
            f.write("".join(line + "\n" for line in keep))
    return len(later)
