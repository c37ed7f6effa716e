"""Nothing lost: stops by signal, crashes, non-finite losses and broken checkpoints, and exact resume.

A run stopped anywhere and resumed must end, in eager fp32 on the CPU, with bit for bit the weights, optimizer
state, loss history and metrics.jsonl records of the same run uninterrupted.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import fastgan.interval
import fastgan.trainer
from fastgan.cli import main

TINY = ["--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "8", "--workers", "0",
        "--quiet", "--log-every", "2", "--sample-every", "2", "--device", "cpu"]
STEPS_PER_EPOCH = 3  # 24 images, batch 8


def train(*args):
    return main(["train", *TINY, *map(str, args)])


def on_call(monkeypatch, calls: dict):
    """Replace the loop's step with one that runs `calls[n](args)` before its n-th call (1-based)."""
    real_step, count = fastgan.trainer.train_step, [0]

    def step(*args, **kwargs):
        count[0] += 1
        if count[0] in calls:
            calls[count[0]](args)
        return real_step(*args, **kwargs)
    monkeypatch.setattr(fastgan.trainer, "train_step", step)


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_training(a, b):
    """Two run folders hold bit-for-bit the same final state and the same statistics."""
    ca, cb = load(a / "checkpoints" / "last.pt"), load(b / "checkpoints" / "last.pt")
    assert (ca["epoch"], ca["iteration"], ca["step"]) == (cb["epoch"], cb["iteration"], cb["step"])
    for net in ("netG", "netD"):
        for k, v in ca[net].items():
            assert torch.equal(v, cb[net][k]), (net, k)
    for opt in ("optimizerG", "optimizerD"):
        for i, s in ca[opt]["state"].items():
            for k, v in s.items():
                assert torch.equal(v, cb[opt]["state"][i][k]), (opt, i, k)
    assert torch.equal(ca["loss_history"], cb["loss_history"]) and len(ca["loss_history"]) == ca["step"]
    assert torch.equal(ca["rng"]["noise"], cb["rng"]["noise"])
    netG_a, netG_b = load(a / "netG.pth"), load(b / "netG.pth")
    assert all(torch.equal(v, netG_b[k]) for k, v in netG_a.items())

    assert records(a) == records(b)
    grids = sorted(p.name for p in (a / "samples").glob("*.png"))
    assert grids == sorted(p.name for p in (b / "samples").glob("*.png"))
    assert all((a / "samples" / g).read_bytes() == (b / "samples" / g).read_bytes() for g in grids)


def records(run, name="metrics.jsonl"):
    """The run's metrics records without their wall-clock fields."""
    drop = ("time", "images_per_second", "images_per_second_per_rank")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run / name).read_text().splitlines()]


def steps_of(run, name="metrics.jsonl"):
    return [r["step"] for r in records(run, name)]


@pytest.fixture
def uninterrupted(image_folder, tmp_path):
    run = tmp_path / "straight"
    assert train("--root", image_folder, "--out", run, "--epochs", 3) == 0
    return run


def test_sigint_mid_epoch_checkpoints_there_and_resume_is_bit_exact(image_folder, tmp_path, uninterrupted,
                                                                   monkeypatch, capfd):
    run = tmp_path / "stopped"
    # the signal arrives during the 5th step (epoch 2, batch 2): that step finishes, then the run stops
    on_call(monkeypatch, {5: lambda args: os.kill(os.getpid(), signal.SIGINT)})
    assert train("--root", image_folder, "--out", run, "--epochs", 3) == 128 + signal.SIGINT
    err = capfd.readouterr().err
    assert "SIGINT received: stopping after this step" in err
    assert (f"stopped by SIGINT at iteration 5 (epoch 2, batch 2 of 3); checkpoint {run / 'checkpoints' / 'last.pt'}"
            f"; loss.png, progress.gif and netG.pth show the run so far. Continue with: fastgan train --out {run} "
            "--resume auto") in err
    saved = load(run / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["iteration"], saved["step"]) == (1, 2, 5)
    # the run so far, as its checkpoint holds it: the generator, a loss point per step, a frame per grid
    so_far = load(run / "netG.pth")
    assert so_far.keys() == saved["netG"].keys() and all(torch.equal(v, saved["netG"][k]) for k, v in so_far.items())
    assert Image.open(run / "progress.gif").n_frames == len(list((run / "samples").glob("fake_step*.png")))
    assert Image.open(run / "loss.png").size[0] > 0
    assert load(run / "checkpoints" / "epoch001.pt")["step"] == 3  # the epoch file is still its own
    monkeypatch.undo()
    assert main(["train", "--out", str(run), "--resume", "auto", "--quiet"]) == 0
    assert "resumed from" in capfd.readouterr().err
    assert_same_training(uninterrupted, run)


