"""The values a run promises, checked against independent computations, where the features meet: one tiny run with
--ema, --eval-every 2, --tensorboard and --amp fp16 together, and the same run stopped inside a log interval and
resumed. tests/README.md lists every promise of the README and docs/ and the test that checks its value.

A spy on the training step keeps each step's own statistics and G's weights after it; the records, the moving
average, the quality records, TensorBoard's events, the images/s and the sample images are recomputed from them
(or from another loader, or a direct call of the metric) and compared.
"""
import copy
import io
import json
import os
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

import fastgan.metrics.evaluate
import fastgan.outputs
import fastgan.trainer
from fastgan.cli import main
from fastgan.metrics.evaluate import fake_images
from fastgan.data.files import find_images
from fastgan.generate import load_generator
from fastgan.data.pipeline_torch import TorchLoader
from fastgan.data.prepared import decode_with_pil
from fastgan.report import image_grid
from fastgan.step import STAT_NAMES
from fastgan.metrics.swd import sliced_wasserstein_distance
from test_ema import stylegan2_ada_update
from test_tensorboard import needs_tensorboard, read_events

BATCH, STEPS_PER_EPOCH, EPOCHS = 8, 3, 4  # 24 images
EVAL_SLEEP_S = 0.3  # planted into each --eval-every measurement: its time must stay out of images/s
FLAGS = ["--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", str(BATCH), "--workers", "0",
         "--quiet", "--device", "cpu", "--log-every", "2", "--sample-every", "2", "--epochs", str(EPOCHS),
         "--ema", "0.01", "--eval-every", "2", "--eval-images", "16", "--tensorboard", "--amp", "fp16"]
pytestmark = needs_tensorboard


def records(run, name="metrics.jsonl"):
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def without_clock(rows):
    return [{k: v for k, v in r.items() if k not in ("time", "images_per_second", "eval_seconds")} for r in rows]


def train_watched(root, run, patch, stop_at=None, resume=False):
    """Train with the spy; returns what it saw: each step's statistics and G's weights after it (and G's weights
    before the first step). `stop_at`: a SIGINT during that step (1-based, this session's)."""
    seen = {"stats": [], "weights": [], "start": None, "losses_plotted": None}
    real_step = fastgan.trainer.train_step

    def step(netG, *args, **kwargs):
        if seen["start"] is None:
            seen["start"] = copy.deepcopy(netG.state_dict())
        if stop_at is not None and len(seen["stats"]) + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGINT)
        stats = real_step(netG, *args, **kwargs)
        seen["stats"].append(stats.detach().clone())
        seen["weights"].append(copy.deepcopy(netG.state_dict()))
        return stats
    patch.setattr(fastgan.trainer, "train_step", step)
    measure = fastgan.metrics.evaluate.DuringTraining.__call__
    patch.setattr(fastgan.metrics.evaluate.DuringTraining, "__call__",
                  lambda self, netG: (time.sleep(EVAL_SLEEP_S), measure(self, netG))[1])
    plot = fastgan.outputs.plot_losses
    patch.setattr(fastgan.outputs, "plot_losses", lambda steps, g, d, path: (
        seen.__setitem__("losses_plotted", (np.asarray(g), np.asarray(d))), plot(steps, g, d, path))[1])
    argv = (["train", "--out", str(run), "--resume", "auto", "--quiet"] if resume else
            ["train", *FLAGS, "--root", str(root), "--out", str(run)])
    return main(argv), seen


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from conftest import write_images
    tmp = tmp_path_factory.mktemp("values")
    write_images(tmp / "data" / "faces", 24)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
        code, seen = train_watched(tmp / "data", tmp / "run", patch)
    assert code == 0
    return tmp / "data", tmp / "run", seen


def test_every_statistic_of_a_record_is_the_mean_of_its_intervals_steps(straight):
    _, run, seen = straight
    steps = torch.stack(seen["stats"]).double().numpy()  # (12, 5): each step's own statistics
    history = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["loss_history"].double().numpy()
    assert np.array_equal(history, steps[:, :2])  # the loss history is the steps' Loss_D and Loss_G
    trained = [r for r in records(run) if "loss_d" in r]
    assert [r["step"] for r in trained] == [2, 3, 4, 6, 8, 9, 10, 12]  # every 2nd step and each epoch's end
    previous = 0
    for r in trained:
        expected = steps[previous:r["step"]].mean(0)
        # the record's mean is taken in float32 on the device: a few ulps of a value near 1 (1e-6 relative);
        # the mean of another interval, or one step's value, differs by 1e-4 or more here
        assert [r[name] for name in STAT_NAMES] == pytest.approx(expected, rel=1e-6, abs=0), r["step"]
        previous = r["step"]


