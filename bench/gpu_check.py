"""One command for a lent GPU machine: the environment, the GPU tests, the throughput headline, then the CLI paths
that no GPU test runs at full size, each part timed and capped, everything summarised even when time runs out.

    python bench/gpu_check.py OUTDIR              # on the GPU: the default plan, within --budget (540 s)
    python bench/gpu_check.py --plan              # the parts in order, each with its estimate and cap
    python bench/gpu_check.py --cpu OUTDIR        # the same plan at tiny sizes on a CPU: the rehearsal (CI runs it)
    python bench/gpu_check.py --only throughput OUTDIR     # or --skip dali; --all adds the extra parts

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
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

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
TEST_TIMEOUT_S = 150  # pytest-timeout's cap on any one GPU test (a compile is under a minute)
TEST_WORKERS = 4  # pytest-xdist processes for the GPU tests: one GPU holds four tiny models' contexts easily
# skips that are no fault of this machine's: test_distributed's two-GPU tests on a one-GPU machine
ALLOWED_SKIPS = ("needs two CUDA GPUs",)
DALI_ABSENT_SKIP = "NVIDIA DALI is not installed"


class PartFailed(Exception):
    """The part's check did not hold: the message is the summary's detail."""


class PartTimedOut(Exception):
    pass


@dataclass
class Result:
    status: str                  # passed | failed | skipped
    detail: str = ""             # why, for failed and skipped
    key: str = ""                # the key figure, one short line
    figures: dict = field(default_factory=dict)


@dataclass
class Part:
    name: str
    what: str                            # one line for --plan
    run: Callable[["Check"], Result]
    estimate_s: int                      # expected seconds on an H100/H200 (read off the code: see the docstring)
    timeout_s: int                       # its cap on the GPU; --cpu parts get CPU_TIMEOUT_S
    cuda_only: bool = False              # skipped with --cpu
    needs: tuple[str, ...] = ()          # parts whose output this one reads (added to --only selections)
    groups: tuple[str, ...] = ()         # names that --only / --skip also accept
    extra: bool = False                  # not in the default plan: --all, or --only by name or group


class Check:
    """What the parts share: the mode, the sizes, the folders, the budget, and running a command bounded by it."""

    def __init__(self, out: Path, work: Path, cpu: bool, count: int, budget_s: float, commit: Optional[str]):
        self.out, self.work, self.cpu, self.count = out, work, cpu, count
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
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(self.work / "cache"),
               "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        for name, wanted in (("FASTGAN_REQUIRE_GPU", require_gpu), ("FASTGAN_REQUIRE_DALI", require_dali)):
            env.pop(name, None)
            if wanted:
                env[name] = "1"
        return env

    def sh(self, argv: list, require_gpu: bool = False, require_dali: bool = False) -> tuple[int, str]:
        """Run argv in the repository root, its output appended to the part's log; (exit status, output).

        Bounded by the part's deadline: past it, the command's whole process group (torchrun's ranks,
        DataLoader workers) gets SIGTERM, then SIGKILL 10 s later, and the part fails as timed out."""
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


def last_line(output: str) -> str:
    """The line that says what went wrong: fastgan's own error line where there is one (torchrun ends with a
    banner of its own), else the last line that is not a rule."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip().strip("=-")]
    errors = [ln for ln in lines if ln.startswith("fastgan: error")]
    return (errors or lines or ["(no output)"])[-1][:300]


# ---------------------------------------------------------------------------------------------------------------
# figures

TRAINED = re.compile(r"trained ([\d,]+) images in (\S+): ([\d,]+) images/s")


def run_figures(run: Path, output: str) -> dict:
    """images/s of a finished run: its last line (start-up and compiling included) and metrics.jsonl (the median
    of the log intervals after the first, which holds the compile or graph capture)."""
    figures = {}
    found = TRAINED.findall(output)
    if found:
        figures["images"] = int(found[-1][0].replace(",", ""))
        figures["images_per_second_whole_run"] = int(found[-1][2].replace(",", ""))
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        rates = [json.loads(line)["images_per_second"] for line in metrics.read_text().splitlines() if line.strip()]
        steady = rates[1:] or rates
        if steady:
            figures["images_per_second_steady"] = round(statistics.median(steady), 1)
            figures["log_intervals"] = len(rates)
    return figures


