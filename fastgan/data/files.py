"""The file index shared by every loader: find the images under a root, and set aside the ones that cannot be
decoded before training starts (pytorch/examples issue #835: one bad JPEG used to kill a run hours in).

The check decodes every file once, in parallel, and caches the verdicts by (path, size, mtime), so a second run
on CelebA's 202,599 files only stats them.
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import os
import signal
import sys
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
from PIL import Image, ImageOps

from ..errors import FastganError
from ..atomic import atomic_write

# torchvision's IMG_EXTENSIONS, matched case-insensitively
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 2  # entries: [size, mtime_ns, reason or None, format]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastgan"


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def find_images(root: str | os.PathLike) -> list[Path]:
    """Image files under root (flat, or the tutorial's root/subfolder/*.jpg, or deeper), sorted.

    Hidden files and folders are ignored, and so is anything without an image extension."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FastganError(f"--root {root} does not exist")
    if not root.is_dir():
        raise FastganError(f"--root {root} is not a folder")
    found, visited = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a symlink back up the tree: each folder is read once
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [Path(folder) / f for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise FastganError(f"--root {root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found)


def load_image(path: str | os.PathLike, nc: int) -> Image.Image:
    """Open an image upright (EXIF orientation) and in the model's channels: RGB for nc=3, L for nc=1.

    Grayscale, CMYK, palette and alpha images are converted; transparency is laid over white."""
    with Image.open(path) as image:
        image.load()
        if image.mode.startswith("I"):  # 16-bit grayscale (PNG, TIFF): PIL's convert would clip, so scale
            pixels = np.asarray(image, dtype=np.float64)
            sixteen_bit = image.mode.startswith("I;16") or pixels.max() > 255
            image = Image.fromarray((pixels / 257 if sixteen_bit else pixels).clip(0, 255).round().astype(np.uint8))
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # a broken EXIF block is no reason to drop the pixels
            pass
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # P, and RGB/L with a tRNS key
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return image.convert("RGB" if nc == 3 else "L")


def inspect_image(path: str | os.PathLike) -> tuple[Optional[str], Optional[str]]:
    """(reason, format): reason is None when the file decodes to a non-empty image, else why it cannot be
    used; format is PIL's name for the file's real format (JPEG, PNG, ...), which need not match its extension."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file", None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd EXIF or palette warnings are not failures
            with Image.open(path) as opened:
                image_format = opened.format
            image = load_image(path, nc=3)
        if image.width < 1 or image.height < 1:
            return "image has no pixels", image_format
        return None, image_format
    except Exception as e:  # PIL raises many types: OSError, SyntaxError, ValueError, DecompressionBombError
        message = str(e).splitlines()[0] if str(e) else ""
        return f"{type(e).__name__}: {message}"[:200], None


def unusable_name(path: Path) -> Optional[str]:
    """Why a file's name cannot be used (cache keys, manifests and logs are UTF-8), or None."""
    try:
        str(path).encode()
    except UnicodeEncodeError:
        return "its name is not valid UTF-8; rename it"
    return None


def write_skipped(bad: list[tuple[Path, str]], path: str | os.PathLike) -> None:
    """List the skipped files, one 'path<TAB>reason' per line (a name that is not UTF-8 with its bytes escaped)."""
    Path(path).write_text("".join(f"{p}\t{reason}\n" for p, reason in bad), errors="backslashreplace")


@dataclass
class FileIndex:
    root: Path
    good: list[Path]
    bad: list[tuple[Path, str]] = field(default_factory=list)
    checked: int = 0   # files decoded in this call (the rest came from the cache)
    formats: list[str] = field(default_factory=list)  # PIL's format of each good file

    def without(self, dropped: list[tuple[Path, str]]) -> "FileIndex":
        """The same index with more files set aside (for a loader that cannot read them), with reasons."""
        gone = {p for p, _ in dropped}
        keep = [(p, f) for p, f in zip(self.good, self.formats) if p not in gone]
        return FileIndex(self.root, [p for p, _ in keep], self.bad + dropped, self.checked, [f for _, f in keep])

    def summary(self) -> str:
        total = len(self.good) + len(self.bad)
        line = f"{len(self.good):,} images under {self.root}"
        if self.bad:
            line += f"; skipped {len(self.bad):,} of {total:,} files that cannot be decoded"
        return line


def _cache_path(root: Path) -> Path:
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "index" / f"{digest}.json"


def _read_cache(path: Path, root: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if data.get("version") == CACHE_VERSION and data.get("root") == str(root.resolve()):
            return data["entries"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # a missing or damaged cache only costs a re-check
    return {}


def _write_cache(path: Path, root: Path, entries: dict) -> None:
    try:
        with atomic_write(path, "w", durable=False) as f:  # a cache: losing it to a power cut costs a re-check
            f.write(json.dumps({"version": CACHE_VERSION, "root": str(root.resolve()), "entries": entries}))
    except OSError:
        pass  # an unwritable cache folder only costs a re-check next time


@contextmanager
def parallel_map(function: Callable, items: Iterable, workers: int, count: Optional[int] = None) -> Iterator:
    """function(item) for every item, in order, in `workers` processes; in this process when there is one
    worker or too few items (under 64) to be worth starting processes. `count`: the number of items, where
    `items` has no len(). The items go to the workers a few chunks at a time, so that neither the work not yet
    sent nor the results not yet read pile up, whatever their number. Work not yet done is cancelled when the
    block ends early (an error, Ctrl-C)."""
    count = len(items) if count is None else count
    if workers <= 1 or count < 64:
        yield map(function, items)
        return
    executor = ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        # chunks of up to 256 items, at least 8 per worker: few round trips, and the work stays balanced
        chunk = max(1, min(256, count // (8 * workers)))
        yield _in_chunks(executor, function, iter(items), chunk, CHUNKS_IN_FLIGHT_PER_WORKER * workers)
    finally:
        executor.shutdown(cancel_futures=True)


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends


def die_with_parent(parent: int) -> None:
    """Run first in each worker process: end it with its parent, even a parent killed by SIGKILL (the OOM killer),
    which runs no clean-up. Otherwise the worker lives on, blocked writing results no one reads, holding the
    files it inherited (a cache's lock and temporary file): the next run on the folder would wait for it."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no prctl here: torch's own watchdog still ends DataLoader workers
            pass
    if os.getppid() != parent:  # the parent ended before the line above took effect
        os._exit(1)


CHUNKS_IN_FLIGHT_PER_WORKER = 4  # sent ahead of the results read: the workers never wait for the reader


def _in_chunks(executor: ProcessPoolExecutor, function: Callable, items: Iterator, chunk: int,
               in_flight: int) -> Iterator:
    pending = deque()
    while True:
        while len(pending) < in_flight and (part := list(itertools.islice(items, chunk))):
            pending.append(executor.submit(_map_chunk, function, part))
        if not pending:
            return
        yield from pending.popleft().result()


def _map_chunk(function: Callable, part: list) -> list:
    return [function(item) for item in part]


def index_images(root: str | os.PathLike, workers: Optional[int] = None,
                 progress: Optional[Callable[[int, int], None]] = None, use_cache: bool = True) -> FileIndex:
    """Find the images under root and check that each decodes; `progress(done, total)` is called as it goes.

    Raises FastganError when the root is missing or no file decodes."""
    root = Path(root).expanduser()
    paths = find_images(root)
    cache_file = _cache_path(root)
    cached = _read_cache(cache_file, root) if use_cache else {}
    keys, verdicts, todo, unusable = [], {}, [], []
    for path in paths:
        why = unusable_name(path)
        try:
            stat = path.stat()  # through a symlink: a broken one, or one to itself, fails here
        except OSError as e:
            why = why or f"{type(e).__name__}: {e.strerror}" + (" (a broken symlink)" if path.is_symlink() else "")
        if why:  # set aside before the check, with its reason, like a file that does not decode
            unusable.append((path, why))
            continue
        key = str(path.relative_to(root))
        keys.append(key)
        entry = cached.get(key)
        if entry is not None and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            verdicts[key] = entry
        else:
            todo.append((key, path, stat.st_size, stat.st_mtime_ns))
    total = len(todo)
    if progress:
        progress(0, total)
    workers = default_workers() if workers is None else workers
    if todo:
        with parallel_map(inspect_image, [t[1] for t in todo], workers) as results:
            for done, ((key, _, size, mtime), (reason, image_format)) in enumerate(zip(todo, results), 1):
                verdicts[key] = [size, mtime, reason, image_format]
                if progress and (done % 256 == 0 or done == total):
                    progress(done, total)
        if use_cache:
            _write_cache(cache_file, root, verdicts)  # files gone since are dropped
    paths = [p for p in paths if p not in {u for u, _ in unusable}]
    good = [p for p, k in zip(paths, keys) if verdicts[k][2] is None]
    bad = sorted(unusable + [(p, verdicts[k][2]) for p, k in zip(paths, keys) if verdicts[k][2] is not None])
    if not good:
        raise FastganError(f"--root {root}: none of its {len(bad):,} image files can be decoded "
                           f"(first: {bad[0][0].name}: {bad[0][1]})")
    formats = [verdicts[k][3] for k in keys if verdicts[k][2] is None]
    return FileIndex(root=root, good=good, bad=bad, checked=total, formats=formats)
