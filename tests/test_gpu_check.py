"""bench/gpu_check.py, the one command for a lent GPU machine, keeps working: its --cpu run passes here, and its
driver goes on past failing, hung and crashing parts, bounds them by their timeouts and the budget, and says
"test not found" for a pytest node that is not there."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402

CPU_CLI_PARTS = ["env", "synth", "prepare", "train-fp32", "train-bf16", "train-fp16", "resume-graphs", "loader-torch",
                 "torchrun", "tests", "throughput", "ema-eval", "fid-speed", "swd-speed"]


def summary_rows(out: Path) -> dict:
    """{part: (status, seconds, key figure)} from summary.md's table."""
    rows = {}
    for line in (out / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("part", "---"):
            rows[cells[0]] = tuple(cells[1:])
    return rows


@pytest.mark.slow
def test_the_cpu_check_passes(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "FASTGAN_REQUIRE_GPU"}
    result = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--cpu", str(out)], capture_output=True,
                            text=True, timeout=1200, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = summary_rows(out)
    assert list(rows) == [p.name for p in gpu_check.PARTS]  # every part, in order, with a status
    for name in CPU_CLI_PARTS:
        assert rows[name][0] == "passed", (name, rows[name])
        assert json.loads((out / f"{name}.result.json").read_text())["status"] == "passed"
        assert (out / f"{name}.log").stat().st_size > 0
    for part in gpu_check.PARTS:
        if part.cuda_only:
            assert rows[part.name][0] == "skipped: no GPU (--cpu)", part.name
    for name in ("train-fp32", "loader-torch", "torchrun"):
        assert "img/s" in rows[name][2], (name, rows[name])
    assert (out / "throughput.json").exists()  # the bench's own JSON, beside the part's result
    last = gpu_check.PARTS[-1].name
    assert result.stdout.rstrip().endswith(f"| {last} | {' | '.join(rows[last])} |")  # the summary comes last
    assert "gpu_check: [" in result.stdout and "] train-fp32: passed (" in result.stdout  # a line per part


def fake_part(name, code=None, timeout_s=60, needs=(), raises=None):
    """A part that runs `python -c code` through the check's runner, or raises `raises`."""
    def run(check):
        if raises:
            raise raises
        status, output = check.sh([sys.executable, "-c", code])
        if status != 0:
            raise gpu_check.PartFailed(f"exit {status}: {gpu_check.last_line(output)}")
        return gpu_check.Result("passed", key=output.strip()[-20:])
    return gpu_check.Part(name, name, run, timeout_s, needs=needs)


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
    result = json.loads((out / "bad.result.json").read_text())
    assert result["status"] == "failed" and result["commands"][0].endswith("sys.exit(3)")
    assert "broken" in (out / "bad.log").read_text()
    printed = capsys.readouterr().out
    assert "] hang: failed: timed out after 2 s (" in printed
    assert "| late | failed: not started: the --budget of 15 s was spent | 0.0 |  |\n" in printed
    assert printed.rstrip().endswith("the failed parts only: `python bench/gpu_check.py --only "
                                     "bad,crash,hang,long,late NEW_OUTDIR`")  # the summary comes last
    assert not (tmp_path / "work").exists()  # the scratch folder is removed unless --keep


def test_a_missing_pytest_node_is_not_found_rather_than_passed(tmp_path):
    check = gpu_check.Check(tmp_path, tmp_path / "work", cpu=False, count=128, budget_s=120, commit="x")
    check.log = tmp_path / "sync-free.log"
    for node in ("tests/test_gpu.py::test_that_nobody_wrote", "tests/no_such_file.py::test_x"):
        result = gpu_check.run_test_node(check, node)
        assert (result.status, result.detail) == ("failed", f"test not found: {node}")


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
    assert names(gpu_check.select("graphs-fp16", None)) == ["env", "synth", "prepare", "graphs-fp16"]
    no_dali = names(gpu_check.select(None, "dali"))
    assert "loader-dali" not in no_dali and "prepare-dali" not in no_dali and "loader-torch" in no_dali
    assert names(gpu_check.select("tests", None)) == ["env", "tests"]