def rate_key(figures: dict) -> str:
    parts = []
    if "images_per_second_steady" in figures:
        parts.append(f"{figures['images_per_second_steady']:,.0f} img/s steady")
    if "images_per_second_whole_run" in figures:
        parts.append(f"{figures['images_per_second_whole_run']:,} img/s whole run")
    return ", ".join(parts)


def pytest_counts(output: str) -> str:
    """pytest's closing line without its '=' frame: '12 passed, 3 skipped in 40.1s'."""
    lines = [ln.strip(" =") for ln in output.splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped)", ln)
             and re.search(r" in [\d.]+s", ln)]
    return lines[-1] if lines else ""


SKIPPED = re.compile(r"^SKIPPED \[\d+\] (\S+?):(?:\d+:)? (.*)$")


def judge_pytest(code: int, output: str, allowed_skips: tuple[str, ...], want_passed: bool) -> Result:
    """A pytest run (with -rfEs) passes when pytest exited 0, its closing line counts no failure or error, every
    skip's reason contains one of `allowed_skips`, and, with `want_passed`, some test passed. Never by one literal
    count: the number of cases grows with every parametrisation."""
    counts_line = pytest_counts(output)
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in
              re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", counts_line)}
    failing = [ln.split(" - ")[0].split(" ", 1)[1] for ln in output.splitlines()
               if ln.startswith(("FAILED ", "ERROR "))]
    if code == 5:
        return Result("failed", "pytest collected no tests", counts_line)
    if code != 0 or counts.get("failed") or counts.get("error") or not counts_line:
        named = (": " + ", ".join(failing[:4]) + (f" and {len(failing) - 4} more" if len(failing) > 4 else "")
                 if failing else "")
        return Result("failed", f"pytest exited with {code}: {counts_line or last_line(output)}{named}", counts_line)
    unexpected = [(where, why) for where, why in (m.groups() for m in map(SKIPPED.match, output.splitlines()) if m)
                  if not any(allowed in why for allowed in allowed_skips)]
    if unexpected:
        where, why = unexpected[0]
        return Result("failed", f"unexpected skip in {where}: {why}"
                                + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""), counts_line)
    if want_passed and not counts.get("passed"):
        return Result("failed", f"no test passed: {counts_line}", counts_line)
    return Result("passed", key=counts_line, figures=counts)


def has_module(name: str) -> bool:
    """Whether this Python (the tests' too: they run under sys.executable) can import `name`."""
    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------------------------------------------------------
# the parts

ENVIRONMENT = r"""
import json, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
        "gpus": torch.cuda.device_count()}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name()
    info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    info["bf16"] = torch.cuda.is_bf16_supported()
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
except (OSError, subprocess.TimeoutExpired):
    info["driver"] = None
try:
    import nvidia.dali
    info["dali"] = nvidia.dali.__version__
except ImportError as e:
    info["dali"] = None
    info["dali_absent_because"] = str(e)
print("ENVIRONMENT " + json.dumps(info))
"""


def part_environment(check: Check) -> Result:
    code, output = check.sh([sys.executable, "-c", ENVIRONMENT])
    found = [ln for ln in output.splitlines() if ln.startswith("ENVIRONMENT ")]
    if code != 0 or not found:
        raise PartFailed(f"could not read the environment (exit {code}): {last_line(output)}")
    info = json.loads(found[-1][len("ENVIRONMENT "):])
    info["commit"] = check.commit or git_commit()
    info["mode"] = "cpu" if check.cpu else "gpu"
    check.env_info = info
    dali = info["dali"] or "absent"
    if check.cpu:
        return Result("passed", key=f"CPU · torch {info['torch']} · DALI {dali} · Python {info['python']} · "
                                    f"commit {info['commit']}", figures=info)
    key = (f"{info.get('gpu', 'no GPU')} · driver {info['driver'] or 'unknown (no nvidia-smi)'} · torch "
           f"{info['torch']} · CUDA {info['cuda']} · cuDNN {info['cudnn']} · DALI {dali} · Python "
           f"{info['python']} · commit {info['commit']}")
    if not info["cuda_available"]:
        return Result("failed", "torch sees no CUDA GPU (torch.cuda.is_available() is False); on a machine "
                                "without one, run with --cpu", key, info)
    return Result("passed", key=key, figures=info)


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                 capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        return head + (f" + {len(changed.splitlines())} changed files" if changed else "")
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return "unknown (no git here: pass --commit)"


