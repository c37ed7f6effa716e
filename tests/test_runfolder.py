"""The run folder: nothing is written before every check has passed; a run that ended before its first checkpoint
leaves a folder that --out takes again (its files kept, moved aside); a folder whose run is still going is
refused; and every command takes the same seeds."""
import fcntl
import subprocess
import sys

import pytest
import torch

from fastgan import runfolder
from fastgan.cli import main
from fastgan.config import MAX_SEED

TINY = ["--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "8", "--workers", "0",
        "--quiet", "--log-every", "2", "--sample-every", "2", "--device", "cpu", "--epochs", "1"]


@pytest.mark.parametrize("seed", ["-1", str(MAX_SEED + 1), "99999999999999999999999"])
def test_every_command_refuses_the_same_bad_seeds_in_one_line_and_writes_nothing(tmp_path, image_folder, capsys,
                                                                                 seed, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a run without --out would make runs/
    wanted = f"must be an integer from 0 to {MAX_SEED}, got {seed}"
    commands = [["train", *TINY, "--root", str(image_folder), "--out", "run", "--seed", seed],
                ["train", *TINY, "--root", str(image_folder), "--seed", seed],
                ["generate", "--checkpoint", "x.pt", "--seed", seed, "--out", "g.png"],
                ["eval", "run", "--seed", seed],
                ["synth", "faces", "--n", "2", "--seed", seed]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and wanted in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the image folder only: nothing written


def test_the_largest_seed_trains(tmp_path, image_folder):
    assert main(["train", *TINY, "--root", str(image_folder), "--out", str(tmp_path / "run"),
                 "--seed", str(MAX_SEED)]) == 0


@pytest.mark.parametrize("resuming", [False, True])
def test_an_existing_unwritable_out_is_refused_before_the_data_is_decoded(tmp_path, image_folder, capsys, monkeypatch,
                                                                          resuming):
    """As a new folder under an unwritable one is: at once, before the images are read (and decoded into the cache:
    minutes for CelebA)."""
    import os
    import fastgan.data
    out = tmp_path / "out"
    if resuming:
        assert main(["train", *TINY, "--root", str(image_folder), "--out", str(out)]) == 0
    else:
        out.mkdir()
    read, real_index = [], fastgan.data.index_data
    monkeypatch.setattr(fastgan.data, "index_data", lambda cfg: (read.append(cfg.root), real_index(cfg))[1])
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: answer as the kernel answers anyone else
        real_access = os.access
        monkeypatch.setattr(runfolder.os, "access", lambda path, mode: (
            False if os.fspath(path) == os.fspath(out) and mode & os.W_OK else real_access(path, mode)))
    try:
        flags = ["--resume", "auto", "--epochs", "2"] if resuming else []
        capsys.readouterr()
        assert main(["train", *TINY, "--root", str(image_folder), "--out", str(out), *flags]) == 2
    finally:
        out.chmod(0o755)
    assert capsys.readouterr().err == (f"fastgan: error: --out {out} is not writable (Permission denied); choose "
                                       "another folder\n")
    assert read == []


def test_every_file_a_run_leaves_is_in_the_docs_table(tmp_path, image_folder):
    """docs/training.md's table of what a run leaves behind names each thing a finished run's folder holds, its
    lock file too."""
    import re
    from pathlib import Path
    run = tmp_path / "run"
    assert main(["train", *TINY, "--root", str(image_folder), "--out", str(run), "--ema"]) == 0
    page = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    table = re.search(r"## What a run leaves behind\n(.*?)\n## ", page, re.S).group(1)
    left = sorted(f"{p.name}{'/' if p.is_dir() else ''}" for p in run.iterdir())
    assert runfolder.LOCK_NAME in left
    assert [name for name in left if f"`{name}" not in table] == []


def test_a_check_that_fails_after_reading_the_data_leaves_no_folder(tmp_path, image_folder, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--root", str(image_folder), "--out", str(run), "--batch-size", "25"]) == 2
    assert "larger than the 24 usable" in capsys.readouterr().err
    assert not run.exists()


def test_a_run_that_died_before_its_first_checkpoint_is_moved_aside_and_its_folder_reused(tmp_path, image_folder,
                                                                                         monkeypatch, capsys):
    run = tmp_path / "run"
    from fastgan import loop
    real_build = loop.build_trainer

    def build_failing(*args, **kwargs):  # the first step fails, as an out-of-memory or a compile error would
        trainer = real_build(*args, **kwargs)

        def step(batch):
            raise RuntimeError("CUDA out of memory (planted)")
        trainer.step = step
        return trainer
    with monkeypatch.context() as patch:
        patch.setattr(loop, "build_trainer", build_failing)
        with pytest.raises(RuntimeError, match="planted"):
            main(["train", *TINY, "--root", str(image_folder), "--out", str(run)])
    first_files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*")
                         if p.is_file() and p.name != runfolder.LOCK_NAME)
    assert "config.json" in first_files and not (run / "checkpoints" / "last.pt").exists()
    assert runfolder.unfinished(run)
    capsys.readouterr()
    # the same --out again: taken, the earlier attempt kept whole in unfinished-1/
    assert main(["train", *TINY, "--root", str(image_folder), "--out", str(run)]) == 0
    assert f"{run} held a run that ended before its first checkpoint: its files moved to {run / 'unfinished-1'}" \
        in capsys.readouterr().err
    assert sorted(p.relative_to(run / "unfinished-1").as_posix() for p in (run / "unfinished-1").rglob("*")
                  if p.is_file()) == first_files
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "netG.pth").is_file()
    # a finished run is results: refused, as before
    assert main(["train", *TINY, "--root", str(image_folder), "--out", str(run)]) == 2
    assert "already holds files" in capsys.readouterr().err


def test_a_folder_whose_run_is_still_going_is_refused(tmp_path, image_folder, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--root", str(image_folder), "--out", str(run)]) == 0
    capsys.readouterr()
    # another process holds the lock, as a live run does (the lock is released when the run ends)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); f.write('4242'); f.flush(); "
                               "print('held', flush=True); time.sleep(60)", str(run / runfolder.LOCK_NAME)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", *TINY, "--out", str(run), "--resume", "auto", "--epochs", "2"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"fastgan: error: --out {run} is in use by another fastgan train (process 4242); wait for it to end, "
            "or choose another folder")
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", *TINY, "--out", str(run), "--resume", "auto", "--epochs", "2"]) == 0  # free again


def test_a_run_holds_its_folders_lock_while_it_trains_and_releases_it(tmp_path, image_folder, monkeypatch):
    run = tmp_path / "run"
    from fastgan import loop
    seen = []
    real_read = loop.IntervalStats.read

    def read(self, *args, **kwargs):  # during training: the lock is taken
        with open(run / runfolder.LOCK_NAME, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except OSError:
                seen.append("held")
        return real_read(self, *args, **kwargs)
    monkeypatch.setattr(loop.IntervalStats, "read", read)
    assert main(["train", *TINY, "--root", str(image_folder), "--out", str(run)]) == 0
    assert seen and set(seen) == {"held"}
    assert runfolder.in_use(run) is None  # released at the end
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