def test_images_per_second_counts_training_time_only(straight):
    """images/s = the interval's images / its seconds, from the same clock as the records' `time` (rounded to 1 ms;
    images/s to 0.1: the bounds are those roundings); after an --eval-every measurement (which sleeps 0.3 s more
    here) less the measurement's time, which the rate must not contain."""
    _, run, _ = straight
    previous_time, previous_step, measured = 0.0, 0, False
    for r in records(run):
        if "swd" in r:
            measured = True  # the next interval's span holds the measurement
            continue
        images, span = (r["step"] - previous_step) * BATCH, r["time"] - previous_time
        if measured:
            assert span > EVAL_SLEEP_S  # the measurement happened in this interval's wall-clock span...
            # ...and is not in its rate: with it, the rate would be at most images / span, 7 times less here
            assert r["images_per_second"] >= images / (span - EVAL_SLEEP_S) - 0.05 > images / span
        else:
            assert images / (span + 0.001) - 0.05 <= r["images_per_second"] <= images / max(span - 0.001, 1e-6) + 0.05, r
        previous_time, previous_step, measured = r["time"], r["step"], False


def test_eval_every_records_are_the_metric_of_that_epochs_average_generator(straight):
    root, run, _ = straight
    quality = [r for r in records(run) if "swd" in r]
    assert [(r["epoch"], r["step"], r["generator"], r["eval_images"]) for r in quality] == [
        (2, 6, "ema", 16), (4, 12, "ema", 16)]
    paths = sorted(find_images(root))
    pixels = np.empty((len(paths), 16, 16, 3), dtype=np.uint8)
    decode_with_pil(paths, pixels, 16, 3, 1, None)  # as the torch loader decodes them
    picked = np.sort(np.random.default_rng([0, 7]).choice(24, 16, replace=False))  # eval's seeded draw of 16
    real = torch.from_numpy(pixels[picked]).permute(0, 3, 1, 2)
    for r in quality:
        netG = load_generator(run / "checkpoints" / f"epoch{r['epoch']:03d}.pt", ema=True)
        fake = fake_images(netG, 16, 1, torch.device("cpu"))  # eval's noise: seed 0 + 1
        expected = sliced_wasserstein_distance(real, fake, seed=0)
        assert {k: r[k] for k in expected} == pytest.approx(expected, rel=1e-9)


def test_the_average_is_stylegan2_adas_over_the_runs_generators(straight):
    """netG_ema.pth recomputed with StyleGAN2-ADA's own update from the weights G had after each step."""
    _, run, seen = straight
    from fastgan.models import Generator
    G, G_ema = Generator(8, 4, 3, 16), Generator(8, 4, 3, 16)
    G_ema.load_state_dict(seen["start"])
    for step, weights in enumerate(seen["weights"]):
        G.load_state_dict(weights)
        stylegan2_ada_update(G_ema, G, step * BATCH, BATCH, 0.01)
    saved = torch.load(run / "netG_ema.pth", weights_only=True)
    # float32 lerp in another order: ~1e-8 on weights of ~0.05; a step's update more or fewer moves them by 1e-4
    for name, value in G_ema.state_dict().items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=1e-6, msg=name)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["ema_images"] == EPOCHS * 24


def test_tensorboard_shows_the_records_quality_loss_scale_and_the_average_grids(straight):
    _, run, _ = straight
    events, rows = read_events(run), records(run)
    tags = {"Loss/D": "loss_d", "Quality/SWD": "swd", "AMP/loss_scale": "loss_scale",
            "Speed/images_per_second": "images_per_second", "D_output/real": "d_x"}
    for tag, key in tags.items():
        written = [(r["step"], r[key]) for r in rows if key in r]
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [s for s, _ in written] and written, tag
        # float32 scalars: one rounding (6e-8 relative)
        assert [v for _, v in logged] == pytest.approx([v for _, v in written], rel=3e-7), tag
    grids = sorted(run.glob("samples/fake_ema_step*.png"))
    assert grids and not list(run.glob("samples/fake_step*.png"))  # the average draws them all
    shown = events.Images("Samples/fixed_noise")
    assert len(shown) == len(grids)
    for event, path in zip(shown, grids):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(event.encoded_image_string))),
                              np.asarray(Image.open(path).convert("RGB"))), path.name


def test_real_png_is_the_loaders_first_images_and_loss_png_the_loss_history(straight):
    root, run, seen = straight
    loader = TorchLoader(sorted(find_images(root)), 16, 3, BATCH, torch.device("cpu"), seed=999)  # the run's seed
    loader.set_epoch(0)
    first = torch.cat(list(loader))[:64]  # the other way in: the batches of epoch 1, as training draws them
    expected = np.asarray(image_grid(first, nrow=8))
    assert np.array_equal(np.asarray(Image.open(run / "samples" / "real.png")), expected)
    history = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["loss_history"].numpy()
    plotted_g, plotted_d = seen["losses_plotted"]
    assert np.array_equal(plotted_g, history[:, 1]) and np.array_equal(plotted_d, history[:, 0])  # G is G