def part_gpu_tests(check: Check) -> Result:
    """The tests marked gpu, and only those (CI runs the CPU suite on every submission), with
    FASTGAN_REQUIRE_GPU=1 (a gpu test that would skip for want of a GPU fails instead) and, where DALI imports,
    FASTGAN_REQUIRE_DALI=1; in parallel and each test capped where pytest-xdist and pytest-timeout are installed.
    With --cpu every one of them skips for want of a GPU: the rehearsal of the command and its judgement."""
    dali = bool(check.env_info.get("dali"))
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "--durations=10", "-p", "no:cacheprovider"]
    if has_module("xdist"):
        argv += ["-n", str(min(TEST_WORKERS, os.cpu_count() or 1))]
    if has_module("pytest_timeout"):
        argv += ["--timeout", str(TEST_TIMEOUT_S)]
    code, output = check.sh(argv, require_gpu=not check.cpu, require_dali=dali)
    allowed = ALLOWED_SKIPS + (() if dali else (DALI_ABSENT_SKIP,)) + (("needs a CUDA GPU",) if check.cpu else ())
    result = judge_pytest(code, output, allowed, want_passed=not check.cpu)
    if result.status == "passed" and check.cpu:
        result.key += " (--cpu: every gpu test skips for want of one)"
    return result


def part_synth(check: Check) -> Result:
    start = time.monotonic()
    check.fastgan("synth", check.faces, "--n", check.count)
    seconds = time.monotonic() - start
    written = len(list(check.faces.glob("*.jpg")))
    if written != check.count:
        raise PartFailed(f"asked for {check.count:,} faces, found {written:,} in {check.faces}")
    cores = os.cpu_count() or 1
    return Result("passed", key=f"{check.count:,} faces in {seconds:.1f} s on {cores} cores (start-up included)",
                  figures={"faces": check.count, "seconds": round(seconds, 2), "cores": cores})


def part_prepare(check: Check) -> Result:
    start = time.monotonic()
    check.fastgan("prepare", "--root", check.faces, "--image-size", check.image_size, "--out", check.prepared,
                  "--decoder", "pil")
    seconds = time.monotonic() - start
    if not check.prepared.is_file():
        raise PartFailed(f"fastgan prepare exited 0 but wrote no {check.prepared}")
    return Result("passed", key=f"{check.count:,} images with PIL, {check.count / seconds:,.0f} images/s "
                                f"(start-up included)", figures={"seconds": round(seconds, 2)})


def train_part(data: str, flags: list, expect: list, cpu_flags: Optional[list] = None, epochs: int = 1):
    """A `fastgan train` part: `epochs` epochs on the prepared file (data "prepared") or the JPEG folder ("faces"),
    checked for its exit status, netG.pth, the start-up line naming what was asked for (no silent fallback)
    and an images/s figure. `cpu_flags` replace `flags` with --cpu (for what a CPU cannot do: compile takes
    half a minute there, CUDA graphs need CUDA); `expect`'s texts may name {device}, and {graphs} and {compile}
    (on or off, as the flags chosen ask)."""
    def run(check: Check) -> Result:
        run_dir = check.work / "runs" / check.log.stem
        chosen = cpu_flags if check.cpu and cpu_flags is not None else flags
        output = check.fastgan("train", *train_flags(check, data, run_dir, epochs), *chosen)
        switches = {name: "on" if f"--{flag}" in chosen else "off" for name, flag in
                    (("graphs", "cuda-graphs"), ("compile", "compile"))}
        figures = check_run(run_dir, output, [w.format(device=check.device, **switches) for w in expect])
        return Result("passed", key=rate_key(figures), figures=figures)
    return run


def train_flags(check: Check, data: str, run_dir: Path, epochs: int = 1) -> list:
    source = ["--data", check.prepared] if data == "prepared" else ["--root", check.faces]
    return [*source, "--out", run_dir, "--epochs", epochs, "--quiet", "--log-every", check.log_every,
            "--device", check.device, *check.model_flags]


