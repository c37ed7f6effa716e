"""Decode once, by itself: `fastgan train --root DIR` prepares the checked images into a cache file the first time
(the same format and checks as `fastgan prepare`) and trains from it at the prepared data's speed; later runs, and
resumed ones, find it at once.

A cache file is named by what its pixels depend on: the folder's file index (each good file's path under the
resolved root, size and modification time, and the files set aside), the image size, the channels and the decoder.
A changed folder makes a new file, never a stale read; the same folder however --root spells it finds the same one
(a file an earlier fastgan named after the spelling is renamed on first use, not decoded again). Files live in ~/.cache/fastgan/prepared/ (XDG_CACHE_HOME) or --cache-dir.
Two runs on the same folder never decode it twice: the first holds an exclusive flock on `<name>.lock` while it
writes (through a temporary file renamed when complete), and the second waits for it and then uses its file.
`fastgan cache list` shows the files with their sizes, `fastgan cache clear` removes them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..atomic import READ_ONLY, abandoned, leftovers
from ..config import DECODER_FLAGS, HW_DECODER_LOAD
from ..errors import FastganError
from ..report import gb
from .files import FileIndex, cache_dir
from .prepared import FORMAT_VERSION, Naming, prepare, read_manifest

try:
    import fcntl
except ImportError:  # Windows: no flock; two runs that start together may both decode, and one rename wins
    fcntl = None

MARGIN_SHARE, MARGIN_BYTES = 0.10, 1 << 30  # room kept free on the cache's disk: 10% of the file, and 1 GiB
DECODER_WORDS = {"pil": "PIL on all cores", "cpu": "DALI on the CPU", "mixed": "DALI on the GPU"}


def cache_folder(cache_dir_option: Optional[str]) -> Path:
    return Path(cache_dir_option).expanduser() if cache_dir_option else cache_dir() / "prepared"


def cache_key(index: FileIndex, image_size: int, nc: int, decoder: str) -> str:
    """A digest of everything the cached pixels depend on, the files named by their paths under the resolved root:
    `--root faces`, `../faces` and `/abs/faces` are one folder and find one file."""
    return cache_keys(index, image_size, nc, decoder)[0]


def cache_keys(index: FileIndex, image_size: int, nc: int, decoder: str) -> tuple[str, str]:
    """(the key, the key fastgan gave the same pixels before it resolved the files' paths: each path as --root was
    typed, so one per spelling of the folder). The two agree where --root was typed resolved."""
    root = Path(index.root).resolve()

    def resolved(path) -> str:  # the root resolved, the path below it as found (no system call per file)
        return str(root / Path(path).relative_to(index.root))
    stats = [os.stat(path) for path in index.good]
    keys = []
    for name in (resolved, str):
        digest = hashlib.sha256()
        digest.update(json.dumps({"format": FORMAT_VERSION, "root": str(root), "image_size": image_size, "nc": nc,
                                  "decoder": decoder, "bad": sorted(name(p) for p, _ in index.bad)}).encode())
        for path, stat in zip(index.good, stats):
            digest.update(f"\n{name(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        keys.append(digest.hexdigest()[:16])
    return keys[0], keys[1]


def cache_paths(folder: Path, index: FileIndex, image_size: int, nc: int, decoder: str) -> tuple[Path, Path]:
    """(the cache file of these pixels, the name an earlier fastgan gave the same file: see cache_keys)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(index.root).resolve().name)[:40] or "images"
    return tuple(folder / f"{name}-{image_size}px-{nc}c-{DECODER_FLAGS[decoder]}-{key}.fgd"
                 for key in cache_keys(index, image_size, nc, decoder))


def naming(path: Path) -> Naming:
    """How messages name a cache file, and its way out when damaged or not a prepared file at all: drop it, and the
    next run decodes anew."""
    remedy = f"remove it with `fastgan cache clear {path.name}` and run again to decode anew"
    return Naming("the cache file", remedy, remedy, "remove it and run again to decode anew")


def file_bytes(index: FileIndex, image_size: int, nc: int) -> int:
    return len(index.good) * image_size * image_size * nc


def room_for(folder: Path, nbytes: int) -> tuple[bool, str]:
    """(whether the cache's disk has room for `nbytes` with the margin, the sizes in words)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = nbytes + max(int(nbytes * MARGIN_SHARE), MARGIN_BYTES)
    return need <= free, f"it needs {gb(nbytes)} and {folder} has {gb(free)} free (a margin of 10% or 1 GB kept)"


class CacheUnwritable(FastganError):
    """The cache's folder cannot be written (a read-only mount, a shared folder that is not ours): the run decodes
    every epoch instead, or uses the file that is already there."""


@contextmanager
def writing_lock(path: Path, announce: Callable[[str], None] = lambda line: None) -> Iterator[None]:
    """An exclusive flock on `path`.lock for the block: one writer per cache file; the others wait here, and
    `announce` says whose lock they wait for (the holder writes its process id into the lock file).
    CacheUnwritable where the folder cannot be written."""
    lock = path.with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a+")
    except OSError as e:
        if e.errno in READ_ONLY:
            raise CacheUnwritable(f"the cache folder {path.parent} is not writable ({e.strerror})") from None
        raise
    with f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                announce(f"waiting for process {holder}, which is writing the cache file {path.name} (its lock "
                         f"{lock}); this run then uses that file")
                fcntl.flock(f, fcntl.LOCK_EX)
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
        yield


def cached(index: FileIndex, folder: Path, image_size: int, nc: int, decoder: str, workers: Optional[int],
           announce: Callable[[str], None], progress: Callable[[int], Callable[[int], None]],
           hw_decoder_load: float = HW_DECODER_LOAD) -> Path:
    """The cache file of `index` at this size, channels and decoder: found, renamed from the name an earlier fastgan
    gave it (see cache_keys), or written now (under the lock, with a progress bar from `progress(total)`) by
    `workers` processes (PIL) or threads (DALI); `announce` gets the line that says which."""
    path, earlier = cache_paths(folder, index, image_size, nc, decoder)
    if not path.exists() and earlier.is_file() and not os.access(folder, os.W_OK):
        path = earlier  # a read-only cache that an earlier fastgan filled: used under the name it has
    if not path.exists():
        with writing_lock(path, announce):
            if not path.exists() and earlier.is_file():  # the same pixels: the file is renamed, not decoded again
                os.replace(earlier, path)
                drop_lock(earlier.with_suffix(".lock"))
                announce(f"renamed the cache file {earlier.name} of an earlier fastgan to {path.name}, the name "
                         "every spelling of --root finds")
            elif not path.exists():  # not written meanwhile by a run that held the lock
                announce(f"decoding {len(index.good):,} images once into {path} "
                         f"({gb(file_bytes(index, image_size, nc))}, {DECODER_WORDS[decoder]})")
                try:
                    prepare(dataclasses.replace(index, root=Path(index.root).resolve()), path, image_size, nc,
                            workers, progress(len(index.good)), decoder, hw_decoder_load)
                except OSError as e:
                    raise FastganError(f"cannot write the cache {path}: {e.strerror or e}; free some room, "
                                       "choose --cache-dir, or decode every epoch with --loader torch") from None
                return path
    announce(f"using {path}")
    try:
        os.utime(path)  # its date says when it was last used (fastgan cache list)
    except OSError as e:
        if e.errno not in READ_ONLY:
            raise
        # a shared, read-only cache: its date stays that of its writing
    return path


def drop_lock(lock: Path) -> bool:
    """Remove the lock file `lock`, and the temporary file a killed run left beside it, unless a run holds it now
    (it is writing that cache file); whether it was removed."""
    if not lock.is_file():
        return False
    with open(lock, "a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a run is writing this one: its temporary file and lock stay
        for tmp in lock.parent.glob(f".{lock.stem}.fgd.*.tmp"):
            tmp.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)
    return True


def cache_files(folder: Path) -> list[dict]:
    """The cache files in `folder`, newest use first, with what their manifests say."""
    rows = []
    for path in sorted(folder.glob("*.fgd")) if folder.is_dir() else []:
        try:
            manifest, _ = read_manifest(path, naming(path))
        except FastganError as e:
            manifest = {"error": str(e)}
        stat = path.stat()
        rows.append({"path": path, "bytes": stat.st_size, "used": stat.st_mtime, "manifest": manifest})
    return sorted(rows, key=lambda r: -r["used"])


def describe(row: dict) -> str:
    m = row["manifest"]
    used = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["used"]))
    if "error" in m:
        return f"{row['path'].name}  {gb(row['bytes'])}  unreadable: {m['error']}"
    return (f"{row['path'].name}  {gb(row['bytes'])}  {m['count']:,} images of {m['image_size']}x{m['image_size']}"
            f" from {m['source_root']} ({m['decoder']}), last used {used}")


def clear(folder: Path, names: list[str]) -> tuple[dict[Path, int], dict[Path, int]]:
    """Remove the cache files `names` (all of them when empty), and their locks and any temporary file a killed
    run left; a file being written (its lock held) is left alone. Returns (each removed file's size, each removed
    leftover's size: the temporary files of killed writes)."""
    rows = cache_files(folder)
    if names:
        known = {r["path"].name for r in rows}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise FastganError(f"no cache file {unknown[0]} in {folder}; `fastgan cache list` names them")
        rows = [r for r in rows if r["path"].name in names]
    removed = {}
    try:
        # what killed writes left, counted: the temporary files no live process holds
        left = remove_cache_leftovers(folder, [r["path"].name for r in rows] if names else ["*"])
        for row in rows:
            row["path"].unlink(missing_ok=True)
            removed[row["path"]] = row["bytes"]
        # the locks: the removed files' own, or all of them (with what killed runs left) when no name was given
        locks = [r["path"].with_suffix(".lock") for r in rows] if names else \
            sorted(folder.glob("*.lock")) if folder.is_dir() else []
        for lock in locks:
            drop_lock(lock)
    except OSError as e:
        if e.errno not in READ_ONLY:
            raise
        raise FastganError(f"cannot remove {Path(e.filename).name if e.filename else 'the files'} from {folder} "
                           f"({e.strerror}); {len(removed)} removed before it. Clear the cache where its folder is "
                           "writable, or choose another --cache-dir") from None
    return removed, left


def cache_leftovers(folder: Path, names: list[str] = ["*"]) -> list[Path]:
    """The temporary files that killed writes of the cache files `names` (glob patterns) left in `folder`: those no
    live process holds, beside a lock no live process holds (a writer of an older fastgan locks only the latter)."""
    found = []
    for name in names:
        for tmp in leftovers(folder, name):
            lock = folder / (tmp.name[1:].split(".fgd.", 1)[0] + ".lock")
            if not lock.exists() or abandoned(lock):
                found.append(tmp)
    return found


def remove_cache_leftovers(folder: Path, names: list[str]) -> dict[Path, int]:
    removed = {}
    for tmp in cache_leftovers(folder, names):
        size = tmp.stat().st_size
        tmp.unlink(missing_ok=True)
        removed[tmp] = size
    return removed


def leftover_bytes(folder: Path) -> tuple[int, int]:
    """(how many temporary files killed writes left in `folder`, their bytes): what `fastgan cache clear` frees
    beside the cache files."""
    found = cache_leftovers(folder)
    return len(found), sum(p.stat().st_size for p in found)
