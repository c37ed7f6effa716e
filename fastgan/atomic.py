"""Files written so that a crash never leaves one half written, the one way every fastgan writer does it.

The bytes go to a hidden temporary file beside the target (`.<name>.<random>.tmp`: unique, so two writers never
share one), which is flushed to the disk and then renamed over the target; the folder is flushed too, so that
the rename itself survives a power cut. A write cut short (kill -9, a full disk) leaves the previous file whole
and at worst a hidden `.tmp` file beside it, which fastgan never reads.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Iterator

# mkstemp creates 0600 files; outputs get the permissions a plain open() would give them (0666 less the umask)
_UMASK = os.umask(0)
os.umask(_UMASK)


def _temporary_beside(path: Path) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)
    return fd, Path(tmp)


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to the disk, where the file system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot flush a folder; the rename is then as safe as they make it
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """Open `path` for writing through a temporary file, renamed over `path` when the block ends without error.

    durable=False skips the flushes to the disk (still atomic against a crashing process, not against a power
    cut): for the thousands of small files of a synthetic data set, where one flush each would cost seconds."""
    path = Path(path)
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_folder(path.parent)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_link(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make `target` the same file as `source`, atomically: a hard link, or a copy where links fail."""
    source, target = Path(source), Path(target)
    fd, tmp = _temporary_beside(target)
    os.close(fd)
    try:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        fsync_folder(target.parent)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise
