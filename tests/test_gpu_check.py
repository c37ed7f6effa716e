"""bench/gpu_check.py, the one command for a lent GPU machine, keeps working: its --cpu run (the rehearsal) passes
here and leaves two files, its driver goes on past failing, hung and crashing parts and bounds them by their caps
and the budget, its judgement of a pytest run reads the exit status and the summary (never one literal count), and
its default plan fits the budget."""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402
import gpu_parts  # noqa: E402

# every part that a CPU runs (the rest are CUDA-only and say so)
CPU_PARTS = [p.name for p in gpu_check.PARTS if not p.cuda_only]


def summary_rows(out: Path) -> dict:
    """{part: (status, seconds, key figure)} from summary.md's table."""
    rows = {}
    for line in (out / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("part", "---"):
            rows[cells[0]] = tuple(cells[1:])
    return rows


def archived(out: Path) -> dict:
    """{name: text} of logs.tar.gz's files."""
    with tarfile.open(out / "logs.tar.gz") as archive:
        return {Path(m.name).name: archive.extractfile(m).read().decode() for m in archive.getmembers() if m.isfile()}


@pytest.mark.slow
def test_the_cpu_check_passes_and_leaves_two_files(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "FASTGAN_REQUIRE_GPU"}
    result = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--cpu", "--all", str(out)],
                            capture_output=True, text=True, timeout=1200, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # a lent machine hands back at most 8 files: however many parts, the check leaves two
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.md"]
    rows = summary_rows(out)
    assert list(rows) == [p.name for p in gpu_check.PARTS]  # every part (--all), in order, with a status
    files = archived(out)
    for name in CPU_PARTS:
        assert rows[name][0] == "passed", (name, rows[name])
        assert json.loads(files[f"{name}.result.json"])["status"] == "passed"
        assert files[f"{name}.log"].startswith("$ ")  # the command, then its output
    for part in gpu_check.PARTS:
        if part.cuda_only:
            assert rows[part.name][0] == "skipped: no GPU (--cpu)", part.name
    assert re.search(r"\b\d+ skipped\b", rows["gpu-tests"][2]) and "for want of one" in rows["gpu-tests"][2]
    assert " -m gpu " in files["gpu-tests.log"].splitlines()[0]  # the GPU tests, not the CPU suite
    for name in ("train-best", "loader-torch", "torchrun"):
        assert "img/s" in rows[name][2], (name, rows[name])
    assert "x the tutorial" in rows["throughput"][2]
    assert json.loads(files["throughput.json"])["end_to_end"]  # the bench's own JSON, in the archive
    last = gpu_check.PARTS[-1].name
    assert result.stdout.rstrip().endswith(f"| {last} | {' | '.join(rows[last])} |")  # the summary comes last
    assert "gpu_check: [" in result.stdout and "] train-best: passed (" in result.stdout  # a line per part


def fake_part(name, code=None, timeout_s=60, needs=(), raises=None):
    """A part that runs `python -c code` through the check's runner, or raises `raises`."""
    def run(check):
        if raises:
            raise raises
        status, output = check.sh([sys.executable, "-c", code])
        if status != 0:
            raise gpu_check.PartFailed(f"exit {status}: {gpu_check.last_line(output)}")
        return gpu_check.Result("passed", key=output.strip()[-20:])
    return gpu_check.Part(name, name, run, 1, timeout_s, needs=needs)


def test_the_driver_goes_on_past_failures_and_bounds_every_part(tmp_path, monkeypatch, capsys):
    pid_file, long_pid = tmp_path / "grandchild.pid", tmp_path / "long.pid"
    # a command that starts a child of its own and then hangs: a timeout must stop both
    hang = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    parts = [fake_part("env", "print('fine')"),
             fake_part("bad", "import sys; print('broken'); sys.exit(3)"),
             fake_part("crash", raises=KeyError("oops")),
             fake_part("hang", hang, timeout_s=2),
             fake_part("after-bad", "print('x')", needs=("bad",)),
             fake_part("long", f"import os, time; open({str(long_pid)!r}, 'w').write(str(os.getpid())); "
                               "time.sleep(60)", timeout_s=60),
             fake_part("late", "print('never')")]
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    out = tmp_path / "out"
    code = gpu_check.main([str(out), "--budget", "15", "--work", str(tmp_path / "work")])
    assert code == 1
    rows = summary_rows(out)
    assert rows["env"][0] == "passed" and rows["env"][2] == "fine"
    assert rows["bad"][0] == "failed: exit 3: broken"
    assert rows["crash"][0] == "failed: KeyError: 'oops'"
    assert rows["hang"][0] == "failed: timed out after 2 s"
    assert rows["after-bad"][0] == "skipped: needs bad, which failed"
    # what was left of the 15 s budget after the 2 s hang: the long part is cut there, and the last not started
    assert rows["long"][0].startswith("failed: timed out after ") and rows["long"][0].endswith(" s")
    assert rows["late"][0] == "failed: not started: the --budget of 15 s was spent"
    # the cut parts' processes are gone (their 60 s sleeps would still run): the hung part's grandchild too
    for pid in (int(pid_file.read_text()), int(long_pid.read_text())):
        try:
            state = Path(f"/proc/{pid}/status").read_text()
            assert "\nState:\tZ" in state, pid  # killed, not yet reaped
        except FileNotFoundError:
            pass  # killed and reaped
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.md"]
    files = archived(out)
    result = json.loads(files["bad.result.json"])
    assert result["status"] == "failed" and result["commands"][0].endswith("sys.exit(3)")
    assert "broken" in files["bad.log"]
    # why a part failed is in the summary itself: the end of its log
    summary = (out / "summary.md").read_text()
    assert "## bad: the end of its log" in summary and "\nbroken\n" in summary
    printed = capsys.readouterr().out
    assert "] hang: failed: timed out after 2 s (" in printed
    assert "| late | failed: not started: the --budget of 15 s was spent | 0.0 |  |\n" in printed
    assert "the failed parts only: `python3 bench/gpu_check.py --only bad,crash,hang,long,late NEW_OUTDIR`" in printed
    assert printed.rstrip().endswith("```")  # the summary comes last, with the failed parts' log tails
    assert not (tmp_path / "work").exists()  # the scratch folder is removed unless --keep


PYTEST_TAIL = """
SKIPPED [2] tests/test_distributed.py:268: needs two CUDA GPUs
{extra}
{counts}
"""


@pytest.mark.parametrize("code, counts, extra, allowed, want_passed, verdict", [
    # two cases of one test passed: a pass (the old check required the literal text "1 passed")
    (0, "2 passed, 2 skipped in 4.1s", "", ("needs two CUDA GPUs",), True, "passed"),
    (0, "= 30 passed, 2 skipped, 300 deselected in 80.2s (0:01:20) =", "", ("needs two CUDA GPUs",), True, "passed"),
    # a skip whose reason is not allowed fails, even with exit status 0
    (0, "30 passed, 3 skipped in 80.2s", "SKIPPED [1] tests/conftest.py:22: needs a CUDA GPU",
     ("needs two CUDA GPUs",), True, "failed: unexpected skip in tests/conftest.py: needs a CUDA GPU"),
    (1, "1 failed, 29 passed in 80.2s", "FAILED tests/test_graphs.py::test_x[fp16-True] - AssertionError: 24",
     ("needs two CUDA GPUs",), True,
     "failed: pytest exited with 1: 1 failed, 29 passed in 80.2s: tests/test_graphs.py::test_x[fp16-True]"),
    (1, "2 errors in 3.0s", "ERROR tests/test_gpu.py::test_y - RuntimeError: CUDA", ("needs two CUDA GPUs",), True,
     "failed: pytest exited with 1: 2 errors in 3.0s: tests/test_gpu.py::test_y"),
    (0, "2 skipped in 1.0s", "", ("needs two CUDA GPUs",), True, "failed: no test passed: 2 skipped in 1.0s"),
    (0, "2 skipped in 1.0s", "", ("needs two CUDA GPUs",), False, "passed"),  # --cpu: skipping is the point
    (5, "no tests ran in 0.1s", "", ("needs two CUDA GPUs",), True, "failed: pytest collected no tests"),
])
def test_a_pytest_run_is_judged_by_its_exit_status_and_summary(code, counts, extra, allowed, want_passed, verdict):
    output = "$ python -m pytest -m gpu\n..s.\n" + PYTEST_TAIL.format(extra=extra, counts=counts)
    result = gpu_parts.judge_pytest(code, output, allowed, want_passed)
    assert gpu_check.status_text(result) == verdict


def test_outdir_must_be_new_or_empty_and_names_must_be_known(tmp_path, capsys):
    (tmp_path / "old.txt").write_text("mine")
    assert gpu_check.main([str(tmp_path)]) == 2
    assert gpu_check.main([str(tmp_path / "new"), "--only", "nope"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"gpu_check: error: {tmp_path} exists and is not an empty folder; choose a new OUTDIR"
    assert err[1].startswith("gpu_check: error: --only 'nope' is not a part or group; these are: ")
    assert (tmp_path / "old.txt").read_text() == "mine" and not (tmp_path / "new").exists()


def test_selection_adds_what_a_part_needs_and_skip_takes_groups():
    names = lambda parts: [p.name for p in parts]  # noqa: E731
    default = names(gpu_check.select(None, None))
    assert default[:4] == ["env", "gpu-tests", "synth", "throughput"]  # the GPU tests, then the headline
    assert not any(p.extra for p in gpu_check.select(None, None))
    assert names(gpu_check.select(None, None, everything=True)) == [p.name for p in gpu_check.PARTS]
    assert names(gpu_check.select("graphs-fp16", None)) == ["env", "synth", "prepare", "graphs-fp16"]  # an extra
    no_dali = names(gpu_check.select(None, "dali", everything=True))
    assert "loader-dali" not in no_dali and "prepare-dali" not in no_dali and "loader-torch" in no_dali
    assert names(gpu_check.select("tests", None)) == ["env", "gpu-tests", "dali-tests"]
    assert names(gpu_check.select("ema-eval", None)) == ["env", "synth", "prepare", "train-best", "ema-eval"]


def estimate(call) -> int:
    return sum(p.estimate_s for p in gpu_check.select(",".join(call.parts), None))


def test_every_call_fits_its_budget_and_the_lease_leaves_time_to_spare(capsys):
    """The lent machine's arithmetic (docs/gpu-check.md): each call's estimates a tenth under its budget, the
    budget (plus the tool's margin) under the 600 s a command may take; the typical lease (a 2-minute start,
    15-s turns) ends calls 1-3 with 3 minutes to spare, and the worst (3-minute start, 30-s turns, every call
    running to its budget) still returns call 2's throughput headline."""
    calls = gpu_check.CALLS
    assert [c.carries for c in calls.values()] == ["part.00", "part.01", "part.02", ""]
    for call in calls.values():
        unpack = gpu_check.UNPACK_S if call.number == 3 else 0
        assert estimate(call) + unpack <= 0.9 * call.budget_s, call.number
        assert call.budget_s + 40 <= 600
    assert all(p.estimate_s < p.timeout_s for p in gpu_check.PARTS)
    typical = (gpu_check.START_S + sum(estimate(calls[n]) + gpu_check.TRANSFER_S for n in (1, 2, 3))
               + gpu_check.UNPACK_S + 2 * gpu_check.GAP_S)
    assert typical <= gpu_check.LEASE_S - gpu_check.SPARE_S, typical
    worst_headline = (gpu_check.WORST_START_S + sum(calls[n].budget_s + gpu_check.OVERRUN_S + gpu_check.TRANSFER_S
                                                    for n in (1, 2)) + gpu_check.WORST_GAP_S)
    assert worst_headline <= gpu_check.LEASE_S, worst_headline
    assert "throughput" in calls[2].parts and "gpu-tests" in calls[1].parts
    # the order of value: the GPU tests, the headline, DALI's GPU decoding, then the rest (call 3 without DALI)
    assert {"dali-tests", "prepare-dali", "throughput-dali"} <= set(calls[3].parts)
    assert calls[3].without_dali == calls[4].parts
    assert gpu_check.main(["--plan", "--call", "3"]) == 0
    printed = capsys.readouterr().out
    assert all(f"\n{name} " in printed for name in calls[3].parts)
    assert "\nestimated total " in printed


# ---- the calls of a lent machine: DALI's parts gathered, unpacked once whole, checked by importing -------------

FAKE_VERSION = "9.9.9"


def fake_dali_parts(folder: Path, parts: int = 3, loads: bool = True) -> list[Path]:
    """A DALI-shaped package (nvidia/dali) as stage-wheels.sh packs one: a tar, xz-compressed, split into
    `parts` files part.00, part.01, ...; its import raises as a DALI without its libraries does unless `loads`."""
    import io
    import lzma
    source = folder / "src"
    (source / "nvidia" / "dali").mkdir(parents=True)
    (source / "nvidia" / "__init__.py").write_text("")
    init = f"__version__ = {FAKE_VERSION!r}\n" if loads else "raise OSError('libnvjpeg.so.13: cannot open')\n"
    (source / "nvidia" / "dali" / "__init__.py").write_text(init)
    (source / "nvidia" / "dali" / "payload.bin").write_bytes(os.urandom(60_000))  # spans the parts
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(source, arcname=".")
    packed = lzma.compress(buffer.getvalue(), format=lzma.FORMAT_XZ)
    size = -(-len(packed) // parts)
    carried = folder / "devcarry"
    carried.mkdir()
    paths = []
    for i in range(parts):
        paths.append(carried / f"part.{i:02d}")
        paths[-1].write_bytes(packed[i * size:(i + 1) * size])
    return paths


def call_check(tmp_path) -> "gpu_check.Check":
    return gpu_check.Check(tmp_path / "out", tmp_path / "work", False, 64, 60, "abc1234")


def run_calls(tmp_path, monkeypatch, numbers, parts) -> tuple:
    """Stage calls `numbers` in turn as the GPU machine would (cpu=False: DALI imported from the site folder in a
    process of its own), each carrying only its own part; (check, parts to run) of the last call."""
    carried = parts[0].parent
    monkeypatch.setattr(gpu_check, "CARRIED", carried)
    stage_dir, site = tmp_path / "stage", tmp_path / "site"
    for number in numbers:
        call = gpu_check.CALLS[number]
        check = call_check(tmp_path)
        chosen = gpu_check.stage_call(check, call, gpu_check.select(",".join(call.parts), None), stage_dir, site, None)
    return check, [p.name for p in chosen]


def test_call_3_unpacks_the_parts_of_three_calls_and_imports_dali_from_them(tmp_path, monkeypatch, capsys):
    parts = fake_dali_parts(tmp_path)
    check, chosen = run_calls(tmp_path, monkeypatch, (1, 2, 3), parts)
    assert chosen == [p.name for p in gpu_check.select(",".join(gpu_check.CALLS[3].parts), None)]
    assert check.dali_blocked is None
    assert check.extra_env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "site")
    # the environment the parts' commands get imports the unpacked package, in a process of its own
    env = check.environ()
    found = subprocess.run([sys.executable, "-c", "import nvidia.dali as d; print(d.__version__)"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert found.stdout.strip() == FAKE_VERSION, found.stderr
    assert env["FASTGAN_COMMIT"] == "abc1234"
    assert f"DALI {FAKE_VERSION} unpacked into" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["part.00", "part.01", "part.02"]


@pytest.mark.parametrize("calls, says", [
    ((1, 3), "part.01 missing"),                           # the machine was taken back after call 1
    ((3,), "part.00, part.01 missing"),                     # a fresh machine for call 3
    ((1, 2, 4), None),                                      # call 4 never needs DALI
])
def test_a_call_3_without_its_earlier_parts_says_so_and_runs_the_rest_without_dali(tmp_path, monkeypatch, capsys,
                                                                                   calls, says):
    parts = fake_dali_parts(tmp_path)
    check, chosen = run_calls(tmp_path, monkeypatch, calls, parts)
    assert chosen == [p.name for p in gpu_check.select(",".join(gpu_check.REST), None)]
    assert not check.extra_env
    if says:
        assert check.dali_blocked.startswith("DALI skipped: ") and says in check.dali_blocked
        printed = capsys.readouterr().out.splitlines()
        assert printed[-1].startswith(f"gpu_check: call 3: DALI skipped: {says}")  # one line says why
        result, _ = gpu_check.run_part(check, next(p for p in gpu_check.PARTS if p.name == "prepare-dali"))
        assert result.status == "skipped" and result.detail == check.dali_blocked


def test_parts_that_end_early_a_damaged_part_and_a_dali_that_does_not_import_are_named(tmp_path, monkeypatch):
    import gpu_stage
    parts = fake_dali_parts(tmp_path / "short")
    stage_dir = tmp_path / "stage-short"
    stage_dir.mkdir()
    for part in parts[:2]:  # part.02 never came
        (stage_dir / part.name).write_bytes(part.read_bytes())
    why = gpu_stage.unpack(stage_dir, tmp_path / "site-short")
    assert why.startswith("the parts up to part.01 end before the archive does: a later part is missing")
    assert not (tmp_path / "site-short").exists()
    parts = fake_dali_parts(tmp_path / "damaged")
    stage_dir = tmp_path / "stage-damaged"
    stage_dir.mkdir()
    for part in parts:
        data = bytearray(part.read_bytes())
        if part.name == "part.01":
            data[100:200] = bytes(100)
        (stage_dir / part.name).write_bytes(bytes(data))
    assert gpu_stage.unpack(stage_dir, tmp_path / "site-damaged").startswith("the parts do not unpack: ")
    parts = fake_dali_parts(tmp_path / "broken", loads=False)
    check, chosen = run_calls(tmp_path / "broken", monkeypatch, (1, 2, 3), parts)
    assert check.dali_blocked == "DALI skipped: it unpacks but does not import: OSError: libnvjpeg.so.13: cannot open"
    assert "dali-tests" not in chosen


def test_what_a_part_leaves_running_is_ended_with_the_part(tmp_path, monkeypatch):
    """A command that exits but leaves a process behind in its group (a timed-out test's torchrun child, a worker)
    does not run on into the next part: the part's whole process group ends with it."""
    pid_file = tmp_path / "left.pid"
    code = ("import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))")
    monkeypatch.setattr(gpu_check, "PARTS", [fake_part("env", "print('fine')"), fake_part("leaves", code)])
    assert gpu_check.main([str(tmp_path / "out"), "--budget", "30", "--work", str(tmp_path / "work")]) == 0
    pid = int(pid_file.read_text())
    try:
        assert "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text(), pid  # killed, not yet reaped
    except FileNotFoundError:
        pass  # killed and reaped


@pytest.mark.skipif(not gpu_parts.has_module("pytest_timeout"), reason="needs pytest-timeout (the test extra)")
def test_a_gpu_test_stuck_where_signals_cannot_reach_is_ended_at_its_cap(tmp_path):
    """pytest-timeout's signal method waits for the stuck call to return; the thread method that gpu_check asks
    for ends it. The stuck test blocks SIGALRM and sleeps, as a test stuck inside C would never see it."""
    stuck = tmp_path / "test_stuck.py"
    stuck.write_text("import signal, time\n\n\ndef test_stuck():\n"
                     "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n    time.sleep(60)\n")
    argv = [a for a in gpu_parts.pytest_argv(None, timeout_s=3, paths=(stuck,))]
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=45)  # the signal method:
    assert result.returncode != 0, result.stdout[-2000:]  # 60 s, past this timeout
    # the timer thread dumps the stacks under "Timeout" and ends the process (with pytest-xdist, the worker: it is
    # reported crashed and the run goes on)
    assert "Timeout" in result.stdout + result.stderr or "crashed while running" in result.stdout
