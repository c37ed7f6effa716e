"""One command for a lent GPU machine: the environment, the GPU tests, the throughput headline, DALI's GPU decoding,
then the CLI paths that no GPU test runs at full size, each part timed and capped, everything summarised even when
time runs out.

    python3 bench/gpu_check.py --call 1 --commit C OUTDIR   # the lent machine's calls 1 to 4 (docs/gpu-check.md)
    python3 bench/gpu_check.py OUTDIR             # the whole default plan in one command, within --budget (540 s)
    python3 bench/gpu_check.py --plan [--call N]  # the parts in order, each with its estimate and cap
    python3 bench/gpu_check.py --cpu OUTDIR       # the same plan at tiny sizes on a CPU: the rehearsal (CI runs it)
    python3 bench/gpu_check.py --only throughput OUTDIR    # or --skip dali; --all adds the extra parts

A lent machine runs one command of at most 600 s a call, takes 64 MiB a call and is taken back, /tmp with it,
after about 30 s idle. So the plan is cut into calls (CALLS), each useful alone: the call that carries DALI's
part.00 runs the GPU tests, the next carries part.01 and runs the throughput headline, the third carries part.02,
unpacks DALI once the parts are whole (bench/gpu_stage.py) and runs the DALI parts; where a part is missing it says
so in one line and runs the rest of the plan instead, which is also call 4's. A machine taken back between calls
costs time, never the figures a call already returned.

Run it from the repository root of a plain copy (fastgan need not be installed: the repository goes on the
subprocesses' PYTHONPATH, the CLI runs as `python -m fastgan`). OUTDIR must be new or empty, and receives two files
however many parts run (a lent machine hands back at most eight): summary.md (every part's status, seconds and key
figure, the end of each failed part's log, the environment) and logs.tar.gz (each part's log and result JSON, the
benches' JSONs). Both are rewritten after every part, so a run cut short still leaves them; the summary is also
printed at the end. The synthetic faces, prepared files and run folders live in a scratch folder (--work), removed
at the end unless --keep. The exit status is 1 when any part failed.

The order is by value for a few minutes of GPU: the GPU tests alone (`pytest -m gpu`, with pytest-xdist and
pytest-timeout where installed; the CPU suite is CI's), then the throughput bench (the headline figure), then what
no GPU test runs at the tutorial's size. Each part stops at its own cap or when the budget is spent, whichever
comes first ("failed: timed out after N s"); parts that find no budget left fail as "not started". The estimates
are read off the code and the CPU's timings, not yet measured on a GPU: the first GPU session should replace them.

This file is the runner: the budget and the caps, each part's commands in a process group of their own, the
summary and the archive, the command line. The parts themselves (what each runs, checks and reports, and the
table of them with their estimates and caps) are in bench/gpu_parts.py.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

from gpu_parts import DALI_PARTS, PARTS, Part, PartFailed, PartTimedOut, Result, has_module, last_line
from gpu_stage import prepare_dali, stage

REPO = Path(__file__).resolve().parents[1]
# `fastgan synth`: 2.8 ms per 178x218 face on one core (measured on the 2-core CPU: 2,000 faces in 9.5 s, 20 in
# 4.0 s, i.e. 4 s of start-up), so 20,000 faces take about 4 s of drawing on 16 cores; the CLI parts' epochs
# over them (156 steps of 128) take seconds on a GPU, so start-up and compiling dominate, not the count
GPU_COUNT, CPU_COUNT = 20_000, 64
# 540 s: the longest command of a lent machine is 600 s; the default plan's estimates add up to 480 s. The --cpu
# check takes 100 s of CPU time (measured on the 2-core CPU), 4 minutes of wall time when other work shares those
# cores; its budget only guards against a hang
GPU_BUDGET_S, CPU_BUDGET_S = 540, 900
CPU_TIMEOUT_S = 240  # any one --cpu part: the longest (throughput) took 45 s on the 2 busy cores
CARRIED = REPO / ".devcarry"  # where a call's carried DALI part lands in the machine's copy of the tree
STAGE, SITE = Path("/tmp/stage"), Path("/tmp/site")  # the parts gathered over the calls; DALI unpacked


class Call:
    """One command on the lent machine: the DALI part it carries, its parts, its budget (gpu_check stops starting
    parts after it; the lending tool's timeout_s is the budget plus 40 s), and what it runs instead when DALI
    cannot be had."""

    def __init__(self, number: int, carries: str, parts: tuple, budget_s: int, without_dali: tuple = ()):
        self.number, self.carries, self.parts, self.budget_s = number, carries, parts, budget_s
        self.without_dali = without_dali


# The lease of a lent machine, in seconds: 900 in all, its start, every transfer and idle wait included. A start
# takes 60-180 s; a turn between calls 15 s typically, 30 s at worst (past ~30 s idle the machine is taken back);
# carrying a 58 MiB part and the tree about 10 s (an estimate); a call past its budget ends within 15 s (the
# started part's SIGTERM grace); unpacking the parts 13 s on the 2-core CPU. docs/gpu-check.md tabulates them:
# the typical lease must end with 180 s to spare, the worst must still return the throughput headline (call 2)
LEASE_S, SPARE_S, START_S, WORST_START_S, GAP_S, WORST_GAP_S = 900, 180, 120, 180, 15, 30
TRANSFER_S, OVERRUN_S, UNPACK_S = 10, 15, 15
REST = ("env", "synth", "prepare", "profile", "train-best", "ema-eval", "swd-speed")
CALLS = {c.number: c for c in [
    # the estimates (GPU, read off the code, not yet measured): 165 s, 220 s, 135 s (+15 s unpacking), 170 s
    Call(1, "part.00", ("env", "gpu-tests"), 240),
    Call(2, "part.01", ("env", "synth", "throughput"), 300),
    Call(3, "part.02", ("env", "synth", "prepare", "dali-tests", "prepare-dali", "throughput-dali"), 200,
         without_dali=REST),
    Call(4, "", REST, 240),
]}


# ---------------------------------------------------------------------------------------------------------------
# a part's commands, bounded

class Check:
    """What the parts share: the mode, the sizes, the folders, the budget, and running a command bounded by it."""

    def __init__(self, out: Path, work: Path, cpu: bool, count: int, budget_s: float, commit: Optional[str]):
        self.out, self.work, self.cpu, self.count = out, work, cpu, count
        self.extra_env: dict = {}  # DALI unpacked from the carried parts: its PYTHONPATH and LD_LIBRARY_PATH
        self.dali_blocked: Optional[str] = None  # why the DALI parts skip, where staging found no usable DALI
        self.notes: list[str] = []  # lines for the summary's head (what the call staged)
        self.device = "cpu" if cpu else "cuda"
        self.budget_end = time.monotonic() + budget_s
        self.budget_s, self.commit = budget_s, commit
        self.faces, self.prepared = work / "faces", work / "faces.fgd"
        self.logs = work / "logs"  # each part's log, result JSON and bench JSON: archived into OUTDIR/logs.tar.gz
        self.logs.mkdir(parents=True, exist_ok=True)
        # the tutorial's model and batch on the GPU; a model small enough for seconds per run on the CPU
        self.image_size, self.batch = (16, 16) if cpu else (64, 128)
        self.model_flags = ["--ngf", "8", "--ndf", "8", "--nz", "16", "--batch-size", "16"] if cpu else []
        steps_per_epoch = max(1, count // self.batch)
        self.log_every = max(1, steps_per_epoch // 4)  # four intervals an epoch: a median of the last three
        self.env_info: dict = {}
        self.results: dict[str, Result] = {}
        self.log: Optional[Path] = None
        self.commands: list[str] = []
        self.deadline = self.budget_end

    def environ(self, require_gpu: bool = False, require_dali: bool = False) -> dict:
        env = {**os.environ, **self.extra_env, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(self.work / "cache")}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        if self.commit:
            env["FASTGAN_COMMIT"] = self.commit  # the benches' JSONs name it on a copy without git
        for name, wanted in (("FASTGAN_REQUIRE_GPU", require_gpu), ("FASTGAN_REQUIRE_DALI", require_dali)):
            env.pop(name, None)
            if wanted:
                env[name] = "1"
        return env

    def sh(self, argv: list, require_gpu: bool = False, require_dali: bool = False) -> tuple[int, str]:
        """Run argv in the repository root, its output appended to the part's log; (exit status, output).

        Bounded by the part's deadline: past it, the command's whole process group (torchrun's ranks,
        DataLoader workers) gets SIGTERM, then SIGKILL 10 s later, and the part fails as timed out. However the
        command ends, what it left running in its group (a hung test's torchrun children, a worker) is ended too,
        so that nothing of one part runs on into the next and skews its figures."""
        argv = [str(a) for a in argv]
        line = " ".join(argv)
        self.commands.append(line)
        with open(self.log, "a") as log:
            log.write(f"$ {line}\n")
            log.flush()
            start = log.tell()
            child = subprocess.Popen(argv, cwd=REPO, env=self.environ(require_gpu, require_dali), stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                code = child.wait(timeout=max(1.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop_group(child)
                raise PartTimedOut() from None
            except KeyboardInterrupt:
                stop_group(child)
                raise
            finally:
                end_group(child.pid)
        with open(self.log) as log:
            log.seek(start)
            output = log.read()
        with open(self.log, "a") as log:
            log.write(f"[exit status {code}]\n\n")
        return code, output

    def fastgan(self, *args) -> str:
        """`python -m fastgan ARGS`; its output, or PartFailed with its last line if it failed."""
        code, output = self.sh([sys.executable, "-m", "fastgan", *args])
        if code != 0:
            raise PartFailed(f"fastgan {args[0]} exited with {code}: {last_line(output)}")
        return output


def end_group(group: int, grace_s: float = 5.0) -> None:
    """Whatever is left in process group `group` (its leader has exited): SIGTERM, then SIGKILL after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_alive(group):
            return
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            return
        end = time.monotonic() + grace_s
        while time.monotonic() < end and group_alive(group):
            time.sleep(0.1)


def group_alive(group: int) -> bool:
    """Whether a process of `group` still runs. Zombies do not count: where nothing reaps orphans (a container
    whose first process is a shell), a killed process stays a zombie, and signal 0 still reaches it."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: signal 0 (zombies count)
        try:
            os.killpg(group, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == group and fields[0] != "Z":  # state, ppid, pgrp, ...
            return True
    return False


def stop_group(child: subprocess.Popen) -> None:
    """SIGTERM to the command's process group (fastgan writes its checkpoint and stops), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------------------------
# the plan

def select(only: Optional[str], skip: Optional[str], everything: bool = False) -> list[Part]:
    """The parts to run, in their order: the default plan (with `everything`, the extra parts too), or --only's
    names or groups plus what they need; less --skip's; env always."""
    known = {p.name for p in PARTS} | {g for p in PARTS for g in p.groups}

    def names(text: Optional[str], flag: str) -> set[str]:
        given = {n.strip() for n in (text or "").split(",") if n.strip()}
        unknown = sorted(given - known)
        if unknown:
            raise ValueError(f"{flag} {unknown[0]!r} is not a part or group; these are: "
                             f"{', '.join(sorted(known))} (see --plan)")
        return given

    def matches(part: Part, given: set[str]) -> bool:
        return part.name in given or bool(given & set(part.groups))

    wanted, skipped = names(only, "--only"), names(skip, "--skip")
    chosen = {p.name for p in PARTS if (matches(p, wanted) if wanted else everything or not p.extra)}
    needs = {p.name: set(p.needs) for p in PARTS}
    while True:  # what the chosen parts need, and what that needs
        more = set().union(*(needs[n] for n in chosen)) - chosen
        if not more:
            break
        chosen |= more
    chosen -= {p.name for p in PARTS if matches(p, skipped)}
    chosen.add("env")
    return [p for p in PARTS if p.name in chosen]


def plan_text(parts: list[Part], cpu: bool, budget_s: float) -> str:
    """--plan: each chosen part with its estimate, its cap and the estimated time by its end."""
    dali = has_module("nvidia.dali")
    lines = [f"gpu_check plan ({'--cpu: tiny sizes, caps ' + str(CPU_TIMEOUT_S) + ' s' if cpu else 'GPU'}), "
             f"budget {budget_s:.0f} s; estimates for an H100/H200, read off the code (not yet measured on a GPU)",
             f"{'part':15s} {'est s':>6s} {'cap s':>6s} {'by s':>6s}  what"
             + ("  (est and by: seconds on a GPU, not on this CPU)" if cpu else "")]
    total = 0
    for p in parts:
        runs = not (cpu and p.cuda_only) and (dali or p.name not in DALI_PARTS)
        total += p.estimate_s if runs else 0
        note = "" if runs else ("  [skips: --cpu]" if cpu and p.cuda_only else "  [skips here: DALI absent]")
        lines.append(f"{p.name:15s} {p.estimate_s:6d} {p.timeout_s if not cpu else CPU_TIMEOUT_S:6d} "
                     f"{total:6d}  {p.what}{' [extra]' if p.extra else ''}{note}")
    lines.append(f"estimated total {total} s on a GPU" + ("" if cpu else f", of the {budget_s:.0f} s budget" + (
        "" if total <= budget_s else ": over it, so the last parts will not start")))
    left_out = [p.name for p in PARTS if p not in parts]
    if left_out:
        lines.append(f"not in this plan (--all or --only NAME): {', '.join(left_out)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# running the plan

def run_part(check: Check, part: Part) -> tuple[Result, float]:
    """The part's result and seconds; never raises for a failing or hung part."""
    start = time.monotonic()
    if check.cpu and part.cuda_only:
        return Result("skipped", "no GPU (--cpu)"), 0.0
    if part.name in DALI_PARTS and check.dali_blocked:
        return Result("skipped", check.dali_blocked), 0.0
    if part.name in DALI_PARTS and not check.env_info.get("dali"):
        return Result("skipped", "DALI absent: " + (check.env_info.get("dali_absent_because") or
                                                      "the environment part did not run")), 0.0
    missing = [n for n in part.needs if n not in check.results or check.results[n].status != "passed"]
    if missing:
        need = check.results.get(missing[0])
        return Result("skipped", f"needs {missing[0]}, which " + (need.status if need else "was not run")), 0.0
    left = check.budget_end - time.monotonic()
    if left < 5:
        return Result("failed", f"not started: the --budget of {check.budget_s:.0f} s was spent"), 0.0
    allowed = min(part.timeout_s if not check.cpu else CPU_TIMEOUT_S, left)
    check.deadline = start + allowed
    try:
        result = part.run(check)
    except PartTimedOut:
        result = Result("failed", f"timed out after {allowed:.0f} s")
    except PartFailed as e:
        result = Result("failed", str(e))
    except Exception as e:  # a bug of this script or an unexpected file: the part fails, the rest goes on
        result = Result("failed", f"{type(e).__name__}: {e}")
    return result, time.monotonic() - start


def run_plan(check: Check, parts: list[Part]) -> tuple[int, str]:
    """Every part in turn, the summary and the archive rewritten after each and once more at the end (a part cut
    short by Ctrl-C fails as interrupted); the exit status (0, 1 when a part failed, 130 when interrupted) and the
    summary's text."""
    rows: list = []
    run_start = time.monotonic()
    interrupted = False
    try:
        for k, part in enumerate(parts):
            check.log, check.commands = check.logs / f"{part.name}.log", []
            print(f"gpu_check: [{time.monotonic() - run_start:6.1f} s] {part.name} ...", flush=True)
            result, seconds = run_part(check, part)
            check.results[part.name] = result
            rows.append((part.name, result, seconds))
            (check.logs / f"{part.name}.result.json").write_text(json.dumps({
                "part": part.name, "status": result.status, "detail": result.detail, "seconds": round(seconds, 2),
                "key": result.key, "figures": result.figures, "commands": check.commands}, indent=2) + "\n")
            print(f"gpu_check: [{time.monotonic() - run_start:6.1f} s] {part.name}: {status_text(result)} "
                  f"({seconds:.1f} s){'  ' + result.key if result.key else ''}", flush=True)
            write_archive(check)
            write_summary(check, rows, [p.name for p in parts[k + 1:]], time.monotonic() - run_start)
    except KeyboardInterrupt:
        interrupted = True
        rows.append((parts[len(rows)].name, Result("failed", "interrupted"), 0.0))
    finally:
        summary = write_summary(check, rows, [p.name for p in parts[len(rows):]], time.monotonic() - run_start)
        write_archive(check)
    if interrupted:
        return 130, summary
    return (1 if any(r.status == "failed" for _, r, _ in rows) else 0), summary


def status_text(result: Result) -> str:
    return result.status + (f": {result.detail}" if result.detail else "")


# ---------------------------------------------------------------------------------------------------------------
# the two files of OUTDIR

FAILURE_TAIL_LINES = 15  # of each failed part's log, in summary.md: why, without opening the archive


def log_tail(log: Path, lines: int = FAILURE_TAIL_LINES) -> list[str]:
    if not log.is_file():
        return []
    return [ln[:200] for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-lines:]


def write_summary(check: Check, rows: list, pending: list[str], total_s: float) -> str:
    """summary.md: the environment, a row per part (those not reached yet too), and the end of each failed part's
    log; written whole each time (a temporary file renamed), so that a run cut short leaves a readable one."""
    info = check.env_info
    where = (info.get("gpu") or "no GPU") if not check.cpu else "CPU (--cpu)"
    head = [f"# gpu_check {time.strftime('%Y-%m-%d %H:%M')}: {where}", "",
            f"torch {info.get('torch', '?')} · CUDA {info.get('cuda', '?')} · cuDNN {info.get('cudnn', '?')} · "
            f"driver {info.get('driver') or '?'} · DALI {info.get('dali') or 'absent'} · Python "
            f"{info.get('python', '?')} · commit {info.get('commit', check.commit or '?')} · {check.count:,} "
            f"synthetic faces · total {total_s:.0f} s of a {check.budget_s:.0f} s budget", "",
            *[f"{note}  " for note in check.notes], *[""] * bool(check.notes),
            "| part | status | seconds | key figure |", "|---|---|---:|---|"]
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    body = [f"| {name} | {cell(status_text(r))} | {seconds:.1f} | {cell(r.key)} |" for name, r, seconds in rows]
    body += [f"| {name} | not run yet | | |" for name in pending]
    failed = [name for name, r, _ in rows if r.status == "failed"]
    tails = []
    for name in failed:
        tail = log_tail(check.logs / f"{name}.log")
        if tail:
            tails += ["", f"## {name}: the end of its log", "", "```", *tail, "```"]
    rerun = (["", f"Again, the failed parts only: `python3 bench/gpu_check.py {'--cpu ' if check.cpu else ''}"
              f"--only {','.join(failed)}{' --commit ' + check.commit if check.commit else ''} NEW_OUTDIR`"]
             if failed and not pending else [])
    text = "\n".join(head + body + rerun + tails) + "\n"
    replace_file(check.out / "summary.md", text.encode())
    return text


def write_archive(check: Check) -> None:
    """OUTDIR/logs.tar.gz: every part's log and result JSON and the benches' JSONs, rewritten whole."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(check.logs, arcname="logs")
    replace_file(check.out / "logs.tar.gz", buffer.getvalue())


def replace_file(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------------------------
# the command line

def command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="parts (in order; [extra]: only with --all or --only):\n" + "\n".join(
                                         f"  {p.name:15s} {p.what}{' [extra]' if p.extra else ''}" for p in PARTS))
    parser.add_argument("outdir", nargs="?", help="new or empty folder for summary.md and logs.tar.gz")
    parser.add_argument("--cpu", action="store_true", help="the same plan at tiny sizes on the CPU (the rehearsal); "
                                                           "CUDA-only parts skip")
    parser.add_argument("--only", metavar="A,B", help="these parts or groups (and what they need)")
    parser.add_argument("--skip", metavar="A,B", help="not these parts or groups (e.g. dali)")
    parser.add_argument("--all", action="store_true", help="the default plan and the extra parts")
    parser.add_argument("--plan", "--list", action="store_true",
                        help="print the chosen parts with their estimated seconds and caps, and exit")
    parser.add_argument("--count", type=int, default=None,
                        help=f"synthetic faces to draw [{GPU_COUNT:,}; --cpu {CPU_COUNT}]")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help=f"stop starting parts after this long [{GPU_BUDGET_S}; --cpu {CPU_BUDGET_S}]")
    parser.add_argument("--work", help="scratch folder for faces, prepared files, runs and logs [a new temporary one]")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--commit", help="the commit to report where the copy has no git (the benches' JSONs too)")
    parser.add_argument("--call", type=int, choices=sorted(CALLS), metavar="N",
                        help="the lent machine's call N (1-4, docs/gpu-check.md): its parts and budget; stages the "
                             "DALI part it carried (.devcarry/) and, in call 3, unpacks DALI once the parts are whole")
    parser.add_argument("--stage", default=str(STAGE), help=f"where the carried parts gather over the calls [{STAGE}]")
    parser.add_argument("--site", default=str(SITE), help=f"where DALI is unpacked [{SITE}]")
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = command_line()
    args = parser.parse_args(argv)
    call = CALLS.get(args.call)
    if call and (args.only or args.all):
        print("gpu_check: error: --call N chooses the parts itself; leave out --only and --all", file=sys.stderr)
        return 2
    try:
        parts = select(",".join(call.parts) if call else args.only, args.skip, args.all)
    except ValueError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    budget = args.budget or (CPU_BUDGET_S if args.cpu else call.budget_s if call else GPU_BUDGET_S)
    if args.plan:
        print(plan_text(parts, args.cpu, budget))
        return 0
    if not args.outdir:
        parser.error("OUTDIR is required (or --plan)")
    out = Path(args.outdir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"gpu_check: error: {out} exists and is not an empty folder; choose a new OUTDIR", file=sys.stderr)
        return 2
    count = args.count or (CPU_COUNT if args.cpu else GPU_COUNT)
    batch = 16 if args.cpu else 128
    if count < batch:
        print(f"gpu_check: error: --count {count} is less than one batch ({batch})", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).expanduser().resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(out, work, args.cpu, count, budget, args.commit)
    if call:
        parts = stage_call(check, call, parts, Path(args.stage), Path(args.site), args.skip)
    print(f"gpu_check: {'--cpu, ' if args.cpu else ''}{len(parts)} parts, budget {budget:.0f} s, {count:,} faces; "
          f"summary and logs in {out}, scratch in {work}", flush=True)
    try:
        code, summary = run_plan(check, parts)
    finally:  # the scratch folder goes after run_plan's last summary and archive: they read its logs
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + summary, flush=True)
    return code


def stage_call(check: Check, call: Call, parts: list[Part], stage_dir: Path, site: Path,
               skip: Optional[str]) -> list[Part]:
    """Stage the DALI part this call carried; where the call has DALI parts, unpack and import DALI, or say in one
    line why not and take the call's plan without DALI. The parts to run."""
    if not any(p.name in DALI_PARTS for p in parts):
        staged = stage(CARRIED, stage_dir, call.carries)
        line = (f"call {call.number}: DALI parts staged in {stage_dir}: {', '.join(staged) or 'none'} "
                f"(DALI unpacks in call 3)")
        print(f"gpu_check: {line}", flush=True)
        check.notes.append(line)
        return parts
    dali = prepare_dali(CARRIED, stage_dir, site, call.carries, check.cpu)
    print(f"gpu_check: call {call.number}: {dali.line}", flush=True)
    check.notes.append(f"call {call.number}: {dali.line}")
    if dali.usable:
        check.extra_env = dali.env
        return parts
    check.dali_blocked = dali.line
    return select(",".join(call.without_dali), skip) if call.without_dali else parts


if __name__ == "__main__":
    sys.exit(main())