def test_resuming_into_another_runs_folder_is_refused_first_whatever_else_is_wrong(image_folder, tmp_path, capfd):
    """A 16 px checkpoint into a 32 px run's folder: the one thing that matters is the folder. (It used to say
    'pass --epochs larger than 1' first, and with that flag it trained the 16 px model into the 32 px run.)"""
    small, large = tmp_path / "small", tmp_path / "large"
    assert train("--root", image_folder, "--out", small, "--epochs", 1) == 0
    assert train("--root", image_folder, "--out", large, "--epochs", 1, "--image-size", 32) == 0
    before = sorted((p.relative_to(large).as_posix(), p.stat().st_mtime_ns) for p in large.rglob("*") if p.is_file())
    capfd.readouterr()
    wanted = (f"fastgan: error: --out {large} holds another run (image_size=32; checkpoint "
              f"{small / 'checkpoints' / 'last.pt'} has image_size=16): resume into the checkpoint's own run folder "
              "or a new --out")
    for more in ([], ["--epochs", "2"]):
        assert main(["train", "--resume", str(small / "checkpoints" / "last.pt"), "--out", str(large), "--quiet",
                     *more]) == 2
        assert capfd.readouterr().err.strip() == wanted
    after = sorted((p.relative_to(large).as_posix(), p.stat().st_mtime_ns) for p in large.rglob("*") if p.is_file())
    assert after == before  # the other run is left as it was
    # its own folder, or a new one, takes it
    assert main(["train", "--resume", str(small / "checkpoints" / "last.pt"), "--out", str(tmp_path / "branch"),
                 "--epochs", "2", "--quiet"]) == 0


def test_an_fp16_run_resumes_with_its_grad_scaler(image_folder, tmp_path, monkeypatch, capfd):
    """The GradScaler's scale and growth tracker are training state: a fresh scaler after resume rescales the
    losses differently (and skips other steps) from the run left alone. fp16 autocast runs on the CPU too."""
    straight, run = tmp_path / "straight", tmp_path / "stopped"
    assert train("--root", image_folder, "--out", straight, "--epochs", 3, "--amp", "fp16") == 0
    on_call(monkeypatch, {5: lambda args: os.kill(os.getpid(), signal.SIGINT)})
    assert train("--root", image_folder, "--out", run, "--epochs", 3, "--amp", "fp16") == 128 + signal.SIGINT
    saved = load(run / "checkpoints" / "last.pt")["scaler"]
    # after 5 steps the scaler has backed off from 2**16 and counted its good steps: a fresh one differs
    assert saved["scale"] < 2.0 ** 16 and saved["_growth_tracker"] > 0
    monkeypatch.undo()
    assert main(["train", "--out", str(run), "--resume", "auto", "--quiet"]) == 0
    assert "resumed from" in capfd.readouterr().err
    a, b = (load(r / "checkpoints" / "last.pt")["scaler"] for r in (straight, run))
    assert (a["scale"], a["_growth_tracker"]) == (b["scale"], b["_growth_tracker"])
    assert_same_training(straight, run)


