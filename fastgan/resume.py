"""Finding the checkpoint a run continues from, and checking it against the run before anything is written: the
model's shape, the run folder it goes on in, the seed, the batch size inside an epoch, the epochs left.
Every check passes before the first error is reported, the ones that change the command the most first, so that a
hint never leads to a second refusal. (What a checkpoint holds: Trainer.state_dict and loop.RunState.)"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from . import checkpoint
from .config import MODEL_FIELDS, Config
from .errors import FastganError
from .report import plural


def find_resume_checkpoint(cfg: Config, announce: Callable[[str], None] = lambda line: None) -> Optional[Path]:
    """--resume's checkpoint; for auto, --out's newest complete one: last.pt, unless an epoch file is newer (a run
    killed between writing epochNNN.pt and pointing last.pt at it), which `announce` then names."""
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume).expanduser()
        if path.is_dir():
            raise resume_of_a_folder(path)
        return path
    if cfg.out is None:
        raise FastganError("--resume auto needs --out, the run folder to continue")
    folder = Path(cfg.out).expanduser() / "checkpoints"
    last = folder / "last.pt"
    newest = newest_epoch_file(folder)
    if newest is not None and (not last.is_file() or newest.stat().st_mtime_ns > last.stat().st_mtime_ns):
        announce(f"fastgan: {newest.name} is newer than {last.name} (the run ended between writing the two): "
                 f"resuming from {newest}")
        return newest
    if not last.is_file():
        raise FastganError(f"--resume auto: no checkpoint to resume in {folder}")
    return last


def newest_epoch_file(folder: Path) -> Optional[Path]:
    """checkpoints/epochNNN.pt of the highest epoch, or None. (Every checkpoint is renamed into place whole.)"""
    epochs = [p for p in folder.glob("epoch*.pt") if p.stem[5:].isdigit()] if folder.is_dir() else []
    return max(epochs, key=lambda p: int(p.stem[5:]), default=None)


def resume_of_a_folder(folder: Path) -> FastganError:
    """--resume FOLDER: what the folder is, and the command that goes on from it."""
    last = checkpoint.last_in(folder)
    if last is None:
        return FastganError(f"--resume {folder} is a folder without checkpoints/last.pt, not a run to continue; "
                            "give a checkpoint file (--resume RUN/checkpoints/last.pt), or --out RUN --resume auto")
    run, what = (folder, "a run folder") if last.parent == folder / "checkpoints" else (folder.parent,
                                                                                       "a run's checkpoints folder")
    return FastganError(f"--resume {folder} is {what}, not a checkpoint file; continue the run with --out {run} "
                        f"--resume auto, or give the checkpoint: --resume {last}")


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
    if payload["epoch"] >= cfg.epochs and not (run is not None and is_final_without_end_products(path, payload, run)):
        raise FastganError(f"checkpoint {path} has already trained {plural(payload['epoch'], 'epoch')}; pass "
                           f"--epochs larger than {payload['epoch']} to train more")
    return payload


END_PRODUCTS = ("loss.png", "progress.gif", "netG.pth")


def is_final_without_end_products(path: Path, payload: dict, run: Path) -> bool:
    """Whether `payload` (at `path`) is the final checkpoint of the run in `run`, whose end products a kill or a full
    disk cut short: a resume then only writes them (loop.finish_run)."""
    final = payload["epoch"] >= payload["config"].get("epochs", payload["epoch"]) and not payload.get("iteration")
    wanted = END_PRODUCTS + (("netG_ema.pth",) if payload.get("netG_ema") is not None else ())
    return (final and path.parent.resolve() == (run / "checkpoints").resolve()
            and not all((run / name).is_file() for name in wanted))


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


def refuse_overwriting_later_epochs(run: Path, epochs_done: int) -> None:
    """Resuming from an older checkpoint of a run would overwrite its later epochs' files: refuse."""
    later = sorted(p.name for p in (run / "checkpoints").glob("epoch*.pt")
                   if p.stem[5:].isdigit() and int(p.stem[5:]) > epochs_done)
    if later:
        raise FastganError(f"{run} already holds later checkpoints ({', '.join(later)}); resume into a "
                           "new --out folder so that they are kept")


def unfinished_interval(resumed: dict) -> Optional[dict]:
    """The log interval a checkpoint cut short (`snapshot`'s "interval": its rows, none at an interval's end, and
    the fp16 non-finite streak before them, which goes on across the resume either way), or None (old files)."""
    return resumed.get("interval")


def carried_steps(resumed: dict) -> int:
    interval = unfinished_interval(resumed)
    return len(interval["stats"]) if interval else 0


