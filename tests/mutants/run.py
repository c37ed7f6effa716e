"""Plant each bug of tests/mutants/mutants.py in a copy of the repository and run the tests that must catch it.

    python tests/mutants/run.py                 # every mutant (minutes: not part of CI)
    python tests/mutants/run.py --only NAME     # one (repeatable)
    python tests/mutants/run.py --list          # names, files and bugs

For each mutant: the repository (less .git, .venv and caches) is copied into a temporary folder with tar, the one
change is made there, and `python -m pytest -x -q -p no:cacheprovider TESTS` runs in the copy with PYTHONPATH
set to it, so that the copy's fastgan is the one imported, by subprocesses too (the venv's editable install of
the original comes after PYTHONPATH; checked before each run). A mutant is killed when pytest reports a failed
test (exit status 1), survived when every test passes, and an error otherwise (no test collected, a collection
or usage error, or the time limit). Exit status 1 when any mutant survived or erred, 2 when the list no longer
matches the code.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import MUTANTS, Mutant  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXCLUDED = (".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info")


def check(mutant: Mutant) -> str | None:
    """Why `mutant` cannot be planted in the current code, or None."""
    path = ROOT / mutant.file
    if not path.is_file():
        return f"{mutant.file} does not exist"
    count = path.read_text().count(mutant.old)
    if count != 1:
        return f"its old text occurs {count} times in {mutant.file}, not once: update tests/mutants/mutants.py"
    missing = [t for t in mutant.tests if not (ROOT / t.split("::")[0]).is_file()]
    if missing:
        return f"its tests {', '.join(missing)} do not exist"
    return None


def copy_repository(target: Path) -> None:
    exclude = [f"--exclude={pattern}" for pattern in EXCLUDED]
    pack = subprocess.Popen(["tar", "-C", str(ROOT), *exclude, "-cf", "-", "."], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-C", str(target), "-xf", "-"], stdin=pack.stdout, check=True)
    pack.stdout.close()
    if pack.wait() != 0:
        raise RuntimeError(f"tar could not copy {ROOT}")


def plant(mutant: Mutant, copy: Path) -> None:
    path = copy / mutant.file
    text = path.read_text()
    if text.count(mutant.old) != 1:  # checked on the original before; the copy must agree
        raise RuntimeError(f"{mutant.name}: old text not found exactly once in the copy's {mutant.file}")
    path.write_text(text.replace(mutant.old, mutant.new))


def environment(copy: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # the copy's fastgan must be the one imported, in a fresh interpreter as the tests' subprocesses start it
    found = subprocess.run([sys.executable, "-c", "import fastgan; print(fastgan.__file__)"], cwd=copy, env=env,
                           capture_output=True, text=True)
    if found.returncode != 0 or not Path(found.stdout.strip()).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"the copy's fastgan is not what gets imported: {found.stdout.strip() or found.stderr}")
    return env


def run(mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    """(killed | survived | error, seconds, the last lines of pytest's output)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"fastgan-mutant-{mutant.name}-") as folder:
        copy = Path(folder)
        copy_repository(copy)
        try:
            plant(mutant, copy)
        except RuntimeError as e:  # the code changed under the running list
            return "error", time.perf_counter() - start, str(e)
        env = environment(copy)
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        # its own session: on a time-out the whole tree (torchrun, loader workers) is killed
        process = subprocess.Popen(command, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            output, _ = process.communicate()
            return "error", time.perf_counter() - start, f"timed out after {timeout:.0f} s\n{output}"
    seconds = time.perf_counter() - start
    verdict = {0: "survived", 1: "killed"}.get(process.returncode, "error")
    if verdict == "error":
        output = f"pytest exit status {process.returncode}\n{output}"
    return verdict, seconds, output


def tail(text: str, lines: int) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant [900]")
    parser.add_argument("--verbose", action="store_true", help="print pytest's output tail for every mutant")
    args = parser.parse_args(argv)
    names = [m.name for m in MUTANTS]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        print(f"duplicate mutant names: {', '.join(duplicates)}", file=sys.stderr)
        return 2
    chosen = MUTANTS
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            print(f"no mutant named {', '.join(unknown)} (see --list)", file=sys.stderr)
            return 2
        chosen = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.file:24} {m.bug}\n{'':34} caught by {' '.join(m.tests)}")
        return 0
    stale = [(m.name, why) for m in chosen if (why := check(m))]
    if stale:
        for name, why in stale:
            print(f"mutant {name}: {why}", file=sys.stderr)
        return 2

    results = []
    total_start = time.perf_counter()
    for m in chosen:
        verdict, seconds, output = run(m, args.timeout)
        results.append((m, verdict, seconds))
        print(f"{verdict:9} {seconds:6.1f} s  {m.name}", flush=True)
        if verdict == "killed" and not args.verbose:  # which test caught it, to judge whether for its bug
            print("\n".join("    " + line for line in output.splitlines() if line.startswith("FAILED")), flush=True)
        else:
            print(tail(output, 15 if verdict == "error" else 4), flush=True)

    print(f"\n{'mutant':34} {'result':9} {'time':>8}  tests")
    for m, verdict, seconds in results:
        print(f"{m.name:34} {verdict:9} {seconds:6.1f} s  {' '.join(m.tests)}")
    counts = {v: sum(r[1] == v for r in results) for v in ("killed", "survived", "error")}
    print(f"\n{counts['killed']} killed, {counts['survived']} survived, {counts['error']} errors "
          f"of {len(results)} mutants in {time.perf_counter() - total_start:.0f} s")
    return 0 if counts["killed"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
