"""Faults beyond Ctrl-C: a killed main process, signals to the whole process group, full and read-only disks,
and every half-finished state a fault leaves, each with its way out (docs/training.md, "Faults").

Subprocesses only where a real signal or kill is needed; the rest provoke the fault in process (a mocked write
that raises ENOSPC, a planted half-finished state)."""
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fastgan.cli import main
from fastgan.data import cache

from test_resume import STEPS_PER_EPOCH, TINY, load, on_call, train


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---- 1. a main process killed by SIGKILL (the OOM killer) takes its decoding workers with it ----------------

HOLDER = """
import os, sys, time
from fastgan.data.files import parallel_map

def hold(i):  # a worker busy with a long decode
    open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()
    time.sleep(120)
    return i

with parallel_map(hold, range(64), 2) as results:
    next(results)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_decoding_workers_die_with_a_main_process_killed_by_sigkill(tmp_path):
    """The file check and `prepare` decode in a process pool; a kill -9 of the main process alone must not leave
    the workers alive, blocked on results no one reads and holding the cache's lock."""
    main_process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)])
    try:
        assert wait_for(lambda: len(list(tmp_path.iterdir())) == 2), "the workers did not start"
        workers = [int(p.name) for p in tmp_path.iterdir()]
        os.kill(main_process.pid, signal.SIGKILL)  # the main process only, as the OOM killer does
        main_process.wait(timeout=30)
        assert wait_for(lambda: not any(map(alive, workers)), 30), "a worker outlived its killed parent"
    finally:
        main_process.kill()
        for pid in [int(p.name) for p in tmp_path.iterdir()]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_run_waiting_for_the_cache_lock_says_whose_it_is(tmp_path):
    path = tmp_path / "faces.fgd"
    said, entered = [], threading.Event()
    with cache.writing_lock(path):  # another run writing this cache file
        assert path.with_suffix(".lock").read_text() == str(os.getpid())  # its holder's process id
        def wait():
            with cache.writing_lock(path, said.append):
                entered.set()
        waiter = threading.Thread(target=wait)
        waiter.start()
        assert wait_for(lambda: said, 30)
        assert not entered.is_set()  # it waits, and has said so
    waiter.join(30)
    assert entered.is_set()
    assert said == [f"waiting for process {os.getpid()}, which is writing the cache file faces.fgd (its lock "
                    f"{path.with_suffix('.lock')}); this run then uses that file"]


# ---- 2, 3. a scheduler's SIGTERM to the whole group, and SIGHUP ------------------------------------------------

def test_sigterm_to_the_whole_process_group_with_loader_workers_checkpoints(image_folder, tmp_path):
    """docker stop, systemd and Slurm's scancel signal every process of the group: the DataLoader workers must
    ignore it, so that the training process finishes its step and writes its checkpoint."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "fastgan", "train", *TINY[:10], "--device", "cpu", "--loader", "torch",
               "--workers", "2", "--quiet", "--log-every", "1", "--sample-every", "1000",
               "--root", str(image_folder), "--out", str(run), "--epochs", "1000"]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = run / "metrics.jsonl"
    wait_for(lambda: child.poll() is not None or (metrics.exists() and len(metrics.read_text().splitlines()) >= 4),
             120)
    os.killpg(child.pid, signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at iteration" in err and "Traceback" not in err, err
    saved = load(run / "checkpoints" / "last.pt")
    assert saved["step"] >= 4 and len(saved["loss_history"]) == saved["step"]


def test_sighup_stops_like_sigterm(image_folder, tmp_path, monkeypatch, capfd):
    """A closed terminal or a dropped ssh session: the step ends, a checkpoint is written, exit 129."""
    run = tmp_path / "run"

    def unhandled(signum, frame):  # (instead of the default, which would end pytest itself)
        raise AssertionError("SIGHUP reached the caller's handler: the run did not handle it")
    before = signal.signal(signal.SIGHUP, unhandled)
    try:
        on_call(monkeypatch, {2: lambda args: os.kill(os.getpid(), signal.SIGHUP)})
        assert train("--root", image_folder, "--out", run, "--epochs", 3) == 128 + signal.SIGHUP
        assert "stopped by SIGHUP at iteration 2" in capfd.readouterr().err
        assert load(run / "checkpoints" / "last.pt")["step"] == 2
        assert signal.getsignal(signal.SIGHUP) is unhandled  # the caller's handler is put back
    finally:
        signal.signal(signal.SIGHUP, before)