def test_a_crash_loses_only_the_steps_after_the_last_ckpt_every(image_folder, tmp_path, monkeypatch, capfd):
    run = tmp_path / "crashed"

    def crash(args):
        raise RuntimeError("simulated crash (kill -9, power cut)")
    on_call(monkeypatch, {8: crash})  # during iteration 8 (epoch 3, batch 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train("--root", image_folder, "--out", run, "--epochs", 3, "--ckpt-every", 2)
    # mid-epoch checkpoints at iterations 2 and 4 (epoch ends 3 and 6 save anyway): the latest is epoch002.pt
    saved = load(run / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["iteration"], saved["step"]) == (2, 0, 6)
    # records at each multiple of --log-every 2 and each epoch's end; the checkpoints write none
    assert steps_of(run) == [2, 3, 4, 6]
    monkeypatch.undo()
    assert main(["train", "--out", str(run), "--resume", "auto", "--quiet"]) == 0
    straight = tmp_path / "straight"  # without --ckpt-every: checkpoints leave the records alone
    assert train("--root", image_folder, "--out", straight, "--epochs", 3) == 0
    assert_same_training(straight, run)


def test_resume_from_a_mid_epoch_ckpt_every_checkpoint_is_bit_exact(image_folder, tmp_path, monkeypatch, capfd):
    run = tmp_path / "crashed"

    def crash(args):
        raise RuntimeError("simulated crash")
    on_call(monkeypatch, {6: crash})  # during iteration 6; --ckpt-every 4 saved iteration 4 (epoch 2, batch 1)
    with pytest.raises(RuntimeError):
        train("--root", image_folder, "--out", run, "--epochs", 3, "--ckpt-every", 4, "--log-every", 1,
              "--sample-every", 1)
    saved = load(run / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["iteration"], saved["step"]) == (1, 1, 4)
    # iteration 5 was logged and sampled after that checkpoint: its record and grid move aside, to be made again
    monkeypatch.undo()
    assert main(["train", "--out", str(run), "--resume", "auto", "--quiet"]) == 0
    assert ("what was written after the checkpoint at iteration 4 is made again now, so it moves aside: 1 metrics "
            f"record to {run / 'metrics.after-4.jsonl'}, 1 sample grid to {run / 'samples' / 'after-4'}"
            ) in capfd.readouterr().err
    assert [json.loads(line)["step"] for line in (run / "metrics.after-4.jsonl").read_text().splitlines()] == [5]
    assert (run / "samples" / "after-4" / "fake_step0000005.png").exists()
    assert (run / "samples" / "fake_step0000005.png").exists()  # made again by the resumed run
    straight = tmp_path / "straight-log1"
    assert train("--root", image_folder, "--out", straight, "--epochs", 3, "--log-every", 1, "--sample-every", 1) == 0
    assert_same_training(straight, run)


# 24 images in batches of 4: 6 steps an epoch; records at steps 4, 6, 8, 12, 16, 18 (multiples of 4, epoch ends)
INTERVALS = ["--batch-size", 4, "--log-every", 4, "--epochs", 3]


def test_sigint_inside_a_log_interval_leaves_the_records_of_the_run_left_alone(image_folder, tmp_path, monkeypatch,
                                                                                capfd):
    """metrics.jsonl, record for record: the stop's checkpoint carries the interval it cut short (steps 9 and 10),
    the resumed run finishes it, and the record written at the stop moves aside."""
    straight = tmp_path / "straight"
    assert train("--root", image_folder, "--out", straight, *INTERVALS) == 0
    assert steps_of(straight) == [4, 6, 8, 12, 16, 18]
    run = tmp_path / "stopped"
    on_call(monkeypatch, {10: lambda args: os.kill(os.getpid(), signal.SIGINT)})  # epoch 2, batch 4
    assert train("--root", image_folder, "--out", run, *INTERVALS) == 130
    monkeypatch.undo()
    saved = load(run / "checkpoints" / "last.pt")
    assert saved["step"] == 10 and len(saved["interval"]["stats"]) == 2
    assert len(saved["loss_history"]) == 10
    assert steps_of(run) == [4, 6, 8, 10]  # the stop logs the steps it cut short: 9 and 10
    capfd.readouterr()
    assert main(["train", "--out", str(run), "--resume", "auto", "--quiet"]) == 0
    err = " ".join(capfd.readouterr().err.split())
    assert f"so it moves aside: 1 metrics record to {run / 'metrics.after-10.jsonl'}" in err
    # no grid was drawn after step 10: the line names no grids and no folder for them, and none is made
    assert "sample grid" not in err and not (run / "samples" / "after-10").exists()
    assert steps_of(run, "metrics.after-10.jsonl") == [10]
    assert_same_training(straight, run)


