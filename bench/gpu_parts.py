"""The parts of bench/gpu_check.py, in the order of its plan (PARTS, at the end): what each part runs, what it
checks, and the key figure it reads off the output.

A part is a function of the Check (gpu_check.py: the sizes, the folders, the results of the parts before it, and
`check.sh`, which runs a command bounded by the part's cap and the budget) that returns a Result or raises
PartFailed; the runner turns anything else a part raises into a failure of that part. What a part runs in Python
is a file of its own (bench/gpu_env.py, bench/prepared_diff.py, the benches), run as a command, so that a crash or
a hang stays inside the part's cap and its output goes to the part's log.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from gpu_check import Check

REPO = Path(__file__).resolve().parents[1]
TEST_TIMEOUT_S = 150  # pytest-timeout's cap on any one GPU test (a compile is under a minute)
# pytest-timeout's thread method: a timer thread that dumps the stacks and ends the process (xdist starts a new
# worker), which reaches a test stuck inside C (a CUDA call, NCCL, DALI) where the signal method's SIGALRM
# handler would wait for the C call to return
TEST_TIMEOUT_METHOD = "thread"
TEST_WORKERS = 4  # pytest-xdist processes for the GPU tests: one GPU holds four tiny models' contexts easily
# skips that are no fault of this machine's: test_distributed's two-GPU tests on a one-GPU machine
ALLOWED_SKIPS = ("needs two CUDA GPUs",)


# ---------------------------------------------------------------------------------------------------------------
# what the runner and the parts share

class PartFailed(Exception):
    """The part's check did not hold: the message is the summary's detail."""


class PartTimedOut(Exception):
    """Raised by check.sh when the part's cap or the budget runs out (its command is stopped by then)."""


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
    estimate_s: int                      # expected seconds on an H100/H200 (see gpu_check.py's docstring)
    timeout_s: int                       # its cap on the GPU; --cpu parts get gpu_check.CPU_TIMEOUT_S
    cuda_only: bool = False              # skipped with --cpu
    needs: tuple[str, ...] = ()          # parts whose output this one reads (added to --only selections)
    groups: tuple[str, ...] = ()         # names that --only / --skip also accept
    extra: bool = False                  # not in the default plan: --all, or --only by name or group


