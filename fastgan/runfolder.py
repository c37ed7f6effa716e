"""The run folder: chosen and checked before anything is written, created only once every set-up check has passed,
locked while its run lives, and never overwritten.

    folder = choose(cfg.out, resuming)     # checks only: refuses a file, another run's results, a folder in use
    ...                                    # data, model, resume: everything that can fail on bad input
    lock, moved = create(folder, resuming) # creates it, locks it, sets aside a run that ended before a checkpoint

A folder that holds files is refused, unless the run resumes from it, or it holds a run that ended before its
first checkpoint (a crash, an out-of-memory kill, a failed compile): that one cannot be resumed and would block
`--out` for ever, so its files move into `unfinished-<k>/` inside it and the new run starts there. The lock (an
exclusive flock on `.fastgan.lock`, where the platform has flock) keeps a second `fastgan train` off a folder
whose run is still going, resumed or not.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from .atomic import remove_leftovers, why_not_writable
from .errors import FastganError

try:
    import fcntl
except ImportError:  # Windows: no flock; the folder checks still hold, concurrent runs are not detected
    fcntl = None

LOCK_NAME = ".fastgan.lock"
UNFINISHED = "unfinished-"


def default_folder() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = Path("runs") / stamp, 1
    while folder.exists():
        n += 1
        folder = Path("runs") / f"{stamp}-{n}"
    return folder


def unfinished(folder: Path) -> bool:
    """Whether `folder` holds a fastgan run that ended before writing any checkpoint or netG.pth."""
    checkpoints = folder / "checkpoints"
    return ((folder / "config.json").is_file() and not (folder / "netG.pth").exists()
            and not (checkpoints.is_dir() and any(checkpoints.glob("*.pt"))))


def in_use(folder: Path) -> Optional[str]:
    """The pid of the live fastgan run that holds `folder`'s lock, or None (not locked, or no flock here)."""
    path = folder / LOCK_NAME
    if fcntl is None or not path.is_file():
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            return f.read().strip() or "unknown"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def choose(out: Optional[str], resuming: bool) -> Path:
    """The run folder for --out (runs/<timestamp> when None), checked but not created."""
    folder = default_folder() if out is None else Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FastganError(f"--out {folder} exists and is not a folder")
    if not folder.is_dir():
        ancestor = next(p for p in folder.absolute().parents if p.exists())  # the root exists
        why = ("Not a directory" if not ancestor.is_dir() else
               why_not_writable(ancestor) if not os.access(ancestor, os.W_OK | os.X_OK) else None)
        if why:
            raise FastganError(f"--out {folder} is not writable ({why}: {ancestor}); choose another folder")
        return folder
    if not os.access(folder, os.W_OK | os.X_OK):  # said now, not after the data is read (minutes for CelebA)
        raise FastganError(f"--out {folder} is not writable ({why_not_writable(folder)}); choose another folder")
    pid = in_use(folder)
    if pid is not None:
        raise FastganError(f"--out {folder} is in use by another fastgan train (process {pid}); wait for it to "
                           "end, or choose another folder")
    if any(p.name != LOCK_NAME for p in folder.iterdir()) and not resuming and not unfinished(folder):
        raise FastganError(f"--out {folder} already holds files; choose a new folder, or add --resume auto "
                           "to continue the run in it")
    return folder


class Lock:
    """The run's exclusive lock on its folder, held until release() (the end of the run)."""

    def __init__(self, folder: Path):
        self.file = None
        if fcntl is None:
            return
        self.file = open(folder / LOCK_NAME, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise FastganError(f"--out {folder} is in use by another fastgan train, which started just now; "
                               "choose another folder") from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the file releases the flock
            self.file = None


def create(folder: Path, resuming: bool) -> tuple[Lock, Optional[Path]]:
    """Create and lock the chosen folder; (the lock, where an unfinished earlier run's files moved, or None)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = Lock(folder)
    except OSError as e:
        raise FastganError(f"--out {folder} is not writable ({e.strerror or e})") from None
    try:
        moved = None if resuming or not unfinished(folder) else set_aside(folder)
        (folder / "samples").mkdir(exist_ok=True)
        (folder / "checkpoints").mkdir(exist_ok=True)
        # the temporary files of writes a kill cut short (checkpoints: the size of the model, each)
        remove_leftovers([folder, folder / "samples", folder / "checkpoints"])
    except OSError as e:
        lock.release()
        raise FastganError(f"--out {folder} is not writable ({e.strerror or e})") from None
    except BaseException:
        lock.release()
        raise
    return lock, moved


def set_aside(folder: Path) -> Path:
    """Move an unfinished run's files into folder/unfinished-<k>/ (earlier such folders stay where they are)."""
    taken = [int(p.name[len(UNFINISHED):]) for p in folder.glob(f"{UNFINISHED}*") if p.name[len(UNFINISHED):].isdigit()]
    target = folder / f"{UNFINISHED}{max(taken, default=0) + 1}"
    target.mkdir()
    for entry in list(folder.iterdir()):
        if entry != target and entry.name != LOCK_NAME and not entry.name.startswith(UNFINISHED):
            entry.rename(target / entry.name)
    return target