def test_a_crash_after_a_ckpt_every_inside_a_log_interval_leaves_the_records_of_the_run_left_alone(
        image_folder, tmp_path, monkeypatch):
    """--ckpt-every 5 saves at step 15, inside the interval of steps 13 to 16; the first attempt logs step 16 and
    crashes in step 17. The resumed run continues the interval from the checkpoint's rows 13 to 15."""
    run = tmp_path / "crashed"

    def crash(args):
        raise RuntimeError("simulated crash")
    on_call(monkeypatch, {17: crash})
    with pytest.raises(RuntimeError):
        train("--root", image_folder, "--out", run, *INTERVALS, "--ckpt-every", 5)
    monkeypatch.undo()
    saved = load(run / "checkpoints" / "last.pt")
    assert saved["step"] == 15 and len(saved["interval"]["stats"]) == 3
    assert steps_of(run) == [4, 6, 8, 12, 16]
    assert main(["train", "--out", str(run), "--resume", "auto", "--quiet"]) == 0
    assert steps_of(run, "metrics.after-15.jsonl") == [16]
    straight = tmp_path / "straight"  # without --ckpt-every: checkpoints leave the records alone
    assert train("--root", image_folder, "--out", straight, *INTERVALS) == 0
    assert_same_training(straight, run)


def test_a_checkpoint_without_the_interval_it_cut_short_still_resumes(image_folder, tmp_path, monkeypatch):
    """Checkpoints before the carried interval ended their interval with a record; one written since resumes
    under a smaller --log-every too, its first interval holding the carried steps as well."""
    run = tmp_path / "stopped"
    on_call(monkeypatch, {10: lambda args: os.kill(os.getpid(), signal.SIGINT)})
    assert train("--root", image_folder, "--out", run, *INTERVALS) == 130
    monkeypatch.undo()
    old = tmp_path / "old"
    shutil.copytree(run, old)
    saved = load(old / "checkpoints" / "last.pt")
    del saved["interval"]
    torch.save(saved, old / "checkpoints" / "last.pt")
    assert main(["train", "--out", str(old), "--resume", "auto", "--quiet"]) == 0
    assert steps_of(old) == [4, 6, 8, 10, 12, 16, 18]  # the stop's record stays: nothing to finish it with
    assert len(load(old / "checkpoints" / "last.pt")["loss_history"]) == 18
    assert main(["train", "--out", str(run), "--resume", "auto", "--quiet", "--log-every", "1"]) == 0
    assert steps_of(run) == [4, 6, 8, *range(11, 19)]  # 11: steps 9 to 11
    assert len(load(run / "checkpoints" / "last.pt")["loss_history"]) == 18


def test_second_ctrl_c_quits_at_once_and_keeps_the_last_checkpoint(image_folder, tmp_path, monkeypatch, capfd):
    run = tmp_path / "run"

    def twice(args):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    on_call(monkeypatch, {5: twice})
    assert train("--root", image_folder, "--out", run, "--epochs", 3) == 130
    err = capfd.readouterr().err
    last = run / "checkpoints" / "last.pt"
    assert f"interrupted at once at iteration 4; the last checkpoint {last} is intact" in err
    assert load(last)["step"] == 3 and not list((run / "checkpoints").glob(".*"))  # no temporary left


