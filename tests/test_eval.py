"""fastgan eval and --eval-every: the wiring around the metrics (which images, which generator, the caches, the
records and plot, the errors). The metrics themselves are tested against independent implementations in
tests/test_swd.py and tests/test_fid.py; nothing here downloads anything."""
import json
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

import fastgan.metrics.inception
import fastgan.data.prepared
from fastgan.metrics import evaluate
from fastgan.cli import main
from fastgan.metrics.fid import feature_statistics, frechet_distance
from fastgan.generate import load_generator
from fastgan.report import image_grid
from fastgan.metrics.swd import sliced_wasserstein_distance

TINY = ["--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "8", "--workers", "0",
        "--quiet", "--log-every", "2", "--sample-every", "2", "--device", "cpu"]  # 24 images: 3 steps an epoch
CPU = ["--device", "cpu", "--workers", "1"]


def train(*args):
    return main(["train", *TINY, *map(str, args)])


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def ema_run(image_folder, tmp_path):
    run = tmp_path / "run"
    assert train("--root", image_folder, "--out", run, "--epochs", 2, "--ema", 0.01) == 0
    return run


class StandIn(torch.nn.Module):
    """A small fixed feature network with the Inception's call contract: [0, 1] (n, 3, H, W) -> (n, 16)."""

    def __init__(self):
        super().__init__()
        self.projection = torch.nn.Linear(3 * 4 * 4, 16)
        torch.nn.init.normal_(self.projection.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, images):
        return self.projection(torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1))


def test_eval_of_a_run_measures_each_epoch_with_the_ema_generator(ema_run, image_folder, capsys):
    assert main(["eval", str(ema_run), *CPU, "--n", "24"]) == 0
    err = capsys.readouterr().err
    assert "epoch001.pt" in err and "epoch002.pt" in err and "eval.jsonl" in err
    first = records(ema_run / "eval.jsonl")
    assert [(r["epoch"], r["step"], r["generator"], r["n"]) for r in first] == [(1, 3, "ema", 24), (2, 6, "ema", 24)]
    assert set(first[0]) >= {"swd16", "swd", "checkpoint", "real", "seconds"}
    # the figure is SWD between the data's pixels, decoded as training decodes them, and the EMA generator's
    # images from noise seed 1, as saved (uint8): recomputed here from the parts
    real = np.empty((24, 16, 16, 3), dtype=np.uint8)
    fastgan.data.prepared.decode_with_pil(sorted((image_folder / "faces").glob("*.jpg")), real, 16, 3, 1, None)
    netG = load_generator(ema_run / "checkpoints" / "epoch002.pt", ema=True)
    fake = evaluate.fake_images(netG, 24, 1, torch.device("cpu"))
    expected = sliced_wasserstein_distance(torch.from_numpy(real).permute(0, 3, 1, 2), fake, seed=0)
    assert first[1]["swd"] == pytest.approx(expected["swd"], rel=1e-9)
    # an eval of the raw G is another figure, and appends: the earlier records stay
    assert main(["eval", str(ema_run), *CPU, "--n", "24", "--no-ema", "--epochs", "2"]) == 0
    second = records(ema_run / "eval.jsonl")
    assert second[:2] == first and len(second) == 3
    assert second[2]["generator"] == "raw" and second[2]["swd"] != first[1]["swd"]
    with Image.open(ema_run / "eval.png") as plot:  # one chart: SWD, the EMA's and the raw G's lines
        assert plot.size == (1000, 500)


def test_generated_pixels_are_the_saved_images(tmp_path):
    images = torch.linspace(-1, 1, 3 * 8 * 8 * 5).reshape(5, 3, 8, 8)
    grid = np.asarray(image_grid(images, nrow=5))  # tiles of 8 px at 2 + 10 k: what the PNGs hold
    as_png = np.stack([grid[2:10, 2 + 10 * k:10 + 10 * k] for k in range(5)])
    assert np.array_equal(evaluate.to_uint8(images).permute(0, 2, 3, 1).numpy(), as_png)


