"""The built-in demo data: synthetic faces drawn once and cached, so `fastgan train` works with no download."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from rich.progress import Progress

from ..atomic import abandoned
from ..errors import FastganError
from .files import cache_dir

try:
    import fcntl
except ImportError:  # Windows: no flock; a killed drawing's folder then stays
    fcntl = None
from ..report import console
from . import synth
from .synth import write_faces

DEMO_SEED = 0
DEMO_VERSION = 1  # the folder layout; what the faces look like is keyed by synth.py's own code (drawing_digest)
# demo_folder's names, of every version and size (before the drawing digest, names had none)
DEMO_FOLDER = re.compile(r"demo-faces-v\d+(-[0-9a-f]{8})?-n\d+")


def drawing_digest() -> str:
    """A digest of synth.py's code: a change to how faces are drawn makes another cache folder by itself (a cached
    set of the old drawings would otherwise train on, unnoticed)."""
    return hashlib.sha256(Path(synth.__file__).read_bytes()).hexdigest()[:8]


def demo_folder(n: int) -> Path:
    return cache_dir() / f"demo-faces-v{DEMO_VERSION}-{drawing_digest()}-n{n}"


def is_demo_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a cache folder of demo faces (any version or size, wherever the cache was): how a
    prepared file's manifest (its source_root) says that the file holds the demo faces, in files of every
    fastgan version, without a field of its own."""
    path = Path(path)
    return DEMO_FOLDER.fullmatch(path.name) is not None and path.parent.name == "fastgan"


def demo_faces(n: int, quiet: bool = False) -> Path:
    """A folder of n synthetic 178x218 face JPEGs, drawn on first use and cached under ~/.cache/fastgan.

    They are drawn into `<folder>.tmp<pid>`, renamed when complete; the drawing process holds an flock on its
    `.drawing` file, so that the folder of a drawing killed part-way (kill -9) is told from one in progress and
    removed by the next fastgan that draws (or `fastgan cache clear`). A full disk, a read-only cache or Ctrl-C
    removes the folder at once, and the first two are one line."""
    folder = demo_folder(n)
    if (folder / ".complete").exists():
        return folder
    remove_abandoned_drawings(folder.parent)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from this pid, never user data
    try:
        tmp.mkdir(parents=True)
        with open(tmp / DRAWING, "w") as drawing:
            if fcntl is not None:
                fcntl.flock(drawing, fcntl.LOCK_EX)  # held while this process draws
            # no bar without a terminal: rich would leave a blank line in the log
            with Progress(console=console, transient=True, disable=quiet or not console.is_interactive) as bar:
                task = bar.add_task(f"drawing {n:,} demo faces (once)", total=n)
                write_faces(tmp, n, seed=DEMO_SEED, progress=lambda k: bar.advance(task, k))
            (tmp / ".complete").write_text("ok\n")
        (tmp / DRAWING).unlink()
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-drawn stays behind
        if isinstance(e, OSError):
            raise FastganError(f"cannot draw the demo faces into {folder.parent}: {e.strerror or e}; free some room "
                               "there or set XDG_CACHE_HOME to a writable folder, or give --root a folder of "
                               "images") from None
        raise
    if folder.exists() and not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished cache of an older fastgan: ours to redo
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same folder first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


DRAWING = ".drawing"  # the drawing process's lock, inside the folder it draws into
ABANDONED = re.compile(DEMO_FOLDER.pattern + r"\.tmp\d+")


def abandoned_drawings(cache: Path) -> list[Path]:
    """The folders of demo faces that a killed fastgan was drawing into (no live process holds their lock)."""
    if not cache.is_dir():
        return []
    return [p for p in sorted(cache.iterdir()) if ABANDONED.fullmatch(p.name) and p.is_dir()
            and (abandoned(p / DRAWING) if (p / DRAWING).exists() else not running(int(p.name.rsplit("tmp", 1)[1])))]


def running(pid: int) -> bool:
    """Whether process `pid` exists (for a folder an older fastgan drew into, which has no lock file)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        pass
    return True


def remove_abandoned_drawings(cache: Path) -> dict[Path, int]:
    """Remove abandoned_drawings(cache); each removed folder with the bytes it held."""
    removed = {}
    for folder in abandoned_drawings(cache):
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed[folder] = size
    return removed
