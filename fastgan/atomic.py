"""Files written so that a crash never leaves one half written, the one way every fastgan writer does it.

The bytes go to a hidden temporary file beside the target (`.<name>.<random>.tmp`: unique, so two writers never
share one), which is flushed to the disk and then renamed over the target; the folder is flushed too, so that
the rename itself survives a power cut. A write cut short (kill -9, a full disk) leaves the previous file whole
and at worst a hidden `.tmp` file beside it, which fastgan never reads. The writer holds an flock on its temporary
file while it writes, so that a leftover of a killed writer (no process holds its lock) can be told from a write
in progress and removed (`remove_leftovers`): by the next run into the folder, `fastgan prepare` of the same file,
`fastgan cache clear`.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Iterator, Optional

from .errors import FastganError

try:
    import fcntl
except ImportError:  # Windows: no flock; leftovers are then never taken for abandoned, and stay
    fcntl = None

FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or the user's quota on it
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)  # a read-only mount, or a folder that is not ours to write


def why_not_writable(folder: str | os.PathLike) -> str:
    """Why `folder` (which exists) cannot be written, in the kernel's words: a read-only file system is not a
    permission (root may write anything, except there)."""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
    except (OSError, AttributeError):  # no statvfs here (Windows)
        pass
    return os.strerror(errno.EACCES)


class DiskFull(FastganError):
    """A write that found no room: one line naming the file, its folder and the room left there."""


def disk_full(path: Path, error: OSError) -> DiskFull:
    probe = Path(path).parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 1e6:,.1f} MB free"
    except OSError:
        free = "its free space unknown"
    why = error.strerror or "No space left on device"
    return DiskFull(f"cannot write {Path(path).name} in {Path(path).parent}: {why} ({free} there)")


class _Recording:
    """A file that remembers the first OSError its writes raised: torch.save and PIL replace it with errors of their
    own (`inline_container.cc ... unexpected pos`, `'_idat' object has no attribute 'fileno'`)."""

    def __init__(self, file: IO):
        self._file, self.error = file, None

    def write(self, data):
        try:
            return self._file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._file, name)

# mkstemp creates 0600 files; outputs get the permissions a plain open() would give them (0666 less the umask)
_UMASK = os.umask(0)
os.umask(_UMASK)


def _temporary_beside(path: Path) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the file is closed: a live write, not a leftover
    return fd, Path(tmp)


def abandoned(path: Path) -> bool:
    """Whether no process holds an flock on `path` (a temporary file or a drawing's lock): its writer is gone."""
    if fcntl is None:
        return False
    try:
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when closed
            return True
    except OSError:  # held, gone meanwhile, or unreadable: not ours to remove
        return False


def leftovers(folder: Path, name: str = "*") -> list[Path]:
    """The temporary files of killed writes of `name` (every file: "*") in `folder` that no live process holds."""
    return [p for p in sorted(Path(folder).glob(f".{name}.*.tmp")) if p.is_file() and abandoned(p)] \
        if Path(folder).is_dir() else []


def remove_leftovers(folders, name: str = "*") -> dict[Path, int]:
    """Remove the leftovers (see `leftovers`) in each of `folders`; each one removed with its size."""
    removed = {}
    for folder in folders:
        for tmp in leftovers(folder, name):
            with suppress(OSError):
                size = tmp.stat().st_size
                tmp.unlink()
                removed[tmp] = size
    return removed


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
    try:
        fd, tmp = _temporary_beside(path)
    except OSError as e:
        if e.errno in FULL:
            raise disk_full(path, e) from None
        raise
    recording: Optional[_Recording] = None
    try:
        with os.fdopen(fd, mode) as f:
            recording = _Recording(f)
            yield recording
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_folder(path.parent)
    except BaseException as e:
        with suppress(FileNotFoundError):
            tmp.unlink()
        cause = e if isinstance(e, OSError) else recording.error if recording else None
        if cause is not None and cause.errno in FULL:  # one line, whatever the writer made of it
            raise disk_full(path, cause) from None
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
