"""DALI's parts for the GPU machine: gathered call by call, unpacked once all are there, and checked by importing.

`bash ../shared/tools/stage-wheels.sh` packs DALI for CUDA 13 and Python 3.12 (what the GPU machine has) as one
xz-compressed tar split into parts of at most 58 MiB: `.devcarry/part.00`, `part.01`, ... A lent machine takes
64 MiB a call, so each call carries one part, and bench/gpu_check.py --call N copies whatever the call brought
into the stage folder (/tmp/stage), where the parts of earlier calls wait as long as the machine stays warm. Once
the parts form a whole stream they are unpacked into the site folder (/tmp/site), as the tool's unpack.sh does,
and DALI is imported from there in a process of its own: a DALI whose files are there but whose libraries do
not load counts as absent, with the reason. Missing parts (an idle machine taken back between calls, and /tmp
with it) are named in one line, and the check runs on without DALI.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

PART = re.compile(r"^part\.(\d{2})$")
IMPORT_TIMEOUT_S = 120  # importing DALI loads its CUDA libraries: seconds, unless something hangs


@dataclass
class Dali:
    """Where DALI stands for the parts of this call: usable (with the environment that makes it importable), or
    not, and why, in one line."""
    usable: bool
    line: str                                     # for the call's output and the summary
    env: dict = field(default_factory=dict)       # PYTHONPATH and LD_LIBRARY_PATH entries to put in front


def stage(carried: Path, stage_dir: Path, part: str) -> list[str]:
    """Copy the part this call carried (`part`, "" for none) into the stage folder; the parts now staged. Only
    the call's own part: a rehearsal's .devcarry/ holds them all, and a call must not stage what it did not
    carry."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    source, target = carried / part, stage_dir / part
    if part and source.is_file() and (not target.exists() or target.stat().st_size != source.stat().st_size):
        partial = stage_dir / f".{part}.tmp"  # a copy cut short never passes for a part
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    return sorted(p.name for p in stage_dir.iterdir() if PART.match(p.name))


def missing_before(parts: list[str]) -> list[str]:
    """The part names absent below the highest one staged (part.01 when part.00 and part.02 are there)."""
    numbers = {int(PART.match(name).group(1)) for name in parts}
    return [f"part.{n:02d}" for n in range(max(numbers, default=-1)) if n not in numbers]


def unpack(stage_dir: Path, site: Path) -> Optional[str]:
    """Unpack the staged parts, in order, into `site`; None, or why not (a part missing, the stream cut short).
    As the tool's unpack.sh: one tar stream, xz; DALI's nvidia/ package made to span the machine's own."""
    parts = sorted(p for p in stage_dir.iterdir() if PART.match(p.name))
    if not parts:
        return "no DALI part was carried to this machine"
    gaps = missing_before([p.name for p in parts])
    if gaps:
        return f"{', '.join(gaps)} missing (carried in an earlier call, lost if the machine was taken back)"
    partial = site.with_name(site.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    try:
        with Joined(parts) as stream, tarfile.open(fileobj=stream, mode="r|xz") as archive:
            archive.extractall(partial, **trusted)
    except Exception as e:  # noqa: BLE001 (EOFError or tarfile's "unexpected end of data" for a stream cut
        shutil.rmtree(partial, ignore_errors=True)  # short, lzma's LZMAError for a damaged part, OSError for a disk)
        if isinstance(e, EOFError) or "end of data" in str(e):
            return (f"the parts up to {parts[-1].name} end before the archive does: a later part is missing "
                    f"(not carried yet, or lost with a machine taken back)")
        return f"the parts do not unpack: {type(e).__name__}: {e}"
    spanning = partial / "nvidia" / "__init__.py"
    if spanning.is_file():  # nvidia/ is a package here and in the machine's site-packages (CUDA's libraries)
        spanning.write_text("__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
    shutil.rmtree(site, ignore_errors=True)
    os.replace(partial, site)
    return None


class Joined:
    """The parts read one after the other as one binary stream (no copy of 170 MB joined on /tmp)."""

    def __init__(self, paths: list[Path]):
        self.paths, self.current = list(paths), None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.current:
            self.current.close()

    def read(self, size: int = -1) -> bytes:
        chunks = []
        while size != 0:
            if self.current is None:
                if not self.paths:
                    break
                self.current = open(self.paths.pop(0), "rb")
            chunk = self.current.read(size)
            if not chunk:
                self.current.close()
                self.current = None
                continue
            chunks.append(chunk)
            if size > 0:
                size -= len(chunk)
        return b"".join(chunks)


def site_env(site: Path) -> dict:
    """The environment entries that make the site folder's DALI importable, in front of what is there."""
    def front(name: str, entry: Path) -> str:
        return os.pathsep.join([str(entry), *filter(None, [os.environ.get(name)])])
    return {"PYTHONPATH": front("PYTHONPATH", site), "LD_LIBRARY_PATH": front("LD_LIBRARY_PATH",
                                                                               site / "nvidia" / "cu13" / "lib")}


def import_check(env: dict, python: str = sys.executable) -> tuple[Optional[str], Optional[str]]:
    """(DALI's version, None) when `python` imports it in `env`; (None, why) when not."""
    code = "import nvidia.dali as d; print('DALI_VERSION', d.__version__)"
    try:
        done = subprocess.run([python, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=IMPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"importing it hung for {IMPORT_TIMEOUT_S} s"
    found = [ln.split()[1] for ln in done.stdout.splitlines() if ln.startswith("DALI_VERSION ")]
    if done.returncode == 0 and found:
        return found[0], None
    lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
    return None, (lines[-1] if lines else f"python exited with {done.returncode}")[:300]


def prepare_dali(carried: Path, stage_dir: Path, site: Path, part: str, cpu: bool) -> Dali:
    """Stage what this call carried, unpack once the parts are whole, import DALI from the site folder.

    On the GPU the site folder's DALI is what the parts use. With --cpu (the rehearsal on a machine with another
    Python) the unpacked DALI is built for Python 3.12 and cannot load here: the rehearsal checks that the parts
    unpack and hold DALI, then uses this Python's own DALI where it imports."""
    staged = stage(carried, stage_dir, part)
    if (site / "nvidia" / "dali" / "__init__.py").is_file() and not missing_before(staged):
        problem = None  # unpacked by an earlier call on this machine
    else:
        problem = unpack(stage_dir, site)
    if problem:
        return Dali(False, f"DALI skipped: {problem}; the parts that need no DALI run without it")
    if not (site / "nvidia" / "dali" / "__init__.py").is_file():
        return Dali(False, f"DALI skipped: the parts unpacked into {site} hold no nvidia/dali package")
    if cpu:
        version, why = import_check({})
        if version is None:
            return Dali(False, f"DALI skipped: the parts unpack (built for the GPU machine's Python), but this "
                               f"Python's own DALI does not import: {why}")
        return Dali(True, f"DALI parts unpacked into {site} (built for the GPU machine's Python 3.12: --cpu uses "
                          f"this Python's DALI {version})")
    env = site_env(site)
    version, why = import_check(env)
    if version is None:
        return Dali(False, f"DALI skipped: it unpacks but does not import: {why}")
    return Dali(True, f"DALI {version} unpacked into {site} and imported", env)
