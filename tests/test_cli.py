"""End to end through the real command line: train, resume, generate, synth, and every user error."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_images
from fastgan.cli import main
from fastgan.models import Discriminator, Generator

CPU = ["--device", "cpu"]  # every test names its device: "auto" would pick a GPU where there is one
TINY = ["--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "8", "--workers", "0",
        "--quiet", "--log-every", "2", "--sample-every", "2", *CPU]


def train(*args):
    return main(["train", *TINY, *map(str, args)])


@pytest.fixture
def trained(image_folder, tmp_path):
    """A finished two-epoch run on 24 images (3 iterations per epoch)."""
    run = tmp_path / "run"
    assert train("--root", image_folder, "--out", run, "--epochs", 2) == 0
    return run


def test_train_writes_the_whole_run_folder(trained):
    run = trained
    assert json.loads((run / "config.json").read_text())["image_size"] == 16
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # a record at every 2nd global step and at each epoch end (3 iterations an epoch): steps 2, 3, 4, 6
    assert [(m["epoch"], m["iteration"], m["step"]) for m in metrics] == [(1, 2, 2), (1, 3, 3), (2, 1, 4), (2, 3, 6)]
    assert all(set(m) >= {"loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2", "images_per_second"} for m in metrics)
    samples = sorted(p.name for p in (run / "samples").iterdir())
    assert samples == ["fake_step0000000.png", "fake_step0000002.png", "fake_step0000003_epoch001.png",
                       "fake_step0000004.png", "fake_step0000006_epoch002.png", "real.png"]
    grid = Image.open(run / "samples" / "fake_step0000006_epoch002.png")
    assert grid.size == (8 * 18 + 2, 8 * 18 + 2)  # 8x8 images of 16 px with 2 px padding
    assert Image.open(run / "samples" / "real.png").size == (8 * 18 + 2, 3 * 18 + 2)  # 24 images, 8 a row
    assert Image.open(run / "loss.png").size == (1000, 500)
    gif = Image.open(run / "progress.gif")
    assert gif.n_frames == 5
    # each frame: its grid, then a caption strip saying which grid it is
    from fastgan.report import CAPTION_PX, frame_caption
    assert gif.size == (grid.width, grid.height + CAPTION_PX)
    gif.seek(4)
    last = np.asarray(gif.convert("RGB"), dtype=np.int64)
    assert np.abs(last[:grid.height] - np.asarray(grid.convert("RGB"), dtype=np.int64)).mean() < 3  # GIF palette
    assert (last[grid.height:] < 128).any()  # some text in the strip
    assert frame_caption(run / "samples" / "fake_step0000006_epoch002.png") == "step 6 · end of epoch 2"
    assert frame_caption(Path("fake_ema_step0001234.png")) == "step 1,234 · EMA"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch001.pt", "epoch002.pt", "last.pt"]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6 and ckpt["loss_history"].shape == (6, 2)
    assert set(ckpt) >= {"netG", "netD", "optimizerG", "optimizerD", "scaler", "rng", "fixed_noise", "config"}
    netG = torch.load(run / "netG.pth", weights_only=True)
    assert list(netG) == list(Generator(8, 4, 3, 16).state_dict())
    torch.testing.assert_close(netG["main.0.weight"], ckpt["netG"]["main.0.weight"])


def test_same_seed_same_weights(image_folder, tmp_path):
    for name in "ab":
        assert train("--root", image_folder, "--out", tmp_path / name, "--epochs", 1) == 0
    a, b = (torch.load(tmp_path / n / "netG.pth", weights_only=True) for n in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_resume_continues_at_the_next_epoch(trained, capsys):
    run = trained
    samples_before = {p.name: p.read_bytes() for p in (run / "samples").iterdir()}
    assert main(["train", "--resume", "auto", "--out", str(run), "--epochs", "3", "--quiet"]) == 0
    assert "resumed from" in capsys.readouterr().err
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 9 and ckpt["loss_history"].shape == (9, 2)
    assert ckpt["config"]["image_size"] == 16  # the model came from the checkpoint, not the defaults
    first = torch.load(run / "checkpoints" / "epoch001.pt", weights_only=True)
    torch.testing.assert_close(ckpt["fixed_noise"], first["fixed_noise"])
    assert (run / "config.resumed-at-6.json").exists()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 3, 4, 6, 8, 9]
    for name, data in samples_before.items():  # nothing of the first session was overwritten
        assert (run / "samples" / name).read_bytes() == data
    assert (run / "samples" / "fake_step0000009_epoch003.png").exists()


def test_resume_of_a_finished_run_says_how_to_continue(trained, capsys):
    assert main(["train", "--resume", str(trained / "checkpoints" / "last.pt")]) == 2
    assert "already trained 2 epochs; pass --epochs larger than 2" in capsys.readouterr().err


def test_resume_from_an_older_epoch_keeps_later_files(trained, capsys):
    code = main(["train", "--resume", str(trained / "checkpoints" / "epoch001.pt"), "--epochs", "3"])
    assert code == 2 and "already holds later checkpoints (epoch002.pt)" in capsys.readouterr().err
    # into a new folder it works, and the old run is untouched
    assert main(["train", "--resume", str(trained / "checkpoints" / "epoch001.pt"), "--epochs", "2",
                 "--out", str(trained.parent / "branch"), "--quiet"]) == 0
    assert (trained.parent / "branch" / "checkpoints" / "epoch002.pt").exists()


@pytest.mark.parametrize("source", ["checkpoints/last.pt", "netG.pth"])
def test_generate_from_a_run(trained, tmp_path, source):
    out = tmp_path / "grid.png"
    assert main(["generate", "--checkpoint", str(trained / source), *CPU, "--n", "10", "--seed", "1",
                 "--out", str(out), "--individual", str(tmp_path / "each")]) == 0
    assert Image.open(out).size == (4 * 18 + 2, 3 * 18 + 2)  # 10 images: 4 a row, 3 rows
    each = sorted((tmp_path / "each").iterdir())
    assert len(each) == 10 and Image.open(each[0]).size == (16, 16)
    grid = np.asarray(Image.open(out))
    for i, path in enumerate(each):  # each file is its grid tile, pixel for pixel (2-pixel padding, 4 a row)
        top, left = 2 + 18 * (i // 4), 2 + 18 * (i % 4)
        assert np.array_equal(np.asarray(Image.open(path)), grid[top:top + 16, left:left + 16]), path.name


def test_generate_never_overwrites(trained, tmp_path, capsys):
    out = tmp_path / "grid.png"
    out.write_bytes(b"the user's picture")
    assert main(["generate", "--checkpoint", str(trained / "netG.pth"), *CPU, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"the user's picture"
    (tmp_path / "each").mkdir()
    (tmp_path / "each" / "00001.png").write_bytes(b"mine")
    assert main(["generate", "--checkpoint", str(trained / "netG.pth"), *CPU, "--out", str(tmp_path / "new.png"),
                 "--individual", str(tmp_path / "each")]) == 2
    assert "already holds 00001.png" in capsys.readouterr().err
    assert not (tmp_path / "new.png").exists()


def test_generate_is_deterministic_per_seed(trained, tmp_path):
    grids = {}
    for name, seed in (("a.png", 3), ("b.png", 3), ("c.png", 4)):
        assert main(["generate", "--checkpoint", str(trained / "netG.pth"), *CPU, "--seed", str(seed),
                     "--out", str(tmp_path / name)]) == 0
        grids[name] = np.asarray(Image.open(tmp_path / name))
    assert np.array_equal(grids["a.png"], grids["b.png"])  # one seed, the same images
    assert not np.array_equal(grids["a.png"], grids["c.png"])  # another seed, other noise


def test_bad_files_are_skipped_and_listed(image_folder, tmp_path, capsys):
    faces = image_folder / "faces"
    (faces / "empty.jpg").write_bytes(b"")
    good = (faces / "0000.jpg").read_bytes()
    (faces / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (faces / "notes.jpg").write_text("not an image")
    (faces / "README.txt").write_text("ignored: not an image extension")
    run = tmp_path / "run"
    assert train("--root", image_folder, "--out", run, "--epochs", 1) == 0
    assert "skipped 3 of 27 files that cannot be decoded" in capsys.readouterr().err
    listed = (run / "skipped_files.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[1] for line in listed) == ["empty.jpg", "notes.jpg",
                                                                              "truncated.jpg"]


def test_dry_run_prints_the_plan_on_stdout_and_writes_nothing(image_folder, tmp_path, capsys):
    from fastgan.data import loader_threads
    run = tmp_path / "run"
    no_workers = [a for a in TINY if a not in ("--workers", "0")]  # the loader's own default
    assert main(["train", *no_workers, "--root", str(image_folder), "--out", str(run), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    plan = json.loads(out)  # stdout holds the plan alone: `fastgan train --dry-run > plan.json`
    assert plan["image_size"] == 16 and plan["batch_size"] == 8  # the run's options, not the trial's 4 images
    workers = loader_threads()  # what the run would start on this machine
    assert plan["resolved"]["loader"] == f"loader torch ({workers} worker{'s' if workers != 1 else ''})"
    assert plan["resolved"]["precision"] == "fp32" and plan["resolved"]["device"] == "cpu"
    sizes = {"generator": Generator(8, 4, 3, 16), "discriminator": Discriminator(4, 3, 16)}  # TINY's shapes
    assert plan["resolved"]["parameters"] == {k: sum(p.numel() for p in m.parameters()) for k, m in sizes.items()}
    assert "dry run: 2 steps on 4 images OK" in err and "{" not in err
    assert not run.exists()
    assert train("--root", image_folder, "--out", run, "--dry-run") == 0  # TINY: --workers 0
    assert json.loads(capsys.readouterr().out)["resolved"]["loader"] == "loader torch (0 workers)"


def test_flat_folder_and_grayscale_model(tmp_path):
    write_images(tmp_path / "flat", 16, ext=".PNG")
    assert train("--root", tmp_path / "flat", "--out", tmp_path / "run", "--nc", "1", "--epochs", 1) == 0
    assert torch.load(tmp_path / "run" / "netG.pth", weights_only=True)["main.6.weight"].shape[1] == 1


def test_demo_preset_without_root(monkeypatch, capsys):
    from fastgan.cli import build_parser, config_from_args
    cfg = config_from_args(build_parser().parse_args(["train", "--epochs", "1"]))
    assert (cfg.root, cfg.image_size, cfg.ngf, cfg.epochs) == (None, 32, 32, 1)
    cfg = config_from_args(build_parser().parse_args(["train", "--root", "x"]))
    assert (cfg.image_size, cfg.ngf, cfg.batch_size, cfg.epochs) == (64, 64, 128, 5)  # the tutorial's


def test_a_resume_with_another_loader_leaves_out_the_run_s_own_options_it_does_not_use():
    """The run's own --data-memory and DALI options come from its checkpoint, not from the user: a resume with
    a loader that does not use them leaves them out; those the loader uses stay, and those given are refused."""
    from fastgan import Config, FastganError
    from fastgan.cli import build_parser, config_from_args

    def resumed(run: Config, *flags: str) -> Config:
        args = build_parser().parse_args(["train", "--resume", "auto", "--out", "r", *flags])
        return config_from_args(args, {"config": run.to_dict()}).validate(flags=True)
    dali = Config(loader="dali", dali_decoder="cpu", dali_threads=3, hw_decoder_load=0.5, epochs=2)
    dali_options = ("dali_decoder", "dali_threads", "hw_decoder_load")
    cfg = resumed(dali, "--loader", "torch")
    assert (cfg.loader, cfg.epochs) == ("torch", 2)
    assert [getattr(cfg, f) for f in dali_options] == ["auto", None, 0.65]
    cfg = resumed(dali, "--loader", "cache")  # the cache decodes with DALI as the run did
    assert [getattr(cfg, f) for f in dali_options] == ["cpu", 3, 0.5]
    cached = Config(data_memory="host", dali_threads=3)
    cfg = resumed(cached, "--loader", "dali")
    assert (cfg.data_memory, cfg.dali_threads) == ("auto", 3)
    cfg = resumed(cached, "--loader", "torch")
    assert (cfg.data_memory, cfg.dali_threads) == ("auto", None)
    with pytest.raises(FastganError, match="^--dali-threads sets how DALI decodes, but --loader torch decodes "):
        resumed(dali, "--loader", "torch", "--dali-threads", "2")
    with pytest.raises(FastganError, match="^--data-memory works with --data"):
        resumed(dali, "--loader", "torch", "--data-memory", "host")


def small_demo(monkeypatch, n=16):
    """The demo preset with n demo faces instead of 4096 (drawn in the tests' private cache)."""
    from fastgan import Config
    demo = Config.demo.__func__
    monkeypatch.setattr(Config, "demo", classmethod(lambda cls, **kw: demo(cls, **{"demo_images": n, **kw})))


def test_a_file_of_the_demo_faces_trains_with_the_demo_preset(image_folder, tmp_path, monkeypatch, capsys):
    from fastgan import Config
    from fastgan.cli import build_parser, config_from_args
    from fastgan.data.prepared import read_manifest
    small_demo(monkeypatch)
    demo_file, own_file = tmp_path / "demo.fgd", tmp_path / "own.fgd"
    assert main(["prepare", "--out", str(demo_file), "--decoder", "pil", "--workers", "1"]) == 0
    assert read_manifest(demo_file)[0]["image_size"] == Config.demo().image_size == 32  # the size the demo trains
    assert main(["prepare", "--root", str(image_folder), "--image-size", "16", "--out", str(own_file),
                 "--decoder", "pil", "--workers", "1"]) == 0
    preset = ("image_size", "ngf", "ndf", "batch_size", "epochs", "log_every", "sample_every")
    demo, tutorial = Config.demo(), Config()
    cfg = config_from_args(build_parser().parse_args(["train", "--data", str(demo_file)]))
    assert [getattr(cfg, f) for f in preset] == [getattr(demo, f) for f in preset]
    cfg = config_from_args(build_parser().parse_args(["train", "--data", str(demo_file), "--ngf", "8"]))
    assert (cfg.ngf, cfg.ndf) == (8, demo.ndf)  # flags still override
    # any other file: the tutorial's preset, with the file's image size
    cfg = config_from_args(build_parser().parse_args(["train", "--data", str(own_file)]))
    assert [getattr(cfg, f) for f in preset] == [16] + [getattr(tutorial, f) for f in preset[1:]]


def test_demo_folders_are_recognised_in_old_files_too(tmp_path):
    from fastgan.data.demo import demo_folder, is_demo_folder
    assert is_demo_folder(demo_folder(4096)) and is_demo_folder(str(demo_folder(64)))
    # a file prepared by an older fastgan, elsewhere, from the v1 demo at its default size
    assert is_demo_folder("/home/someone/.cache/fastgan/demo-faces-v1-n4096")
    assert not is_demo_folder(tmp_path / "demo-faces-v1-n4096")  # a user's folder of that name, outside a cache
    assert not is_demo_folder("/home/someone/.cache/fastgan/demo-faces-v1-n4096.tmp123")
    assert not is_demo_folder("/data/celeba")


def test_prepare_says_one_line_with_no_blank_lines_before_it(image_folder, tmp_path, capsys):
    out = tmp_path / "a.fgd"
    assert main(["prepare", "--root", str(image_folder), "--image-size", "16", "--out", str(out),
                 "--decoder", "pil", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("fastgan: 24 images under ") and err.count("\n") == 1, repr(err)
    assert main(["prepare", "--root", str(image_folder), "--image-size", "16", "--out", str(out),
                 "--decoder", "pil", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastgan: error: {out} already exists") and err.count("\n") == 1, repr(err)


def test_without_a_terminal_the_progress_is_whole_log_lines(image_folder, tmp_path, capsys):
    """stderr to a file or pipe (here pytest's capture): one whole line per log interval, no bar's last frame
    cut to 80 columns."""
    no_quiet = [a for a in TINY if a != "--quiet"]
    assert main(["train", *no_quiet, "--root", str(image_folder), "--out", str(tmp_path / "run"),
                 "--epochs", "2"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "Loss_D" in line]
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(metrics) >= 2, lines  # one line per record of metrics.jsonl
    assert all(line.endswith(" img/s") and "\u2026" not in line for line in lines), lines  # whole, not cut


def help_texts():
    """(subcommand, its parser) for every subcommand, and the top-level parser."""
    from fastgan.cli import build_parser
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [("", parser), *subparsers.choices.items()]


@pytest.mark.parametrize("command", ["", "train", "generate", "synth", "prepare", "eval"])
def test_help_gives_each_option_one_default_and_a_reason(command, capsys):
    from fastgan import Config
    assert main([*([command] if command else []), "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default:" not in text and "default: None" not in text, text  # argparse's, doubled or empty
    parser = dict(help_texts())[command]
    defaults, demo = Config(), Config.demo()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"fastgan {command} {name} has no help"
        # one default at most (a "[" after a word is an extra's name: fastgan[dali])
        assert len(re.findall(r"(?<!\w)\[", action.help)) <= 1, f"fastgan {command} {name}: {action.help}"
        given = action.default not in (None, False, argparse.SUPPRESS) and action.dest != "help"
        if given:  # a default argparse fills in is in the help, as [value]
            assert f"[{action.default}" in action.help, f"fastgan {command} {name}: {action.help}"
        if command == "train" and hasattr(defaults, action.dest):
            value = getattr(defaults, action.dest)
            if value is not None and not isinstance(value, bool):  # train's defaults come from the presets
                assert f"[{value}" in action.help, f"fastgan train {name}: {action.help}"
            if getattr(demo, action.dest) != value:  # where the demo preset changes it, the help says so
                assert re.search(rf"; demo {getattr(demo, action.dest)}[];]", action.help), \
                    f"fastgan train {name}: {action.help}"


def test_generate_names_the_folder_with_one_slash(trained, tmp_path, capsys):
    each = tmp_path / "each"
    assert main(["generate", "--checkpoint", str(trained / "netG.pth"), *CPU, "--n", "2",
                 "--out", str(tmp_path / "grid.png"), "--individual", f"{each}{os.sep}"]) == 0
    err = capsys.readouterr().err
    assert f"one PNG each to {each}{os.sep}\n" in err and f"{os.sep}{os.sep}" not in err, err


# ---- each user error: one line on stderr, exit 2 --------------------------------------------------------

def error_cases(tmp_path, image_folder, trained_run):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "a.txt").write_text("x")
    (tmp_path / "all_bad").mkdir()
    (tmp_path / "all_bad" / "a.jpg").write_bytes(b"garbage")
    (tmp_path / "a_file").write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((trained_run / "netG.pth").read_bytes()[:3000])
    pickled = tmp_path / "pickled.pt"
    torch.save({"netG": Generator(8, 4, 3, 16).state_dict(), "extra": argparse.Namespace(payload="arbitrary code")}, pickled)
    disc = tmp_path / "netD.pth"
    torch.save(torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)["netD"], disc)
    root = str(image_folder)
    last = str(trained_run / "checkpoints" / "last.pt")
    mid_epoch = tmp_path / "mid_epoch.pt"  # as --ckpt-every writes them: 1 batch into epoch 3
    torch.save({**torch.load(last, weights_only=True), "iteration": 1, "step": 7}, mid_epoch)
    tiny_root = [*TINY, "--root", root]
    return [
        # flags: argparse reads the types, Config.validate alone checks the values and names the flag typed
        (["train", *tiny_root, "--batch-size", "0"], "error: --batch-size must be a positive integer, got 0"),
        (["train", *tiny_root, "--batch-size", "-8"], "error: --batch-size must be a positive integer, got -8"),
        (["train", *tiny_root, "--epochs", "0"], "error: --epochs must be a positive integer, got 0"),
        (["train", *tiny_root, "--ngf", "x"], "argument --ngf: invalid int value: 'x'"),
        (["train", *tiny_root, "--ckpt-every", "-1"], "error: --ckpt-every must be 0 (epoch ends only) or a positive"),
        (["train", *tiny_root, "--loader", "opencv"], "error: --loader must be one of auto, cache, dali, torch, got 'opencv'"),
        (["train", *tiny_root, "--amp", "fp8"], "error: --amp must be one of off, auto, fp16, bf16, got 'fp8'"),
        (["train", *tiny_root, "--device", "tpu"], "error: --device must be one of auto, cpu, cuda, got 'tpu'"),
        (["train", *tiny_root, "--nc", "2"], "error: --nc must be 1 (grayscale) or 3 (RGB), got 2"),
        (["train", *tiny_root, "--image-size", "sixty-four"], "argument --image-size: invalid int value"),
        (["train", *tiny_root, "--workers", "-1"], "error: --workers must be 0 or more, got -1"),
        (["train", *tiny_root, "--dali-threads", "0"], "error: --dali-threads must be a positive integer, got 0"),
        (["train", *tiny_root, "--beta1", "1"], "error: --beta1 must be in [0, 1), got 1.0"),
        (["train", *tiny_root, "--lr", "0"], "error: --lr must be in (0, 1), got 0.0"),
        (["train", *tiny_root, "--hw-decoder-load", "1.5"], "error: --hw-decoder-load must be in [0, 1], got 1.5"),
        (["train", *tiny_root, "--loader", "torch", "--dali-threads", "2"],
         "error: --dali-threads sets how DALI decodes, but --loader torch decodes with PIL: leave it out"),
        (["prepare", "--root", root, "--nc", "2", "--out", str(tmp_path / "p.fgd")],
         "error: --nc must be 1 (grayscale) or 3 (RGB), got 2"),
        (["train", *tiny_root, "--frobnicate"],
         "fastgan train: error: unrecognized arguments: --frobnicate (see fastgan train --help)"),
        (["generate", "--checkpoint", "x.pt", "--frobnicate", "1"],
         "fastgan generate: error: unrecognized arguments: --frobnicate 1 (see fastgan generate --help)"),
        (["prepare", "--root", root, "--image-size", "20", "--out", str(tmp_path / "p.fgd")],
         "error: --image-size must be a power of two from 16 to 256"),
        (["synth", str(tmp_path / "faces"), "--seed", "-1"], "argument --seed: must be an integer from 0 to 4294967295"),
        (["train", *tiny_root, "--seed", "-1"], "error: --seed must be an integer from 0 to 4294967295, got -1"),
        (["train", *tiny_root, "--mirror"], "--mirror works with --data"),
        (["train", *tiny_root, "--data", str(tmp_path / "missing.fgd")], "does not exist"),
        (["train", *tiny_root, "--sync-bn"], "--sync-bn synchronises BatchNorm across torchrun's processes"),
        (["train", *tiny_root, "--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA device"),
        (["train", *tiny_root, "--image-size", "20"], "error: --image-size must be a power of two from 16 to 256"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["train", *CPU, "--resume", last, "--ngf", "8"],
         "does not match the model: it was trained with ngf=4 (asked 8)"),
        (["train", *CPU, "--resume", last, "--seed", "1", "--epochs", "3"], "which decides its data order"),
        (["train", *CPU, "--resume", str(mid_epoch), "--batch-size", "4", "--epochs", "3",
          "--out", str(tmp_path / "elsewhere")], "stopped inside an epoch at batch size 8"),
        # data and files
        (["train", *CPU, "--root", str(tmp_path / "missing")], "does not exist"),
        (["train", *CPU, "--root", str(tmp_path / "a_file")], "is not a folder"),
        (["train", *CPU, "--root", str(tmp_path / "empty")], "holds no image files"),
        (["train", *CPU, "--root", str(tmp_path / "no_images")], "holds no image files"),
        (["train", *CPU, "--root", str(tmp_path / "all_bad")], "none of its 1 image files can be decoded"),
        (["train", *CPU, "--root", root, "--image-size", "48"], "power of two from 16 to 256"),
        (["train", *CPU, "--root", root, "--image-size", "512"], "power of two from 16 to 256"),
        (["train", *TINY, "--root", root, "--batch-size", "25"], "batch size 25 is larger than the 24 usable"),
        (["train", *TINY, "--root", root, "--out", str(tmp_path / "a_file" / "run")], "is not writable"),
        (["train", *TINY, "--root", root, "--out", str(full)], "already holds files"),
        (["train", *TINY, "--root", root, "--lr", "-1"], "error: --lr must be in (0, 1)"),
        (["train", *CPU, "--resume", last, "--image-size", "32"], "does not match the model"),
        (["train", *CPU, "--resume", str(truncated)], "corrupt or truncated"),
        (["train", *CPU, "--resume", str(pickled)], "pickled Python objects"),
        (["train", *CPU, "--resume", "auto"], "--resume auto needs --out"),
        (["train", *CPU, "--resume", "auto", "--out", str(tmp_path / "empty")], "no checkpoint to resume"),
        (["train", *CPU, "--resume", str(trained_run / "netG.pth")], "not a fastgan training checkpoint"),
        (["generate", *CPU, "--checkpoint", str(tmp_path / "missing.pt")], "does not exist"),
        # a folder where a file is expected: what it is and the way forward, not "does not exist"
        (["train", *CPU, "--resume", str(trained_run), "--epochs", "3"],
         f"--resume {trained_run} is a run folder, not a checkpoint file; continue the run with --out {trained_run} "
         f"--resume auto, or give the checkpoint: --resume {last}"),
        (["train", *CPU, "--resume", str(trained_run / "checkpoints")],
         f"is a run's checkpoints folder, not a checkpoint file; continue the run with --out {trained_run} --resume"),
        (["train", *CPU, "--resume", str(tmp_path / "empty")],
         f"--resume {tmp_path / 'empty'} is a folder without checkpoints/last.pt, not a run to continue"),
        (["train", *tiny_root, "--data", root], f"--data {root} is a folder, not a prepared data file; for a folder "
         f"of images give --root {root}, or make a file of it with fastgan prepare --root {root} --out FILE"),
        (["eval", *CPU, str(trained_run), "--data", root], f"--data {root} is a folder, not a prepared data file"),
        (["generate", *CPU, "--checkpoint", str(truncated)], "corrupt or truncated"),
        (["generate", *CPU, "--checkpoint", str(pickled)], "pickled Python objects"),
        (["generate", *CPU, "--checkpoint", str(disc)], "discriminator weights"),
        (["generate", *CPU, "--checkpoint", last, "--out", str(tmp_path / "grid.txt")], "needs an image extension"),
        (["train", *TINY, "--root", root, "--device", "cuda"], "no CUDA GPU") if not torch.cuda.is_available()
        else (["train", *CPU, "--root", root, "--image-size", "8"], "power of two"),
    ]


def test_every_user_error_is_one_line_and_exit_2(tmp_path, image_folder, trained, capsys):
    for argv, message in error_cases(tmp_path, image_folder, trained):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert err.startswith(("fastgan: error: ", f"fastgan {argv[0]}: error: ")), (argv, err)
        assert message in err, (argv, err)
        assert len(err.splitlines()) == 1, err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"  # a refused --out is left as it was


def test_a_real_process_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastgan", "train", *CPU, "--root", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"fastgan: error: --root {tmp_path / 'missing'} does not exist"
    assert "Traceback" not in result.stderr


def test_a_torchvision_of_another_build_gets_one_line_and_help_and_version_need_none(tmp_path):
    """A CPU torch with a torchvision from another index fails on `import torchvision` (its operators are missing):
    --help and --version still work, every other command says so in one line with the versions and the install."""
    from importlib import metadata
    site = tmp_path / "site"  # a torchvision 0.30.0 that fails to import as a mismatched build does
    (site / "torchvision").mkdir(parents=True)
    (site / "torchvision" / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    (site / "torchvision-0.30.0.dist-info").mkdir()
    (site / "torchvision-0.30.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\n"
                                                                    "Version: 0.30.0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}

    def fastgan(*argv):
        return subprocess.run([sys.executable, "-m", "fastgan", *argv], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)
    for argv in (["--version"], ["--help"], ["train", "--help"], ["eval", "--help"], ["generate", "--help"]):
        result = fastgan(*argv)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (argv, result.stderr)
    assert fastgan("--version").stdout.startswith("fastgan ")
    build = torch.__version__.partition("+")[2]
    wanted = f"0.{int(torch.__version__.split('.')[1]) + 15}.*"
    line = (f"fastgan: error: torchvision 0.30.0 does not load with torch {torch.__version__} (operator "
            "torchvision::nms does not exist): the two come from different builds; install the torchvision built "
            f'for this torch: pip install --force-reinstall --no-deps "torchvision=={wanted}"'
            + (f" --index-url https://download.pytorch.org/whl/{build}" if build else "") + "\n")
    for argv in (["train", "--dry-run", "--device", "cpu"], ["cache", "list", "--cache-dir", str(tmp_path)]):
        result = fastgan(*argv)
        assert (result.returncode, result.stderr) == (2, line), argv
    # the pairing rule, against published pairs and this machine's own
    from fastgan.install import matching_torchvision
    assert [matching_torchvision(v) for v in ("2.4.1", "2.9.1", "2.14.1+cpu", "1.13.1")] == \
        ["0.19.*", "0.24.*", "0.29.*", ""]
    assert re.fullmatch(matching_torchvision(torch.__version__).replace(".*", r"\.\d+.*"),
                        metadata.version("torchvision"))


def test_argparse_errors_exit_2_and_help_exits_0(capsys):
    assert main(["train", "--batch-size", "x"]) == 2
    assert capsys.readouterr().err == ("fastgan train: error: argument --batch-size: invalid int value: 'x' "
                                       "(see fastgan train --help)\n")
    assert main(["train", "--help"]) == 0
    assert "--ckpt-every" in capsys.readouterr().out


def test_train_with_amp_and_channels_last(image_folder, tmp_path, capsys, monkeypatch):
    import fastgan.cpu
    monkeypatch.setattr(fastgan.cpu, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16"})
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert train("--root", image_folder, "--out", tmp_path / "run", "--epochs", 1, "--amp", "--channels-last") == 0
    assert "precision bf16" in capsys.readouterr().err  # --amp alone on a CPU with bf16 instructions
    assert (tmp_path / "run" / "netG.pth").exists()


@pytest.mark.parametrize("amp, precision", [([], "fp32"), (["bf16"], "bf16")])
def test_amp_on_a_cpu_without_bf16_instructions_is_fp32_unless_bf16_is_asked_for(image_folder, tmp_path, capsys,
                                                                                  monkeypatch, amp, precision):
    """--amp alone where bf16 would be emulated (slower than fp32) plans fp32 and says why; --amp bf16 is obeyed
    with the same note."""
    import fastgan.cpu
    monkeypatch.setattr(fastgan.cpu, "cpu_flags", lambda: {"avx2", "fma"})
    assert train("--root", image_folder, "--out", tmp_path / "run", "--amp", *amp, "--dry-run") == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["resolved"]["precision"] == precision
    assert "fastgan: note:" in err and "bf16" in err


def test_amp_fp16_on_the_cpu_is_obeyed_with_a_note_that_it_is_slow_there(image_folder, tmp_path, capsys):
    """--help calls fp16 autocast poor on the CPU: a run that asks for it gets it (fp16, with its GradScaler) and one
    line that says so at the start; --amp off gets no such line."""
    assert train("--root", image_folder, "--out", tmp_path / "fp16", "--epochs", 1, "--amp", "fp16") == 0
    err = capsys.readouterr().err
    assert err.count("fastgan: note: fp16 autocast is slow on the CPU, several times slower than fp32 (--amp off); "
                     "training in fp16 as --amp fp16 asks\n") == 1 and "precision fp16" in err
    assert torch.load(tmp_path / "fp16" / "checkpoints" / "last.pt", weights_only=True)["scaler"]["scale"] > 0
    assert train("--root", image_folder, "--out", tmp_path / "fp32", "--epochs", 1) == 0
    assert "fp16 autocast" not in capsys.readouterr().err


def test_synth_writes_faces_and_keeps_existing_files(tmp_path, capsys):
    out = tmp_path / "faces"
    assert main(["synth", str(out), "--n", "5", "--seed", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"00000{i}.jpg" for i in range(1, 6)]
    assert Image.open(out / "000001.jpg").size == (178, 218)
    before = (out / "000001.jpg").read_bytes()
    assert main(["synth", str(out), "--n", "3", "--seed", "3"]) == 2
    assert "already holds 000001.jpg" in capsys.readouterr().err
    assert (out / "000001.jpg").read_bytes() == before


def test_python_api_returns_the_run_folder(image_folder, tmp_path):
    from fastgan import Config, FastganError, train as train_api
    cfg = Config(root=str(image_folder), out=str(tmp_path / "api"), image_size=16, ngf=4, ndf=4, nz=8,
                 batch_size=8, epochs=1, workers=0, quiet=True, device="cpu")
    run = train_api(cfg)
    assert run == tmp_path / "api" and (run / "netG.pth").exists()
    # the Python API's errors name the field, and the flag beside it
    with pytest.raises(FastganError, match=r"^nc \(--nc\) must be 1"):
        train_api(Config(root=str(image_folder), nc=2, device="cpu"))
    with pytest.raises(FastganError, match=r"^hw_decoder_load \(--hw-decoder-load\) must be in \[0, 1\], got 2"):
        train_api(Config(root=str(image_folder), hw_decoder_load=2, device="cpu"))


@pytest.mark.parametrize("field, bad", [
    ("batch_size", 0), ("epochs", -1), ("nz", 0), ("demo_images", 0), ("ckpt_every", -1), ("workers", -1),
    ("dali_threads", 0), ("nc", 2), ("image_size", 48), ("lr", 1.5), ("beta1", -0.5), ("hw_decoder_load", 2.0),
    ("loader", "opencv"), ("dali_decoder", "gpu"), ("amp", "fp8"), ("device", "tpu"), ("ema_kimg", 0.0)])
def test_one_rule_for_the_command_line_and_the_python_api(image_folder, field, bad, capsys):
    """Each training option is checked in one place, Config.validate: the flag and the field are refused with
    the same words (the flag's name alone on the command line, the field's and the flag's from Python)."""
    from fastgan import Config, FastganError
    from fastgan.config import flag_of
    flag = flag_of(field)
    with pytest.raises(FastganError) as refused:
        Config(root=str(image_folder), **{field: bad}).validate()
    api = str(refused.value)
    assert api.startswith(f"{field} ({flag}) ")
    assert main(["train", *CPU, "--root", str(image_folder), flag, str(bad)]) == 2
    assert capsys.readouterr().err == "fastgan: error: " + api.replace(f"{field} ({flag})", flag) + "\n"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("flags", [[], ["--amp"], ["--amp", "bf16", "--channels-last"], ["--compile"]])
def test_train_on_cuda(image_folder, tmp_path, capsys, flags):
    assert train("--root", image_folder, "--out", tmp_path / "run", "--epochs", 2, "--device", "cuda",
                 "--workers", "2", *flags) == 0
    err = capsys.readouterr().err
    assert "device cuda" in err
    if flags[:1] == ["--amp"]:
        assert ("precision fp16" if len(flags) == 1 else "precision bf16") in err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([m["loss_d"], m["loss_g"]])).all() for m in metrics)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    if flags == ["--amp"]:  # fp16 keeps its GradScaler's state for resuming
        assert ckpt["scaler"]["scale"] > 0
    else:
        assert ckpt["scaler"] == {}


def test_loader_dali_without_dali_says_how_to_install(image_folder, monkeypatch, capsys):
    import fastgan.pipeline_dali
    monkeypatch.setattr(fastgan.pipeline_dali, "dali_available", lambda: False)
    assert main(["train", *CPU, "--root", str(image_folder), "--loader", "dali"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastgan: error: --loader dali needs NVIDIA DALI, which is not installed: "
                          'pip install "fastgan[dali]"') and len(err.splitlines()) == 1


def test_auto_loader_choice(monkeypatch):
    """--loader auto (and cache) decodes once into the cache: with DALI on the GPU where CUDA and DALI are there,
    with PIL otherwise; where the cache has no room, auto decodes every epoch with per_epoch_loader's choice."""
    import fastgan.pipeline_dali
    from fastgan import Config, FastganError
    from fastgan.data import per_epoch_loader, resolve_loader
    cpu = torch.device("cpu")
    for installed in (False, True):
        monkeypatch.setattr(fastgan.pipeline_dali, "dali_available", lambda: installed)
        assert resolve_loader(Config(device="cpu"), cpu) == ("cache", "pil")  # no DALI by default on the CPU
        assert resolve_loader(Config(device="cpu", loader="cache"), cpu) == ("cache", "pil")
        assert per_epoch_loader(Config(device="cpu"), cpu) == ("torch", "")
    assert resolve_loader(Config(loader="torch", device="cpu"), cpu) == ("torch", "")
    assert resolve_loader(Config(loader="dali", device="cpu"), cpu) == ("dali", "cpu")
    assert resolve_loader(Config(loader="dali", dali_decoder="cpu", device="cpu"), cpu) == ("dali", "cpu")
    # a --dali-decoder given is DALI's decoder for the cache too (and where auto decodes every epoch), or refused
    monkeypatch.setattr(fastgan.pipeline_dali, "dali_available", lambda: True)
    assert resolve_loader(Config(device="cpu", dali_decoder="cpu"), cpu) == ("cache", "cpu")
    assert per_epoch_loader(Config(device="cpu", dali_decoder="cpu"), cpu) == ("dali", "cpu")
    with pytest.raises(FastganError, match="--dali-decoder mixed decodes on the GPU and needs --device cuda"):
        resolve_loader(Config(device="cpu", loader="cache", dali_decoder="mixed"), cpu)
    monkeypatch.setattr(fastgan.pipeline_dali, "dali_available", lambda: False)
    with pytest.raises(FastganError, match="^--dali-decoder cpu needs NVIDIA DALI, which is not installed"):
        resolve_loader(Config(device="cpu", dali_decoder="cpu"), cpu)
    with pytest.raises(FastganError, match=r"^hw_decoder_load \(--hw-decoder-load\) sets how DALI decodes, but "
                                           r"data \(--data\) is decoded already: leave it out$"):
        Config(data="faces.fgd", hw_decoder_load=0.5).validate()
    # on CUDA, DALI (decoding on the GPU) where it is installed, PIL or torch where not; a CUDA device object
    # needs no GPU to be built, so this choice is checked on every machine
    cuda = torch.device("cuda")
    for installed, cached, every_epoch in ((True, "mixed", ("dali", "mixed")), (False, "pil", ("torch", ""))):
        monkeypatch.setattr(fastgan.pipeline_dali, "dali_available", lambda: installed)
        assert resolve_loader(Config(device="cuda"), cuda) == ("cache", cached), installed
        assert per_epoch_loader(Config(device="cuda"), cuda) == every_epoch, installed


def test_help_and_a_missing_command_list_every_command(capsys):
    assert main(["--help"]) == 0
    assert "{train,generate,eval,prepare,cache,synth}" in capsys.readouterr().out
    assert main([]) == 2
    assert capsys.readouterr().err.strip() == ("fastgan: error: the following arguments are required: "
                                               "{train,generate,eval,prepare,cache,synth} (see fastgan --help)")


def test_compile_on_the_cpu_does_not_print_torchs_no_cuda_runtime_warning():
    """torch.utils.cpp_extension warns at import on a machine with a CUDA torch and the CUDA toolkit but no GPU
    (such as CI's); --compile on the CPU imports it through fastgan.trainer, which holds the warning back."""
    plain = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension"], capture_output=True,
                           text=True, timeout=120)
    if "No CUDA runtime is found" not in plain.stderr:
        pytest.skip("torch does not warn on this machine (no CUDA toolkit, or a GPU, or a CPU build of torch)")
    quiet = subprocess.run([sys.executable, "-c", "from fastgan.trainer import import_cpp_extension_quietly; "
                            "import_cpp_extension_quietly(); import torch.utils.cpp_extension"],
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and "No CUDA runtime is found" not in quiet.stderr, quiet.stderr


def test_the_docs_options_table_is_the_one_the_declarations_make():
    """Each option is declared once (fastgan/config.py); docs/options.md's table is made from that, not typed."""
    from fastgan.config import options_table
    page = (Path(__file__).resolve().parents[1] / "docs" / "options.md").read_text()
    start = page.index("<!-- options-table")
    table = page[page.index("\n", start) + 1:page.index("<!-- /options-table -->")].strip()
    assert table == options_table(), ("docs/options.md's options table is not the declarations': paste the output of "
                                      "python -c 'from fastgan.config import options_table; print(options_table())'")


def test_every_train_flag_is_a_declared_option_and_every_option_a_flag():
    from fastgan.config import Config, flag_of, options
    parser = dict(help_texts())["train"]
    flags = {s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}
    assert flags == {flag_of(f.name) for f in options("train")} == {flag_of(name) for name in Config.__dataclass_fields__}
