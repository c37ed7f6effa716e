"""--tensorboard: TensorBoard events beside metrics.jsonl, holding the same records and the same sample grids,
a resumed run continuing them without a step twice, and one line naming the extra when tensorboard is missing."""
import importlib.util
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

import fastgan.trainer
from fastgan.cli import main
from fastgan.report import grid_step as sample_step
from fastgan.tensorboard_log import FOLDER, REAL_TAG, SAMPLES_TAG

TINY = ["--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "8", "--workers", "0",
        "--quiet", "--device", "cpu", "--tensorboard"]  # 24 images: 3 steps per epoch


# the tags a user finds in TensorBoard, and the metrics.jsonl key each one shows
TAGS = {"Loss/D": "loss_d", "Loss/G": "loss_g", "D_output/real": "d_x", "D_output/fake_before_D_step": "d_g_z1",
        "D_output/fake_after_D_step": "d_g_z2", "Speed/images_per_second": "images_per_second"}


# the test extra installs tensorboard; without it only the missing-package test runs
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason='needs tensorboard (pip install -e ".[test]")')


def train(*args):
    return main(["train", *TINY, *map(str, args)])


def read_events(run):
    from tensorboard.backend.event_processing import event_accumulator
    events = event_accumulator.EventAccumulator(str(run / FOLDER), size_guidance={
        event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})  # 0: keep every event, not a sample
    events.Reload()
    return events


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_events_match_the_run(run):
    """Every statistic of every metrics.jsonl record, once, at its step; every grid on disk, pixel for pixel."""
    events, written = read_events(run), records(run)
    assert set(events.Tags()["scalars"]) == set(TAGS)  # (no torchrun, no fp16: no per-rank speed, no loss scale)
    for tag, key in TAGS.items():
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [step for step, _ in logged] == [r["step"] for r in written]  # each step once, in order
        # TensorBoard keeps float32 scalars: one rounding, at most 2^-24 = 6e-8 relative (measured 2.6e-8); 3e-7
        # leaves room for it. A neighbouring record differs by 5e-4 relative or more (measured, this run)
        assert [v for _, v in logged] == pytest.approx([r[key] for r in written], rel=3e-7, abs=0), tag
    grids = {sample_step(p): p for p in (run / "samples").glob("fake_step*.png")}
    logged = events.Images(SAMPLES_TAG)
    assert [e.step for e in logged] == sorted(grids)
    for e in logged:
        shown = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))
        assert np.array_equal(shown, np.asarray(Image.open(grids[e.step]).convert("RGB"))), e.step
    [real] = events.Images(REAL_TAG)
    assert real.step == 0
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(real.encoded_image_string))),
                          np.asarray(Image.open(run / "samples" / "real.png").convert("RGB")))


@needs_tensorboard
def test_events_hold_the_metrics_records_and_the_sample_grids(image_folder, tmp_path):
    run = tmp_path / "run"
    assert train("--root", image_folder, "--out", run, "--epochs", 2, "--log-every", 2, "--sample-every", 2) == 0
    assert [r["step"] for r in records(run)][-1] == 6
    assert sorted(sample_step(p) for p in (run / "samples").glob("fake_step*.png")) == [0, 2, 3, 4, 6]
    assert_events_match_the_run(run)


@needs_tensorboard
def test_a_resumed_run_continues_the_events_without_a_step_twice(image_folder, tmp_path, monkeypatch, capfd):
    run = tmp_path / "crashed"
    real_step, count = fastgan.trainer.train_step, [0]

    def crash_during_step_5(*args, **kwargs):
        count[0] += 1
        if count[0] == 5:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)
    monkeypatch.setattr(fastgan.trainer, "train_step", crash_during_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):  # batch 4: 6 steps per epoch
        train("--root", image_folder, "--out", run, "--epochs", 2, "--batch-size", 4, "--log-every", 2,
              "--sample-every", 1, "--ckpt-every", 3)
    # the checkpoint at step 3 cut the interval 3-4 short; the record and the grid of step 4 came after it, so the
    # resumed run makes them again: TensorBoard must show each once (and the grid of step 3, from before it)
    first = read_events(run)
    assert [e.step for e in first.Scalars("Loss/D")][-1] == 4
    assert [e.step for e in first.Images(SAMPLES_TAG)] == [0, 1, 2, 3, 4]
    monkeypatch.undo()
    assert main(["train", "--out", str(run), "--resume", "auto", "--quiet"]) == 0
    assert "resumed from" in capfd.readouterr().err
    assert [r["step"] for r in records(run)][-1] == 12
    assert len(list((run / FOLDER).glob("events.out.tfevents.*"))) == 2  # one file per attempt, one folder
    assert_events_match_the_run(run)


def test_without_the_package_one_line_names_the_extra_and_nothing_is_written(image_folder, tmp_path, monkeypatch,
                                                                              capfd):
    # as on a machine without it: torch.utils.tensorboard imports again, and its `import tensorboard` fails
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    run = tmp_path / "run"
    assert train("--root", image_folder, "--out", run) == 2
    assert capfd.readouterr().err.splitlines() == [
        'fastgan: error: --tensorboard needs the tensorboard package, which is not installed: '
        'pip install "fastgan[tensorboard]"']
    assert not run.exists()