def test_the_real_side_is_decoded_once_per_data_set(ema_run, image_folder, monkeypatch):
    calls = []
    real_decode = fastgan.data.prepared.decode_with_pil
    monkeypatch.setattr(fastgan.data.prepared, "decode_with_pil", lambda paths, *a: (calls.append(len(paths)),
                                                                                 real_decode(paths, *a))[1])
    checkpoint = ema_run / "checkpoints" / "epoch001.pt"
    first, again = [evaluate.evaluate(checkpoint, root=str(image_folder), n=20, device="cpu", workers=1)[0]
                    for _ in range(2)]
    assert calls == [20]  # the second eval read the cache, and measured the same
    assert first["swd"] == again["swd"]
    # a changed file is another data set: decoded again
    Image.new("RGB", (40, 48), "red").save(image_folder / "faces" / "0003.jpg")
    evaluate.evaluate(checkpoint, root=str(image_folder), n=20, device="cpu", workers=1)
    assert calls == [20, 20]


def test_a_prepared_file_and_its_folder_are_the_same_real_images(ema_run, image_folder, tmp_path):
    data = tmp_path / "faces.fgd"
    assert main(["prepare", "--root", str(image_folder), "--image-size", "16", "--out", str(data),
                 "--workers", "1", "--decoder", "pil"]) == 0
    checkpoint = ema_run / "checkpoints" / "epoch002.pt"
    from_folder = evaluate.evaluate(checkpoint, root=str(image_folder), n=16, device="cpu", workers=1)
    from_file = evaluate.evaluate(checkpoint, data=str(data), n=16, device="cpu")
    assert from_folder[0]["swd"] == from_file[0]["swd"]  # the same 16 images drawn, the same pixels


def test_fid_and_kid_use_the_inception_features_and_cache_the_real_ones(ema_run, image_folder, monkeypatch):
    loads, forwards = [], []
    stand_in = StandIn()
    stand_in.register_forward_hook(lambda m, i, o: forwards.append(len(i[0])))
    monkeypatch.setattr(fastgan.metrics.inception, "load_inception", lambda path, device: (loads.append(path), stand_in)[1])
    checkpoint = ema_run / "checkpoints" / "epoch002.pt"
    args = dict(root=str(image_folder), n=24, metrics=("fid", "kid"), device="cpu", workers=1,
                inception="weights.pth")
    record = evaluate.evaluate(checkpoint, **args)[0]
    assert loads == ["weights.pth"] and sum(forwards) == 48  # real and generated images, once each
    real = evaluate.real_images(16, 3, 24, 0, root=str(image_folder)).pixels
    fake = evaluate.fake_images(load_generator(checkpoint), 24, 1, torch.device("cpu"))
    with torch.no_grad():
        features = [stand_in(x.float() / 255).double().numpy() for x in (real, fake)]
    assert record["fid"] == pytest.approx(frechet_distance(*feature_statistics(features[0]),
                                                           *feature_statistics(features[1])), rel=1e-6)
    assert "swd" not in record and record["kid"] != 0
    forwards.clear()
    assert evaluate.evaluate(checkpoint, **args)[0]["fid"] == pytest.approx(record["fid"], rel=1e-6)
    assert sum(forwards) == 24  # the real features came from the cache


def test_fid_without_weights_says_which_file_and_flag(ema_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(*args, **kwargs):
        raise URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert main(["eval", str(ema_run), *CPU, "--n", "8", "--metrics", "swd,fid"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pt_inception-2015-12-05-6726825d.pth" in err and "--inception" in err
    assert not (ema_run / "eval.jsonl").exists()  # nothing measured, nothing written


@pytest.mark.parametrize("args, message", [
    (["--metrics", "swd,is"], "--metrics takes a comma-separated list of swd, fid, kid"),
    (["--epochs", "7"], "has no checkpoint of epoch 7 (it has epochs 1, 2)"),
    (["--epochs", "one"], "--epochs takes a comma-separated list of epoch numbers"),
    (["--n", "1"], "argument --n: expected at least 2"),
    (["--root", "x", "--data", "y"], "give --root (image files) or --data (a prepared file), not both"),
])
def test_bad_eval_input_is_one_line(ema_run, capsys, args, message):
    assert main(["eval", str(ema_run), *CPU, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_data_file_of_another_size_gets_advice_in_evals_own_flags(ema_run, image_folder, tmp_path, capsys):
    """The run's generator makes 16x16 images; a 32x32 file is refused with advice eval can follow (it has no
    --image-size: the generator decides the size)."""
    other = tmp_path / "faces32.fgd"
    assert main(["prepare", "--root", str(image_folder), "--image-size", "32", "--out", str(other),
                 "--decoder", "pil"]) == 0
    capsys.readouterr()
    assert main(["eval", str(ema_run), *CPU, "--data", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds 32x32 images with 3 channel(s); the model wants 16x16" in err
    assert err.endswith("give --root, or --data with images of the model's size (fastgan prepare --image-size 16 "
                        "--nc 3 makes one)")


def test_a_plain_generator_file_in_a_run_folder_is_measured_against_the_runs_data(ema_run, tmp_path, capsys):
    """run/netG_ema.pth holds weights only, but run/config.json beside it names the data: as for checkpoints."""
    assert main(["eval", str(ema_run / "netG_ema.pth"), *CPU, "--n", "8"]) == 0
    by_file = [ln for ln in capsys.readouterr().err.splitlines() if "netG_ema.pth" in ln]
    assert main(["eval", str(ema_run / "checkpoints" / "epoch002.pt"), *CPU, "--n", "8"]) == 0
    by_checkpoint = [ln for ln in capsys.readouterr().err.splitlines() if "epoch002.pt" in ln]
    # the same generator (the last epoch's average) against the same real images: the same figures
    assert by_file and by_checkpoint and by_file[0].split("│")[4:-2] == by_checkpoint[0].split("│")[4:-2]
    alone = tmp_path / "alone" / "netG_ema.pth"  # the same file outside its run folder: no data to be had
    alone.parent.mkdir()
    alone.write_bytes((ema_run / "netG_ema.pth").read_bytes())
    assert main(["eval", str(alone), *CPU]) == 2
    assert "outside a run folder: say which real images to compare with, --root DIR or --data FILE" in \
        capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), *CPU]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_run_stopped_inside_its_first_epoch_is_measured_at_its_last_checkpoint(image_folder, tmp_path,
                                                                                   monkeypatch, capsys):
    """No epoch has ended: the run folder's last.pt is what there is to measure, labelled where it was taken (epoch 1,
    batch 2 of 3), not "epoch 0", as the folder and as the file; eval.png places it two thirds into epoch 1."""
    import os
    import signal
    import fastgan.trainer
    run, real_step, calls = tmp_path / "stopped", fastgan.trainer.train_step, []

    def step(*args, **kwargs):  # SIGINT during the 2nd step: that step ends, the run stops in epoch 1
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)
    monkeypatch.setattr(fastgan.trainer, "train_step", step)
    assert train("--root", image_folder, "--out", run, "--epochs", 2) == 128 + signal.SIGINT
    monkeypatch.undo()
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["iteration"], saved["step"]) == (0, 2, 2)
    assert not list((run / "checkpoints").glob("epoch*.pt"))
    capsys.readouterr()
    assert main(["eval", str(run), *CPU, "--n", "8"]) == 0
    by_folder = capsys.readouterr().err
    [record] = records(run / "eval.jsonl")
    assert (record["epoch"], record["iteration"], record["step"]) == (1, 2, 2)
    assert record["epochs"] == pytest.approx(2 / 3) and (run / "eval.png").is_file()
    assert main(["eval", str(run / "checkpoints" / "last.pt"), *CPU, "--n", "8"]) == 0
    by_file = capsys.readouterr().err
    rows = [[c.strip() for c in line.split("│")[1:-1]] for text in (by_folder, by_file)
            for line in text.splitlines() if "last.pt" in line and "│" in line]
    assert [row[1] for row in rows] == ["1, batch 2", "1, batch 2"] and rows[0][3:-1] == rows[1][3:-1]
    assert main(["eval", str(run), *CPU, "--epochs", "1"]) == 2
    assert "no epoch has ended yet; leave --epochs out to measure its checkpoints/last.pt" in capsys.readouterr().err
    panels = evaluate.eval_panels([record, {**record, "epoch": 1, "iteration": 0, "epochs": 1.0, "swd": 1.0}])
    assert panels[0][1][0][1:] == ([pytest.approx(2 / 3), 1.0], [record["swd"], 1.0])  # two points, not one


def test_eval_every_records_quality_without_changing_training(image_folder, tmp_path):
    plain, measured = tmp_path / "plain", tmp_path / "measured"
    assert train("--root", image_folder, "--out", plain, "--epochs", 2) == 0
    assert train("--root", image_folder, "--out", measured, "--epochs", 2, "--eval-every", 1,
                 "--eval-images", 16) == 0
    evals = [r for r in records(measured / "metrics.jsonl") if "swd" in r]
    assert [(r["epoch"], r["step"], r["generator"], r["eval_images"]) for r in evals] == [(1, 3, "raw", 16),
                                                                                          (2, 6, "raw", 16)]
    # measuring draws from its own generators: the training, and every random state a checkpoint keeps for an
    # exact resume, are bit for bit the same
    a, b = torch.load(plain / "netG.pth"), torch.load(measured / "netG.pth")
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    rng_a, rng_b = [torch.load(run / "checkpoints" / "last.pt")["rng"] for run in (plain, measured)]
    assert torch.equal(rng_a["torch"], rng_b["torch"]) and torch.equal(rng_a["noise"], rng_b["noise"])
    steps = [r for r in records(measured / "metrics.jsonl") if "loss_d" in r]
    assert [r["loss_d"] for r in steps] == [r["loss_d"] for r in records(plain / "metrics.jsonl")]


def test_eval_every_announces_what_it_measures_and_refuses_what_it_never_would(image_folder, tmp_path, capsys):
    assert train("--root", image_folder, "--out", tmp_path / "run", "--epochs", 1, "--eval-every", 1) == 0
    err = capsys.readouterr().err
    # --eval-images' default is 16,384; the data holds 24, and all 24 are what is compared
    assert "fastgan: every 1 epoch: SWD of 24 images into metrics.jsonl" in err
    assert [r["eval_images"] for r in records(tmp_path / "run" / "metrics.jsonl") if "swd" in r] == [24]
    assert train("--root", image_folder, "--out", tmp_path / "never", "--epochs", 1, "--eval-every", 2) == 2
    assert capsys.readouterr().err.strip() == (
        "fastgan: error: --eval-every 2 measures at epoch 2 and every 2 epochs after, but the run ends at epoch 1: "
        "nothing would be measured; lower --eval-every or raise --epochs")
    assert not (tmp_path / "never").exists()


def test_eval_png_draws_measurements_of_other_sizes_apart_and_says_so(tmp_path):
    records_ = [{"epoch": 1, "generator": "raw", "n": 8, "swd": 5.0}, {"epoch": 2, "generator": "raw", "n": 8, "swd": 4.0},
                {"epoch": 1, "generator": "raw", "n": 16, "swd": 3.0}, {"epoch": 2, "generator": "ema", "n": 16, "swd": 2.0},
                {"epoch": 2, "generator": "raw", "n": 8, "swd": 3.5}]  # the last record of a kind wins
    panels = evaluate.eval_panels(records_)
    assert [title for title, _ in panels] == ["SWD x 1e3 (lower is better)"]
    assert panels[0][1] == [("SWD, 8 images", [1, 2], [5.0, 3.5]), ("SWD, 16 images", [1], [3.0]),
                            ("SWD (EMA), 16 images", [2], [2.0])]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records_))
    assert Image.open(evaluate.plot_eval(tmp_path)).size[0] > 0


def test_the_python_api(ema_run, tmp_path):
    """As docs/python.md writes it."""
    from fastgan.metrics.evaluate import evaluate as evaluate_api
    from fastgan.generate import generate, interpolate
    records = evaluate_api(ema_run, n=8, epochs=[2], device="cpu", workers=1)
    assert [(r["epoch"], r["generator"], r["n"]) for r in records] == [(2, "ema", 8)]
    grid = generate(ema_run / "netG_ema.pth", 4, seed=1, out=tmp_path / "faces.png", device="cpu")
    assert Image.open(grid).size == (2 * 18 + 2, 2 * 18 + 2)
    walk = interpolate(ema_run / "checkpoints" / "last.pt", rows=2, steps=3, seed=3, out=tmp_path / "walk.png",
                       device="cpu")
    assert Image.open(walk).size == (3 * 18 + 2, 2 * 18 + 2) and walk.with_suffix(".gif").exists()