def test_real_png_of_a_run_decoding_every_epoch_is_its_loaders_first_images(image_folder, tmp_path):
    """The same promise where the images are decoded every epoch (--loader torch: the run's preview comes from the
    files, not from the cache's pixels)."""
    run = tmp_path / "run"
    assert main(["train", "--root", str(image_folder), "--out", str(run), "--loader", "torch", "--workers", "0",
                 "--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", str(BATCH),
                 "--epochs", "1", "--quiet", "--device", "cpu"]) == 0
    loader = TorchLoader(sorted(find_images(image_folder)), 16, 3, BATCH, torch.device("cpu"), seed=999)
    loader.set_epoch(0)
    expected = np.asarray(image_grid(torch.cat(list(loader))[:64], nrow=8))
    assert np.array_equal(np.asarray(Image.open(run / "samples" / "real.png")), expected)


def test_stopped_inside_an_interval_and_resumed_it_ends_as_the_run_left_alone(straight, tmp_path, monkeypatch,
                                                                                capfd):
    """SIGINT during step 7 (epoch 3, inside the log interval 7-8, after the epoch-2 measurement): the checkpoint
    carries one row of the interval, the fp16 scaler and streak, the average and its image count, the data
    position, and TensorBoard's purge point; the resumed run must end with the uninterrupted run's values."""
    root, alone, _ = straight
    run = tmp_path / "split"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, _ = train_watched(root, run, monkeypatch, stop_at=7)
    assert code == 128 + signal.SIGINT
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["iteration"], saved["step"], len(saved["interval"]["stats"])) == (2, 1, 7, 1)
    assert saved["ema_images"] == 7 * BATCH
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, _ = train_watched(root, run, monkeypatch, resume=True)
    assert code == 0, capfd.readouterr().err
    # every record, the quality ones included, with the run left alone's values
    assert without_clock(records(run)) == without_clock(records(alone))
    for name in ("netG.pth", "netG_ema.pth"):
        a, b = (torch.load(r / name, weights_only=True) for r in (alone, run))
        assert all(torch.equal(v, b[k]) for k, v in a.items()), name
    ends = [torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (alone, run)]
    assert ends[0]["ema_images"] == ends[1]["ema_images"] and ends[0]["scaler"] == ends[1]["scaler"]
    assert ends[0]["interval"]["nonfinite_streak"] == ends[1]["interval"]["nonfinite_streak"]
    # TensorBoard: each step once, the values of the run left alone (the stop's cut-short record purged)
    events = [read_events(r) for r in (alone, run)]
    for tag in ("Loss/D", "Loss/G", "Quality/SWD", "AMP/loss_scale"):
        a, b = ([(e.step, e.value) for e in ev.Scalars(tag)] for ev in events)
        assert a == b, tag
    grids = sorted(p.name for p in alone.glob("samples/fake_*.png"))
    assert grids == sorted(p.name for p in run.glob("samples/fake_*.png"))
    assert all((alone / "samples" / g).read_bytes() == (run / "samples" / g).read_bytes() for g in grids)


@pytest.mark.parametrize("mirror", [False, True])
def test_a_prepared_files_real_png_and_quality_records_are_what_the_model_sees(straight, tmp_path, mirror):
    """--data (with --ema and --eval-every 1): real.png is the first images of epoch 1 as the prepared loader's
    batches hold them, flipped where --mirror flips them (unflipped, they are the torch loader's: the --root run's
    real.png); the quality record is SWD against the file's own pixels, of the average generator."""
    root, alone, _ = straight
    from fastgan.data.prepared import PreparedLoader, load_pixels
    data, run = tmp_path / "faces.fgd", tmp_path / "run"
    assert main(["prepare", "--root", str(root), "--image-size", "16", "--out", str(data), "--decoder", "pil",
                 "--workers", "1"]) == 0
    assert main(["train", *FLAGS[:15], "--data", str(data), "--out", str(run), "--epochs", "1", "--seed", "999",
                 "--ema", "0.01", "--eval-every", "1", "--eval-images", "16", *(["--mirror"] if mirror else [])]) == 0
    pixels = load_pixels(data, 16, 3)[0]
    loader = PreparedLoader(pixels, BATCH, torch.device("cpu"), seed=999, mirror=mirror)
    loader.set_epoch(0)
    expected = np.asarray(image_grid(torch.cat(list(loader))[:64], nrow=8))
    shown = np.asarray(Image.open(run / "samples" / "real.png"))
    assert np.array_equal(shown, expected)
    same_as_root = np.array_equal(shown, np.asarray(Image.open(alone / "samples" / "real.png")))
    assert same_as_root != mirror  # flipped images differ from the torch loader's, unflipped ones are its pixels
    [quality] = [r for r in records(run) if "swd" in r]
    picked = np.sort(np.random.default_rng([0, 7]).choice(24, 16, replace=False))
    real = pixels[torch.from_numpy(picked)].permute(0, 3, 1, 2)  # the file's pixels, unflipped
    fake = fake_images(load_generator(run / "checkpoints" / "epoch001.pt", ema=True), 16, 1, torch.device("cpu"))
    assert quality["generator"] == "ema"
    assert quality["swd"] == pytest.approx(sliced_wasserstein_distance(real, fake, seed=0)["swd"], rel=1e-9)