def last_line(output: str) -> str:
    """The line that says what went wrong: fastgan's own error line where there is one (torchrun ends with a
    banner of its own), else the last line that is not a rule."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip().strip("=-")]
    errors = [ln for ln in lines if ln.startswith("fastgan: error")]
    return (errors or lines or ["(no output)"])[-1][:300]


def has_module(name: str) -> bool:
    """Whether this Python (the tests' too: they run under sys.executable) can import `name`."""
    return importlib.util.find_spec(name) is not None


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


# ---------------------------------------------------------------------------------------------------------------
# the parts

def part_environment(check: Check) -> Result:
    code, output = check.sh([sys.executable, "bench/gpu_env.py"])
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


def pytest_argv(markers: Optional[str], timeout_s: int = TEST_TIMEOUT_S, paths: tuple = ()) -> list:
    """pytest over the tests `markers` selects; in parallel and each test capped (thread method) where
    pytest-xdist and pytest-timeout are installed."""
    argv = [sys.executable, "-m", "pytest", *(["-m", markers] if markers else []), "-q", "-rfEs", "--durations=10",
            "-p", "no:cacheprovider", *map(str, paths)]
    if has_module("xdist"):
        argv += ["-n", str(min(TEST_WORKERS, os.cpu_count() or 1))]
    if has_module("pytest_timeout"):
        argv += ["--timeout", str(timeout_s), "-o", f"timeout_method={TEST_TIMEOUT_METHOD}"]
    return argv


def gpu_tests(markers: str, require_dali: bool):
    """A part that runs the tests marked gpu that `markers` selects, and only those (CI runs the CPU suite on
    every submission), with FASTGAN_REQUIRE_GPU=1 (a gpu test that would skip for want of a GPU fails instead)
    and, for the DALI tests, FASTGAN_REQUIRE_DALI=1. With --cpu every one of them skips for want of a GPU: the
    rehearsal of the command and its judgement."""
    def run(check: Check) -> Result:
        code, output = check.sh(pytest_argv(markers), require_gpu=not check.cpu, require_dali=require_dali)
        allowed = ALLOWED_SKIPS + (("needs a CUDA GPU",) if check.cpu else ())
        result = judge_pytest(code, output, allowed, want_passed=not check.cpu)
        if result.status == "passed" and check.cpu:
            result.key += " (--cpu: every gpu test skips for want of one)"
        return result
    return run


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
    code, output = check.sh([sys.executable, "bench/prepared_diff.py", check.prepared, out, "--image-size",
                             check.image_size])
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


def bench_figures(check: Check, script: str, args: list, name: Optional[str] = None) -> dict:
    """Run `script` (a bench/ script that takes --json) with `args`; the figures it wrote (into the logs, which
    the archive carries, as `name`.json), or PartFailed naming its exit status and last line, or the file it did
    not write."""
    out = check.logs / f"{name or Path(script).stem}.json"
    code, output = check.sh([sys.executable, script, "--json", out, *args])
    if code != 0:
        raise PartFailed(f"{script} exited with {code}: {last_line(output)}")
    if not out.is_file():
        raise PartFailed(f"{script} wrote no {out}")
    return json.loads(out.read_text())


def throughput_part(dali_only: bool):
    """The bench's end-to-end rows against the tutorial (measured first), then its step and loader tables; with
    `dali_only` the tutorial and DALI's rows alone (throughput.py --dali-only). However it ends (a failed row,
    a crash, its cap), the part keeps the rows measured by then: the bench rewrites its JSON after every row."""
    name = "throughput-dali" if dali_only else "throughput"

    def run(check: Check) -> Result:
        sizes = (["--quick", "--steps", 1, "--repeats", 1, "--ngf", 8, "--batch-size", 8, "--images", check.count,
                  "--no-compile", "--device", "cpu"] if check.cpu else ["--steps", 50])
        partial = check.logs / f"{name}.json"
        try:
            figures = bench_figures(check, "bench/throughput.py",
                                    ["--root", check.faces, *sizes, *["--dali-only"] * dali_only], name)
            detail = ""
        except (PartTimedOut, PartFailed) as e:
            if not partial.is_file():
                raise
            figures = json.loads(partial.read_text())
            why = "timed out at its cap" if isinstance(e, PartTimedOut) else str(e)
            detail = f"{why}; the rows measured by then are in logs/{partial.name}"
        return Result("failed" if detail else "passed", detail, throughput_key(figures), figures={
            k: figures.get(k) for k in ("best_end_to_end", "end_to_end_ratio", "targets", "failed_rows")})
    return run


def throughput_key(figures: dict) -> str:
    """The best end-to-end row and its ratio to the tutorial, and the rows that failed, in one line."""
    rows = [r for r in figures.get("end_to_end", []) if isinstance(r, dict) and r.get("images_per_second")]
    best = max(rows[1:], key=lambda r: r["images_per_second"], default=None)
    ratio = best.get("ratio") if best else None
    failed = [r["row"] for section in ("end_to_end", "steps", "loaders") for r in figures.get(section, [])
              if isinstance(r, dict) and str(r.get("note", "")).startswith("failed")]
    return "; ".join(filter(None, [f"best end to end {best['images_per_second']:,.0f} img/s ({best.get('row')})"
                                   if best else "", f"{ratio}x the tutorial" if ratio else "",
                                   f"{len(failed)} rows failed" if failed else ""])) or "no row measured"


def part_profile(check: Check) -> Result:
    """bench/profile_step.py: a trace summary of the best mode's step on the prepared file (on CUDA: compile, CUDA
    graphs, bf16, channels_last): kernels per step, the longest ones, time per kind, the share of the FLOP floor."""
    sizes = ["--image-size", check.image_size, *check.model_flags, "--device", check.device] if check.cpu else []
    figures = bench_figures(check, "bench/profile_step.py", ["--data", check.prepared, *sizes])
    share = figures.get("fraction_of_flop_floor")
    return Result("passed", key=f"{figures['kernels_per_step']:,.0f} {figures['unit']}s a step, "
                                f"{figures['step_ms']:.2f} ms a step ({figures['images_per_second']:,.0f} img/s)"
                                + (f", {share:.1%} of the FLOP floor" if share else "")
                                + (f"; {figures['note']}" if figures.get("note") else ""), figures=figures)


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


def part_data_tiers(check: Check) -> Result:
    """bench/data_scale.py: prepare's time and memory, and each --data-memory tier's images/s against the step's."""
    sizes = (["--counts", 256, "--image-size", 16, "--faces", 16, "--batch-size", 16, "--batches", 4, "--ngf", 8,
              "--device", "cpu"]
             if check.cpu else ["--counts", 100_000, "--image-size", 64])
    figures = bench_figures(check, "bench/data_scale.py", ["--work", check.work / "scale", *sizes])
    step = figures.get("step", {}).get("images_per_second")
    last = figures["sets"][-1] if figures.get("sets") else {}
    tiers = [f"{tier} {last[tier]['images_per_second']:,} img/s" for tier in ("device", "host", "disk", "disk_cold")
             if isinstance(last.get(tier), dict) and "images_per_second" in last[tier]]
    if not tiers:
        raise PartFailed(f"bench/data_scale.py measured no tier: {last}")
    return Result("passed", key=f"{last['count']:,} images: " + ", ".join(tiers)
                  + (f"; the step {step:,.0f} img/s" if step else ""), figures=figures)


def part_root_cache(check: Check) -> Result:
    """The headline command, `fastgan train --root`, twice with an empty cache (the first decodes once, the second
    finds the file), then `train --data` with the same flags: the second run's images/s against --data's (the
    target: within 10%)."""
    flags = ["--amp", "bf16", "--channels-last"] if check.cpu else [*BEST]
    cache, figures = check.work / "root-cache", {}
    for name, source, said in (("first", "faces", "images once into"), ("second", "faces", "using "),
                               ("data", "prepared", "loader prepared")):
        run_dir = check.work / "runs" / f"root-cache-{name}"
        size = ["--image-size", check.image_size] if source == "faces" else []  # --data takes the file's
        output = check.fastgan("train", *train_flags(check, source, run_dir, 2), *flags, *size, "--cache-dir", cache)
        figures[name] = check_run(run_dir, output, [said])
    rate = {k: v.get("images_per_second_steady") for k, v in figures.items()}
    if not all(rate.values()):
        raise PartFailed(f"no steady images/s in every run: {rate}")
    share = rate["second"] / rate["data"]
    return Result("passed", key=f"--root second run {rate['second']:,.0f} img/s, {share:.0%} of --data's "
                                f"{rate['data']:,.0f} (first run {rate['first']:,.0f})", figures=figures)


BEST = ["--compile", "--cuda-graphs", "--amp", "bf16", "--channels-last"]  # the headline mode, as users run it
PARTS = [
    # the default plan, in order of value: the GPU tests, the headline, DALI's GPU decoding, then the rest;
    # gpu_check.CALLS splits it into the lent machine's calls, each within its own budget
    Part("env", "GPU, driver, torch, CUDA, cuDNN, DALI, Python, commit (always runs)", part_environment, 5, 60),
    Part("gpu-tests", "pytest -m 'gpu and not dali': every GPU test that needs no DALI, FASTGAN_REQUIRE_GPU=1",
         gpu_tests("gpu and not dali", require_dali=False), 160, 220, groups=("tests",)),
    Part("synth", "fastgan synth: the synthetic faces every later part uses (--count)", part_synth, 15, 60),
    Part("throughput", "bench/throughput.py --steps 50: the headline, end to end against the tutorial, 64x64, "
         "batch 128", throughput_part(dali_only=False), 200, 280, needs=("synth",)),
    Part("prepare", "fastgan prepare --decoder pil: the prepared file of the training parts", part_prepare, 10, 60,
         needs=("synth",)),
    Part("dali-tests", "pytest -m 'gpu and dali': the GPU tests that need DALI, FASTGAN_REQUIRE_DALI=1",
         gpu_tests("gpu and dali", require_dali=True), 40, 120, groups=("dali", "tests")),
    Part("prepare-dali", "fastgan prepare --decoder dali-gpu, compared with PIL's pixels (when DALI imports)",
         part_prepare_dali, 15, 90, cuda_only=True, needs=("prepare",), groups=("dali",)),
    Part("throughput-dali", "bench/throughput.py --dali-only: DALI decoding on the GPU with the best mode's step, "
         "end to end against the tutorial, and the DALI loader alone", throughput_part(dali_only=True), 50, 120,
         needs=("synth",), groups=("dali",)),
    Part("profile", "bench/profile_step.py: a torch.profiler summary of the best mode's step (kernels a step, the "
         "longest, time per kind, share of the FLOP floor)", part_profile, 45, 120, needs=("prepare",),
         groups=("profile",)),
    Part("train-best", "train --data --compile --cuda-graphs --amp bf16 --channels-last --ema, 2 epochs "
         "(--cpu: --amp bf16 --channels-last --ema)",
         train_part("prepared", [*BEST, "--ema"], ["precision bf16", "compile {compile}", "CUDA graphs {graphs}"],
                    cpu_flags=["--amp", "bf16", "--channels-last", "--ema"], epochs=2),
         45, 120, needs=("prepare",), groups=("train", "graphs", "compile")),
    Part("ema-eval", "fastgan eval of train-best's --ema generator (SWD of 2,048 images)", part_ema_eval, 20, 90,
         needs=("train-best",), groups=("quality",)),
    Part("swd-speed", "bench/swd_speed.py --device cuda: SWD of 16,384 + 16,384 64x64 images (--cpu: 64, CPU)",
         part_swd_speed, 30, 90, groups=("quality",)),
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
    Part("root-cache", "fastgan train --root twice (decoding once into the cache, then from it) and train --data, "
         "the best mode's flags, 2 epochs each", part_root_cache, 60, 180, needs=("synth", "prepare"),
         groups=("train",), extra=True),
    Part("data-tiers", "bench/data_scale.py --counts 100000 --image-size 64: prepare, then each --data-memory "
         "tier's images/s (host: pinned, side stream) against the step's", part_data_tiers, 60, 180, extra=True),
    Part("fid-speed", "bench/fid_speed.py: FID of 50,000 generated 64x64 images (random Inception weights)",
         part_fid_speed, 60, 150, groups=("quality",), extra=True),
]
DALI_PARTS = {p.name for p in PARTS if "dali" in p.groups}
