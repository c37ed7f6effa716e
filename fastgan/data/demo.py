"""The built-in demo data: synthetic faces drawn once and cached, so `fastgan train` works with no download."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from rich.progress import Progress

from .files import cache_dir
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
    """A folder of n synthetic 178x218 face JPEGs, drawn on first use and cached under ~/.cache/fastgan."""
    folder = demo_folder(n)
    if (folder / ".complete").exists():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from this pid, never user data
    # no bar without a terminal: rich would leave a blank line in the log
    with Progress(console=console, transient=True, disable=quiet or not console.is_interactive) as bar:
        task = bar.add_task(f"drawing {n:,} demo faces (once)", total=n)
        write_faces(tmp, n, seed=DEMO_SEED, progress=lambda k: bar.advance(task, k))
    (tmp / ".complete").write_text("ok\n")
    if folder.exists() and not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished cache of an older fastgan: ours to redo
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same folder first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