def part_resume_graphs(check: Check) -> Result:
    """A checkpoint written without CUDA graphs, resumed with them: one epoch of fp16 (the GradScaler's state
    travels too), then --resume auto --epochs 2 --cuda-graphs. With --cpu the second session has no graphs."""
    run_dir = check.work / "runs" / "resume-graphs"
    output = check.fastgan("train", *train_flags(check, "prepared", run_dir), "--amp", "fp16")
    check_run(run_dir, output, ["precision fp16", "CUDA graphs off"])
    graphs = [] if check.cpu else ["--cuda-graphs"]
    output = check.fastgan("train", "--resume", "auto", "--out", run_dir, "--epochs", 2, "--quiet", *graphs)
    if not (run_dir / "checkpoints" / "epoch002.pt").is_file():
        raise PartFailed("the resumed session wrote no checkpoints/epoch002.pt")
    figures = check_run(run_dir, output, ["resumed from", "precision fp16",
                                          "CUDA graphs off" if check.cpu else "CUDA graphs on"])
    return Result("passed", key=rate_key(figures) + (" (--cpu: no graphs)" if check.cpu else ""), figures=figures)


def check_run(run_dir: Path, output: str, wanted: list) -> dict:
    if not (run_dir / "netG.pth").is_file():
        raise PartFailed(f"the run folder {run_dir} holds no netG.pth")
    missing = [w for w in wanted if w not in output]
    if missing:
        raise PartFailed(f"the run's output does not say {missing[0]!r}: it did not do what was asked")
    figures = run_figures(run_dir, output)
    if not rate_key(figures):
        raise PartFailed("no images/s in the run's last line or its metrics.jsonl")
    return figures


def part_prepare_dali(check: Check) -> Result:
    """fastgan prepare --decoder dali-gpu, and how far its pixels are from PIL's (the prepare part's file)."""
    out = check.work / "faces-dali.fgd"
    start = time.monotonic()
    check.fastgan("prepare", "--root", check.faces, "--image-size", check.image_size, "--out", out,
                  "--decoder", "dali-gpu")
    seconds = time.monotonic() - start
    compare = ("import json, sys; from fastgan.data.prepared import load_pixels, read_manifest\n"
               f"s = {check.image_size}\n"
               "a, _ = load_pixels(sys.argv[1], s, 3); b, _ = load_pixels(sys.argv[2], s, 3)\n"
               "d = (a.int() - b.int()).abs().float()\n"
               "print('DIFF ' + json.dumps({'decoder': read_manifest(sys.argv[2])[0]['decoder'], 'count': len(b),"
               " 'mean': round(d.mean().item(), 3), 'p999': d.flatten().kthvalue(max(1, int(d.numel() * 0.999)))"
               ".values.item(), 'max': d.max().item()}))")
    code, output = check.sh([sys.executable, "-c", compare, check.prepared, out])
    found = [ln for ln in output.splitlines() if ln.startswith("DIFF ")]
    if code != 0 or not found:
        raise PartFailed(f"comparing with the PIL file failed (exit {code}): {last_line(output)}")
    diff = json.loads(found[-1][5:])
    if diff["decoder"] != "DALI (GPU)":
        raise PartFailed(f"the file says it was decoded by {diff['decoder']}, not DALI (GPU)")
    return Result("passed", key=f"{diff['count']:,} images, {diff['count'] / seconds:,.0f} images/s (start-up "
                                f"included); vs PIL: mean {diff['mean']}, max {diff['max']:.0f} levels",
                  figures={**diff, "seconds": round(seconds, 2)})


def part_torchrun(check: Check) -> Result:
    run_dir = check.work / "runs" / "torchrun"
    code, output = check.sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 1,
                             "-m", "fastgan", "train", "--data", check.prepared, "--out", run_dir, "--epochs", 1,
                             "--quiet", "--log-every", check.log_every, "--device", check.device,
                             *check.model_flags])
    if code != 0:
        raise PartFailed(f"torchrun exited with {code}: {last_line(output)}")
    backend = "gloo" if check.cpu else "NCCL"
    figures = check_run(run_dir, output, [f"1 process ({backend})"])
    return Result("passed", key=rate_key(figures) + (" (gloo: --cpu)" if check.cpu else ""), figures=figures)


def bench_figures(check: Check, script: str, args: list) -> dict:
    """Run `script` (a bench/ script that takes --json) with `args`; the figures it wrote (into the logs, which
    the archive carries), or PartFailed naming its exit status and last line, or the file it did not write."""
    out = check.logs / f"{Path(script).stem}.json"
    code, output = check.sh([sys.executable, script, "--json", out, *args])
    if code != 0:
        raise PartFailed(f"{script} exited with {code}: {last_line(output)}")
    if not out.is_file():
        raise PartFailed(f"{script} wrote no {out}")
    return json.loads(out.read_text())


def part_throughput(check: Check) -> Result:
    """The bench's end-to-end rows against the tutorial (measured first), then its step and loader tables. Cut at
    its cap, the part fails but keeps the rows measured by then (the bench rewrites its JSON after every row)."""
    sizes = (["--quick", "--steps", 1, "--repeats", 1, "--ngf", 8, "--batch-size", 8, "--images", check.count,
              "--no-compile", "--device", "cpu"] if check.cpu else ["--steps", 50])
    try:
        figures = bench_figures(check, "bench/throughput.py", ["--root", check.faces, *sizes])
        detail = ""
    except PartTimedOut:
        partial = check.logs / "throughput.json"
        if not partial.is_file():
            raise
        figures = json.loads(partial.read_text())
        detail = "timed out at its cap; the rows measured by then are in logs/throughput.json"
    rows = [r for r in figures.get("end_to_end", []) if isinstance(r, dict) and r.get("images_per_second")]
    best = max(rows[1:], key=lambda r: r["images_per_second"], default=None)
    ratio = best.get("ratio") if best else None
    key = "; ".join(filter(None, [f"best end to end {best['images_per_second']:,.0f} img/s ({best.get('row')})"
                                  if best else "", f"{ratio}x the tutorial" if ratio else ""]))
    return Result("failed" if detail else "passed", detail, key or "throughput.json written", figures={
        k: figures.get(k) for k in ("best_end_to_end", "end_to_end_ratio", "targets")})


def part_ema_eval(check: Check) -> Result:
    """fastgan eval of train-best's run (its --ema average, trained inside the CUDA graph) against its data: SWD."""
    run_dir = check.work / "runs" / "train-best"
    if not (run_dir / "netG_ema.pth").is_file():
        raise PartFailed(f"the --ema run wrote no {run_dir / 'netG_ema.pth'}")
    check.fastgan("eval", run_dir, "--n", 64 if check.cpu else 2048, "--device", check.device)
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    if not records or records[-1].get("generator") != "ema" or "swd" not in records[-1]:
        raise PartFailed(f"fastgan eval wrote no EMA record with an SWD in {run_dir / 'eval.jsonl'}")
    record = records[-1]
    return Result("passed", key=f"SWD {record['swd']:.1f} of {record['n']:,} images of the EMA generator in "
                                f"{record['seconds']:.0f} s", figures=record)


def part_fid_speed(check: Check) -> Result:
    sizes = ["--n", 2, "--image-size", 16, "--device", "cpu"] if check.cpu else ["--n", 50_000]
    figures = bench_figures(check, "bench/fid_speed.py", sizes)
    return Result("passed", key=f"FID of {figures['n']:,} images in {figures['total_s']:.1f} s "
                                f"(Inception {figures['inception_images_per_second']:,.0f} images/s)", figures=figures)


def part_swd_speed(check: Check) -> Result:
    sizes = ["--n", 64, "--size", 32] if check.cpu else ["--device", "cuda"]
    figures = bench_figures(check, "bench/swd_speed.py", sizes)
    return Result("passed", key=f"SWD of {figures['images_per_set']:,} + {figures['images_per_set']:,} images in "
                                f"{figures['seconds']:.1f} s", figures=figures)