def test_sigint_to_the_whole_process_group_with_loader_workers(image_folder, tmp_path):
    """As a terminal's Ctrl-C does it: the signal reaches the DataLoader workers too. They inherit the handler but
    must neither announce nor act: one notice, from the training process."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "fastgan", "train", *TINY[:10], "--device", "cpu", "--loader", "torch",
               "--workers", "2", "--quiet",
               "--log-every", "1", "--sample-every", "1000", "--root", str(image_folder), "--out", str(run),
               "--epochs", "1000"]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while (child.poll() is None and time.monotonic() < deadline
           and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4)):
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert err.count("SIGINT received: stopping after this step") == 1, err
    assert "stopped by SIGINT at iteration" in err and "Traceback" not in err, err
    saved = load(run / "checkpoints" / "last.pt")
    assert saved["step"] >= 4 and len(saved["loss_history"]) == saved["step"]
    assert main(["train", "--out", str(run), "--resume", "auto", "--epochs", str(saved["epoch"] + 1)]) == 0


def test_sigterm_stops_like_the_first_ctrl_c(image_folder, tmp_path, monkeypatch, capfd):
    run = tmp_path / "run"
    on_call(monkeypatch, {2: lambda args: os.kill(os.getpid(), signal.SIGTERM)})
    assert train("--root", image_folder, "--out", run, "--epochs", 3) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at iteration 2" in capfd.readouterr().err
    assert load(run / "checkpoints" / "last.pt")["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are put back


# ---- non-finite losses ------------------------------------------------------------------------------------

def poison_weights(args):
    netG = args[0]
    with torch.no_grad():
        next(netG.parameters()).fill_(float("nan"))


def test_nan_in_fp32_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(image_folder, tmp_path,
                                                                                  monkeypatch, capfd):
    run = tmp_path / "run"
    on_call(monkeypatch, {5: poison_weights})
    assert train("--root", image_folder, "--out", run, "--epochs", 3, "--log-every", 1) == 2
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fastgan: error: the losses became non-finite at iteration 5 (Loss_D nan, Loss_G nan)")
    assert f"The last good checkpoint is {run / 'checkpoints' / 'last.pt'}." in err
    saved = load(run / "checkpoints" / "last.pt")
    assert saved["step"] == 3 and all(torch.isfinite(v).all() for v in saved["netG"].values() if v.is_floating_point())


def test_nan_weights_are_never_saved(image_folder, tmp_path, monkeypatch, capfd):
    """Losses are read per log interval; a checkpoint checks the weights themselves before writing."""
    run = tmp_path / "run"

    def poison_after_step(args):  # G's last update makes NaN weights whose losses nobody computed yet
        optimizerG = args[2]
        real_step = optimizerG.step

        def step_then_poison(*a, **k):
            out = real_step(*a, **k)
            with torch.no_grad():
                optimizerG.param_groups[0]["params"][0].fill_(float("nan"))
            return out
        optimizerG.step = step_then_poison
    on_call(monkeypatch, {3: poison_after_step})
    assert train("--root", image_folder, "--out", run, "--epochs", 3, "--log-every", 10) == 2
    err = capfd.readouterr().err
    assert "no longer finite at iteration 3; not saving them. No checkpoint had been written yet." in err
    assert not (run / "checkpoints" / "last.pt").exists()


def nan_batch(args):
    args[4].fill_(float("nan"))  # real


@pytest.mark.parametrize("persistent", [False, True])
def test_fp16_skips_non_finite_steps_and_stops_when_they_persist(image_folder, tmp_path, monkeypatch, capfd,
                                                                persistent):
    monkeypatch.setattr(fastgan.interval, "NONFINITE_PATIENCE", 3)
    run = tmp_path / "run"
    on_call(monkeypatch, {n: nan_batch for n in ([2] if not persistent else range(2, 100))})
    code = train("--root", image_folder, "--out", run, "--epochs", 3, "--amp", "fp16", "--log-every", 1)
    err = capfd.readouterr().err
    if not persistent:  # the GradScaler skipped that step: the run goes on with finite weights
        assert code == 0, err
        netG = load(run / "netG.pth")
        assert all(torch.isfinite(v).all() for v in netG.values() if v.is_floating_point())
        assert not torch.isfinite(load(run / "checkpoints" / "last.pt")["loss_history"][1]).all()
    else:
        assert code == 2
        # the message's Loss_G is the stopped step's own: the same run with patience to spare logs the same
        monkeypatch.setattr(fastgan.interval, "NONFINITE_PATIENCE", 100)
        assert train("--root", image_folder, "--out", tmp_path / "patient", "--epochs", 3, "--amp", "fp16",
                     "--log-every", 1) == 0
        loss_G = load(tmp_path / "patient" / "checkpoints" / "last.pt")["loss_history"][3, 1].item()
        assert ("the losses became non-finite at iteration 4 (Loss_D nan, Loss_G "
                f"{loss_G:.4f}) for 3 steps in a row, each skipped by the GradScaler; training stopped. The last "
                f"good checkpoint is {run / 'checkpoints' / 'last.pt'}. Lower --lr.") in err


def test_the_fp16_non_finite_streak_goes_on_across_a_resume_at_an_epochs_end(image_folder, tmp_path, monkeypatch,
                                                                            capfd):
    """Steps 2 to 4 non-finite, patience 3: the run stops at step 4. Split at the end of epoch 1 (step 3, an
    interval's end, no rows carried), the streak of 2 must still be carried, so the resumed run stops there too."""
    monkeypatch.setattr(fastgan.interval, "NONFINITE_PATIENCE", 3)
    nan_steps = {n: nan_batch for n in (2, 3, 4)}
    flags = ["--amp", "fp16", "--log-every", 1]
    on_call(monkeypatch, nan_steps)
    assert train("--root", image_folder, "--out", tmp_path / "straight", "--epochs", 2, *flags) == 2
    assert "at iteration 4" in capfd.readouterr().err
    split = tmp_path / "split"
    on_call(monkeypatch, nan_steps)
    assert train("--root", image_folder, "--out", split, "--epochs", 1, *flags) == 0
    assert load(split / "checkpoints" / "epoch001.pt")["interval"]["nonfinite_streak"] == 2
    on_call(monkeypatch, {1: nan_batch})  # the resumed session's first step is the run's step 4
    assert main(["train", "--out", str(split), "--resume", "auto", "--epochs", "2", "--quiet"]) == 2
    assert "the losses became non-finite at iteration 4" in capfd.readouterr().err


# ---- broken checkpoints -------------------------------------------------------------------------------------

def test_a_truncated_checkpoint_names_the_readable_one_to_use(image_folder, tmp_path, capfd):
    run = tmp_path / "run"
    assert train("--root", image_folder, "--out", run, "--epochs", 2, "--ckpt-every", 2) == 0
    capfd.readouterr()
    # epoch 2 ended at iteration 6: last.pt is a link to epoch002.pt; break a copy the way a full disk would
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.unlink()
    last.write_bytes(data[: len(data) // 2])
    assert main(["train", "--out", str(run), "--resume", "auto", "--epochs", "3"]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"checkpoint {last} is corrupt or truncated" in err
    assert f"the newest readable checkpoint beside it is {run / 'checkpoints' / 'epoch002.pt'}" in err
    assert main(["train", "--resume", str(run / "checkpoints" / "epoch002.pt"), "--epochs", "3",
                 "--out", str(tmp_path / "again")]) == 0


def test_resuming_inside_an_epoch_on_changed_data_says_so(image_folder, tmp_path, monkeypatch, capfd):
    run = tmp_path / "run"
    on_call(monkeypatch, {2: lambda args: os.kill(os.getpid(), signal.SIGINT)})
    assert train("--root", image_folder, "--out", run, "--epochs", 2) == 130
    monkeypatch.undo()
    (image_folder / "faces" / "0000.jpg").unlink()
    capfd.readouterr()
    assert main(["train", "--out", str(run), "--resume", "auto", "--quiet"]) == 0
    assert ("note: the data now holds 23 images, 24 when the checkpoint was written, so the rest of this epoch "
            "follows a different order") in capfd.readouterr().err


def test_a_stop_during_the_last_step_lets_the_run_finish(image_folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    on_call(monkeypatch, {6: lambda args: os.kill(os.getpid(), signal.SIGTERM)})
    assert train("--root", image_folder, "--out", run, "--epochs", 2) == 0
    assert (run / "netG.pth").exists() and (run / "loss.png").exists()


def test_a_version_1_checkpoint_still_resumes_at_its_epoch(image_folder, tmp_path):
    run = tmp_path / "run"
    assert train("--root", image_folder, "--out", run, "--epochs", 1) == 0
    current = load(run / "checkpoints" / "last.pt")
    old = {**current, "rng": dict(current["rng"]), "version": 1}
    del old["iteration"], old["images"], old["rng"]["noise"]
    torch.save(old, tmp_path / "v1.pt")
    assert main(["train", "--resume", str(tmp_path / "v1.pt"), "--epochs", "2", "--out", str(tmp_path / "on")]) == 0
    resumed = load(tmp_path / "on" / "checkpoints" / "last.pt")
    assert resumed["step"] == 6
    # the state came back, not only the step number: Adam counts the first epoch's 3 steps too, and the loss
    # history goes on from the file's
    assert all(s["step"].item() == 6 for opt in ("optimizerG", "optimizerD") for s in resumed[opt]["state"].values())
    assert torch.equal(resumed["loss_history"][:3], current["loss_history"])
    # and it trains on exactly as the current format does once its noise generator state is unusable (version 1
    # has none: both restart the noise stream the same way): same weights, optimizers, losses and samples
    current["rng"]["noise"] = torch.zeros(1, dtype=torch.uint8)
    torch.save(current, tmp_path / "v2.pt")
    assert main(["train", "--resume", str(tmp_path / "v2.pt"), "--epochs", "2", "--out", str(tmp_path / "on2")]) == 0
    assert_same_training(tmp_path / "on2", tmp_path / "on")


# ---- what a checkpoint restores into this run's objects ------------------------------------------------------

def run_objects(capturable: bool, lr: float = 2e-4, device=torch.device("cpu")):
    """A Trainer as build_trainer makes one (its networks and optimizers built on the CPU: none needs a GPU), with
    `device` as the training device its random states are saved from and restored to."""
    from fastgan.config import Config
    from fastgan.sampling import make_fixed_noise
    from fastgan.trainer import Trainer, build_models, build_optimizers, noise_generator, resolve_precision
    cfg = Config(image_size=16, ngf=4, ndf=4, nz=8, batch_size=4, lr=lr, device="cpu")
    torch.manual_seed(cfg.seed)
    netG, netD = build_models(cfg, torch.device("cpu"))
    optimizerG, optimizerD = build_optimizers(cfg, netG, netD, capturable=capturable)
    trainer = Trainer(netG, netD, optimizerG, optimizerD, resolve_precision("off", torch.device("cpu")), device,
                      noise_generator(cfg.seed, torch.device("cpu")), None, None, "test")
    return dict(cfg=cfg, trainer=trainer, netG=netG, netD=netD, optimizerG=optimizerG, optimizerD=optimizerD,
                fixed_noise=make_fixed_noise(cfg))


def take_a_step(run: dict) -> None:
    from fastgan.step import train_step
    from contextlib import nullcontext
    train_step(run["netG"], run["netD"], run["optimizerG"], run["optimizerD"], torch.rand(4, 3, 16, 16) * 2 - 1,
               torch.randn(4, 8, 1, 1), nullcontext(), run["trainer"].scaler)


def save_payload(run: dict) -> dict:
    """What a checkpoint holds of the trainer, with the run's fields its restore reads."""
    return {**run["trainer"].state_dict(), "step": 1, "config": run["cfg"].to_dict()}


def restore_into(run: dict, saved: dict) -> None:
    run["trainer"].load_state_dict(saved)


@pytest.mark.parametrize("saved_capturable", [False, True])
def test_restored_optimizers_step_as_this_run_asks_not_as_the_checkpoint_was_written(saved_capturable):
    """--cuda-graphs needs capturable Adam: resuming a checkpoint written without it (or the reverse) must give
    optimizers with this run's capturable and fused, and everything else (lr, betas, moments) from the file."""
    before = run_objects(capturable=saved_capturable)
    take_a_step(before)
    saved = save_payload(before)
    written = [dict(g) for g in saved["optimizerG"]["param_groups"]]
    after = run_objects(capturable=not saved_capturable, lr=1e-3)  # a different lr: the checkpoint's must win
    restore_into(after, saved)
    for name in ("optimizerG", "optimizerD"):
        group = after[name].param_groups[0]
        assert group["capturable"] is (not saved_capturable) and group["fused"] is True
        assert group["lr"] == 2e-4 and group["betas"] == (0.5, 0.999)
        for p_after, p_before in zip(group["params"], before[name].param_groups[0]["params"]):
            s_after, s_before = after[name].state[p_after], before[name].state[p_before]
            assert s_after["step"].item() == 1 and s_after["step"].device == p_after.device
            assert torch.equal(s_after["exp_avg"], s_before["exp_avg"])
            assert torch.equal(s_after["exp_avg_sq"], s_before["exp_avg_sq"])
    assert saved["optimizerG"]["param_groups"] == written  # the checkpoint itself is left as it was written


class FakeCudaRng:
    """torch.cuda's RNG state functions on a machine with `gpus` GPUs, each state a distinct tensor."""
    def __init__(self, monkeypatch, gpus: int):
        self.states = [torch.full((8,), i, dtype=torch.uint8) for i in range(gpus)]
        self.set_calls = []
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(self.states))
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_all)

    def index(self, device) -> int:
        index = torch.device(device).index
        if index is None or index >= len(self.states):
            raise RuntimeError(f"no GPU {device} on this machine")  # as CUDA's invalid device ordinal
        return index

    def get(self, device="cuda"):
        return self.states[self.index(device)].clone()

    def set(self, new_state, device="cuda"):
        self.states[self.index(device)] = new_state.clone()
        self.set_calls.append(self.index(device))

    def set_all(self, new_states):
        for i, s in enumerate(new_states):
            self.set(s, torch.device("cuda", i))


def test_a_checkpoint_holds_the_training_gpus_rng_state_only(monkeypatch):
    rng = FakeCudaRng(monkeypatch, gpus=4)
    saved = save_payload(run_objects(capturable=False, device=torch.device("cuda", 2)))
    assert isinstance(saved["rng"]["cuda"], torch.Tensor) and torch.equal(saved["rng"]["cuda"], rng.states[2])
    assert save_payload(run_objects(capturable=False))["rng"]["cuda"] is None  # a CPU run has none


def test_a_checkpoint_from_a_machine_with_more_gpus_restores_on_one(monkeypatch):
    written = FakeCudaRng(monkeypatch, gpus=4)
    old = save_payload(run_objects(capturable=False, device=torch.device("cuda", 0)))
    old["rng"]["cuda"] = torch.cuda.get_rng_state_all()  # as checkpoints before this change held it: every GPU's
    monkeypatch.undo()
    rng = FakeCudaRng(monkeypatch, gpus=1)
    restore_into(run_objects(capturable=False, device=torch.device("cuda", 0)), old)
    assert rng.set_calls == [0] and torch.equal(rng.states[0], written.states[0])
    # a new checkpoint holds one state and restores it on the training device
    new = save_payload(run_objects(capturable=False, device=torch.device("cuda", 0)))
    rng.states[0] = torch.zeros(8, dtype=torch.uint8)
    restore_into(run_objects(capturable=False, device=torch.device("cuda", 0)), new)
    assert torch.equal(rng.states[0], written.states[0])


def test_an_old_checkpoint_without_the_training_gpus_state_leaves_the_cuda_rng_alone(monkeypatch):
    FakeCudaRng(monkeypatch, gpus=1)
    old = save_payload(run_objects(capturable=False, device=torch.device("cuda", 0)))
    old["rng"]["cuda"] = torch.cuda.get_rng_state_all()  # written by one GPU, resumed on GPU 3 of another machine
    rng = FakeCudaRng(monkeypatch, gpus=4)
    restore_into(run_objects(capturable=False, device=torch.device("cuda", 3)), old)
    assert rng.set_calls == []
    old["rng"]["cuda"] = []  # a CPU run's checkpoint before this change
    restore_into(run_objects(capturable=False, device=torch.device("cuda", 0)), old)
    assert rng.set_calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_rng_state_survives_a_checkpoint_on_the_gpu():
    cuda = torch.device("cuda", torch.cuda.current_device())
    saved = save_payload(run_objects(capturable=False, device=cuda))
    assert saved["rng"]["cuda"].device.type == "cpu"  # a plain byte tensor, loadable with weights_only=True
    expected = torch.randn(16, device=cuda)
    torch.randn(16, device=cuda)  # the RNG moves on, as training does
    restore_into(run_objects(capturable=False, device=cuda), saved)
    assert torch.equal(torch.randn(16, device=cuda), expected)
    # a checkpoint written on a machine with more GPUs than this one: its states beyond this machine are ignored
    saved["rng"]["cuda"] = [saved["rng"]["cuda"]] * (torch.cuda.device_count() + 3)
    restore_into(run_objects(capturable=False, device=cuda), saved)
    assert torch.equal(torch.randn(16, device=cuda), expected)

