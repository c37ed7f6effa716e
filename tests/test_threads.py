"""--threads: torch's CPU threads for the step, saved with the run, kept by a resume, the caller's count restored;
and the waiting policy fastgan gives torch's OpenMP threads. What each setting costs, quiet and where other
programs share the cores, is bench/threads.py's (a bench, not a timed test)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastgan.trainer
from fastgan.cli import main

TINY = ["--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "8", "--workers", "0",
        "--quiet", "--device", "cpu", "--loader", "torch"]


def train(*args):
    return main(["train", *TINY, *map(str, args)])


@pytest.fixture
def threads_in_steps(monkeypatch):
    """torch's thread count inside each training step the runs take."""
    seen = []
    real = fastgan.trainer.train_step

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)
    monkeypatch.setattr(fastgan.trainer, "train_step", spy)
    return seen


def other_count() -> int:
    """A thread count that is not torch's count now, so that obeying it shows."""
    return 1 if torch.get_num_threads() > 1 else 2


def test_threads_runs_the_step_on_that_many_saves_it_and_gives_the_caller_its_count_back(image_folder, tmp_path,
                                                                                         threads_in_steps):
    before, asked = torch.get_num_threads(), other_count()
    assert train("--root", image_folder, "--out", tmp_path / "run", "--epochs", 1, "--threads", asked) == 0
    assert set(threads_in_steps) == {asked} and len(threads_in_steps) == 3  # 24 images, batch 8
    assert json.loads((tmp_path / "run" / "config.json").read_text())["threads"] == asked
    assert torch.get_num_threads() == before  # a notebook's torch keeps its own count after train()
    # without --threads, torch's own count (OMP_NUM_THREADS where set, else one per core)
    threads_in_steps.clear()
    assert train("--root", image_folder, "--out", tmp_path / "default", "--epochs", 1) == 0
    assert set(threads_in_steps) == {before}
    assert json.loads((tmp_path / "default" / "config.json").read_text())["threads"] is None


def test_a_resume_keeps_the_runs_threads_unless_given_again(image_folder, tmp_path, threads_in_steps):
    """The weights depend on the thread count (the order of the sums), so a resume keeps the run's, as it keeps
    its other options; --threads given again overrides it."""
    asked = other_count()
    run = tmp_path / "run"
    assert train("--root", image_folder, "--out", run, "--epochs", 1, "--threads", asked) == 0
    threads_in_steps.clear()
    assert train("--out", run, "--resume", "auto", "--epochs", 2) == 0
    assert set(threads_in_steps) == {asked} and len(threads_in_steps) == 3
    threads_in_steps.clear()
    again = 3 if asked == 2 else 2
    assert train("--out", run, "--resume", "auto", "--epochs", 3, "--threads", again) == 0
    assert set(threads_in_steps) == {again}


def test_the_dry_run_plan_says_the_threads(image_folder, tmp_path, capsys):
    asked = other_count()
    assert train("--root", image_folder, "--out", tmp_path / "run", "--threads", asked, "--dry-run") == 0
    assert json.loads(capsys.readouterr().out)["resolved"]["threads"] == asked


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_bad_threads_get_one_line_and_exit_2(image_folder, tmp_path, capsys, bad):
    assert train("--root", image_folder, "--out", tmp_path / "run", "--threads", bad) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--threads" in err and "Traceback" not in err


# prints OMP_WAIT_POLICY as torch's import (which loads its OpenMP) finds it, in a fresh process that imports fastgan
AT_TORCH_IMPORT = """
import os, sys
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print(os.environ.get("OMP_WAIT_POLICY"))
            sys.meta_path.remove(self)
sys.meta_path.insert(0, Spy())
import fastgan
"""


def wait_policy_at_torch_import(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    done = subprocess.run([sys.executable, "-c", AT_TORCH_IMPORT], env={**clean, **env}, capture_output=True,
                          text=True, check=True)
    return done.stdout.strip()


def test_fastgan_has_torchs_threads_sleep_while_they_wait_unless_the_user_says_otherwise():
    """OpenMP reads its waiting policy once, when torch loads it: fastgan sets it on import, before torch, so that
    threads waiting for a busy core sleep instead of spinning; a policy the user set (or a spin count) wins."""
    assert wait_policy_at_torch_import() == "PASSIVE"
    assert wait_policy_at_torch_import(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert wait_policy_at_torch_import(GOMP_SPINCOUNT="300000") == "None"
    assert wait_policy_at_torch_import(KMP_BLOCKTIME="200") == "None"