BEST = ["--compile", "--cuda-graphs", "--amp", "bf16", "--channels-last"]  # the headline mode, as users run it
PARTS = [
    # the default plan, in order of value; estimates add up to 480 s (see GPU_BUDGET_S)
    Part("env", "GPU, driver, torch, CUDA, cuDNN, DALI, Python, commit (always runs)", part_environment, 10, 60),
    Part("gpu-tests", "pytest -m gpu: every GPU test, FASTGAN_REQUIRE_GPU=1 (and _DALI=1 where DALI imports)",
         part_gpu_tests, 150, 240, groups=("tests",)),
    Part("synth", "fastgan synth: the synthetic faces every later part uses (--count)", part_synth, 15, 60),
    Part("throughput", "bench/throughput.py --steps 50: the headline, end to end against the tutorial, 64x64, "
         "batch 128", part_throughput, 180, 270, needs=("synth",)),
    Part("prepare", "fastgan prepare --decoder pil: the prepared file of the training parts", part_prepare, 10, 60,
         needs=("synth",)),
    Part("train-best", "train --data --compile --cuda-graphs --amp bf16 --channels-last --ema, 2 epochs "
         "(--cpu: --amp bf16 --channels-last --ema)",
         train_part("prepared", [*BEST, "--ema"], ["precision bf16", "compile {compile}", "CUDA graphs {graphs}"],
                    cpu_flags=["--amp", "bf16", "--channels-last", "--ema"], epochs=2),
         45, 120, needs=("prepare",), groups=("train", "graphs", "compile")),
    Part("ema-eval", "fastgan eval of train-best's --ema generator (SWD of 2,048 images)", part_ema_eval, 20, 90,
         needs=("train-best",), groups=("quality",)),
    Part("swd-speed", "bench/swd_speed.py --device cuda: SWD of 16,384 + 16,384 64x64 images (--cpu: 64, CPU)",
         part_swd_speed, 30, 90, groups=("quality",)),
    Part("prepare-dali", "fastgan prepare --decoder dali-gpu, compared with PIL's pixels (when DALI imports)",
         part_prepare_dali, 20, 90, cuda_only=True, needs=("prepare",), groups=("dali",)),
    # extra: each is a CLI path that a GPU test already runs at tiny sizes; --all or --only runs them here
    Part("train-fp16", "train --data --amp fp16 (the GradScaler), eager", train_part(
         "prepared", ["--amp", "fp16"], ["precision fp16"]), 20, 90, needs=("prepare",), groups=("train",),
         extra=True),
    Part("graphs-fp16", "train --data --cuda-graphs --amp fp16", train_part(
         "prepared", ["--cuda-graphs", "--amp", "fp16"], ["precision fp16", "CUDA graphs on"]), 20, 90,
         cuda_only=True, needs=("prepare",), groups=("train", "graphs"), extra=True),
    Part("resume-graphs", "train 1 epoch (--amp fp16), then --resume auto --epochs 2 --cuda-graphs "
         "(--cpu: without graphs)", part_resume_graphs, 40, 120, needs=("prepare",), groups=("train", "graphs"),
         extra=True),
    Part("loader-torch", "train --root (JPEGs) --loader torch", train_part(
         "faces", ["--loader", "torch"], ["loader torch"]), 30, 120, needs=("synth",), groups=("train",),
         extra=True),
    Part("loader-dali", "train --root --loader dali --dali-decoder mixed --amp bf16 (when DALI imports)",
         train_part("faces", ["--loader", "dali", "--dali-decoder", "mixed", "--amp", "bf16"],
                    ["loader dali (decoder mixed"]), 30, 120, cuda_only=True, needs=("synth",),
         groups=("train", "dali"), extra=True),
    Part("torchrun", "torchrun --nproc_per_node 1 -m fastgan train --data, over NCCL (--cpu: gloo)",
         part_torchrun, 30, 120, needs=("prepare",), groups=("train",), extra=True),
    Part("fid-speed", "bench/fid_speed.py: FID of 50,000 generated 64x64 images (random Inception weights)",
         part_fid_speed, 60, 150, groups=("quality",), extra=True),
]
DALI_PARTS = {p.name for p in PARTS if "dali" in p.groups}


# ---------------------------------------------------------------------------------------------------------------
# the driver

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


def run_part(check: Check, part: Part) -> tuple[Result, float]:
    """The part's result and seconds; never raises for a failing or hung part."""
    start = time.monotonic()
    if check.cpu and part.cuda_only:
        return Result("skipped", "no GPU (--cpu)"), 0.0
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


def status_text(result: Result) -> str:
    return result.status + (f": {result.detail}" if result.detail else "")


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
    rerun = (["", f"Again, the failed parts only: `python bench/gpu_check.py {'--cpu ' if check.cpu else ''}"
              f"--only {','.join(failed)} NEW_OUTDIR`"] if failed and not pending else [])
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


def main(argv: Optional[list] = None) -> int:
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
    parser.add_argument("--commit", help="the commit to report where the copy has no git")
    args = parser.parse_args(argv)

    try:
        parts = select(args.only, args.skip, args.all)
    except ValueError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    budget = args.budget or (CPU_BUDGET_S if args.cpu else GPU_BUDGET_S)
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
    print(f"gpu_check: {'--cpu, ' if args.cpu else ''}{len(parts)} parts, budget {budget:.0f} s, {count:,} faces; "
          f"summary and logs in {out}, scratch in {work}", flush=True)

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
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + summary, flush=True)
    if interrupted:
        return 130
    return 1 if any(r.status == "failed" for _, r, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
