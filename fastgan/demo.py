"""The built-in demo data: synthetic faces drawn once and cached, so `fastgan train` works with no download."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from rich.progress import Progress

from .files import cache_dir
from .report import console
from .synth import write_faces

DEMO_SEED = 0
DEMO_VERSION = 1  # bump when synth.py draws different faces, so old caches are not reused


def demo_faces(n: int, quiet: bool = False) -> Path:
    """A folder of n synthetic 178x218 face JPEGs, drawn on first use and cached under ~/.cache/fastgan."""
    folder = cache_dir() / f"demo-faces-v{DEMO_VERSION}-n{n}"
    if (folder / ".complete").exists():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from this pid, never user data
    with Progress(console=console, transient=True, disable=quiet) as bar:
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
