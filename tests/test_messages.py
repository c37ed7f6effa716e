"""What the user sees: a step-0 grid that shows the untrained generator, broken checkpoints named for what they
are, and the run folder the Python API returns. (The single Ctrl-C notice is tested with the other stops, in
tests/test_resume.py.)"""
import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import write_images

from fastgan import Config
from fastgan import train as train_api
from fastgan.cli import main
from fastgan.data.files import index_images
from fastgan.data.prepared import prepare
from fastgan.sampling import sample
from fastgan.models import Generator, init_weights

TINY = ["--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "8", "--workers", "0",
        "--quiet", "--log-every", "2", "--sample-every", "2", "--device", "cpu"]

# ---- the first sample grid ---------------------------------------------------------------------------------

def untrained_generator(nz=8, ngf=4, image_size=16) -> Generator:
    torch.manual_seed(999)
    return Generator(nz, ngf, 3, image_size).apply(init_weights)


def tile_std(grid_png, image_size: int) -> float:
    """The mean over the grid's tiles of the pixel standard deviation inside each tile (0-255 levels), padding
    left out: 0 for a flat grid whatever the padding."""
    pixels = np.asarray(Image.open(grid_png).convert("RGB"), dtype=np.float64)
    step = image_size + 2  # image_grid's 2-pixel padding
    tiles = [pixels[2 + r * step: 2 + r * step + image_size, 2 + c * step: 2 + c * step + image_size]
             for r in range(8) for c in range(8)]
    return float(np.mean([tile.std() for tile in tiles]))


@pytest.mark.parametrize("image_size,ngf,nz", [(16, 4, 8), (64, 64, 100)])
def test_batch_statistics_sample_is_training_mode_output_and_leaves_g_alone(image_size, ngf, nz):
    netG = untrained_generator(nz, ngf, image_size)
    noise = torch.randn(64, nz, 1, 1, generator=torch.Generator().manual_seed(999))
    before = {k: v.clone() for k, v in netG.state_dict().items()}
    images = sample(netG, noise, batch_statistics=True)
    after = netG.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics and counts untouched
    assert netG.training  # the mode it was in
    reference = Generator(nz, ngf, 3, image_size)
    reference.load_state_dict(before)
    with torch.no_grad():
        # later samples: BatchNorm on its running statistics, as before
        torch.testing.assert_close(sample(netG, noise), reference.eval()(noise), rtol=0, atol=0)
        # the tutorial's netG(fixed_noise) in training mode (which moves the copy's running statistics)
        torch.testing.assert_close(images, reference.train()(noise), rtol=0, atol=0)


def test_the_step_0_grid_shows_the_untrained_generator_not_flat_grey(image_folder, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--root", str(image_folder), "--out", str(run), "--epochs", "1"]) == 0
    first = tile_std(run / "samples" / "fake_step0000000.png", 16)
    # Measured on this config (16x16, ngf 4, nz 8, seed 999): 6.1 levels with batch statistics; 0.50 for the flat
    # grey grid that BatchNorm's initial running statistics gave (rounding noise around 128). 2 levels sits well
    # between them, with 3x margin below the measured value.
    assert first > 2.0, first
    assert tile_std(run / "samples" / "fake_step0000002.png", 16) > 0  # later grids: drawn, in eval mode


# ---- the progress bar ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("width", [60, 80, 100])
def test_the_progress_bar_keeps_its_count_speed_and_times_whole_in_a_narrow_terminal(monkeypatch, width):
    """In 80 columns the bar and the statistics give way; the iteration count, images/s, elapsed time and ETA stay
    whole (they were cut to '12345…' and '-:--:…')."""
    import io
    from rich.console import Console
    import fastgan.report as report
    out = io.StringIO()
    monkeypatch.setattr(report, "console", Console(file=out, width=width, force_terminal=True, color_system=None))
    progress = report.RunProgress(39550, 12345, False, 25, 1582)
    progress.bar.update(progress.task, epoch="epoch 10/25", speed="45,000 img/s", stats="D 1.386 G 0.693 D(x) 0.50")
    report.console.print(progress.bar.make_tasks_table(progress.bar.tasks))
    [line] = out.getvalue().splitlines()
    assert len(line) <= width
    for whole in ("epoch 10/25", " 12345/39550 ", " 45,000 img/s ", " 0:00:00 ", " ETA ", " -:--:-- ", " D"):
        assert whole in line, (whole, line)


# ---- broken checkpoints --------------------------------------------------------------------------------------

def broken_files(tmp_path) -> list[tuple[str, bytes, str]]:
    """(name, contents, what the one error line must say) for each kind of file that is not a checkpoint."""
    weights = io.BytesIO()
    torch.save(untrained_generator().state_dict(), weights)
    whole = weights.getvalue()
    legacy = io.BytesIO()
    torch.save(untrained_generator().state_dict(), legacy, _use_new_zipfile_serialization=False)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
    other_zip = io.BytesIO()
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("faces/0001.txt", "not weights")
    write_images(tmp_path / "faces", 2)
    prepared = prepare(index_images(tmp_path / "faces", workers=1), tmp_path / "faces.fgd", 16, 3, workers=1)
    return [
        ("prepared.pt", prepared.read_bytes(), "is not a PyTorch file: it is a fastgan prepared data file (images "
         "made by fastgan prepare), for fastgan train --data"),
        ("empty.pt", b"", "is empty (0 bytes), not a checkpoint"),
        ("notes.pt", b"epochs: 25\nlr: 0.0002\n", "is not a PyTorch file: it holds text ('epochs: 25')"),
        ("photo.pt", jpeg.getvalue(), "is not a PyTorch file: it is a JPEG image"),
        ("archive.pt", other_zip.getvalue(), "is not a PyTorch file: it is a zip archive of other files"),
        ("half.pt", whole[: len(whole) // 2],
         f"is corrupt or truncated: a PyTorch file cut short at {len(whole) // 2:,} bytes"),
        ("tail.pt", whole[:-10], f"is corrupt or truncated: a PyTorch file cut short at {len(whole) - 10:,} bytes"),
        ("legacy_half.pt", legacy.getvalue()[: len(legacy.getvalue()) // 2],
         "is corrupt or truncated: a PyTorch file in the format before PyTorch 1.6 that does not read back to its "
         "end (cut short or damaged)"),
    ]


@pytest.mark.parametrize("command", ["generate", "train"])
def test_a_file_that_is_not_a_checkpoint_is_named_for_what_it_is(tmp_path, capfd, command):
    for name, contents, message in broken_files(tmp_path):
        path = tmp_path / name
        path.write_bytes(contents)
        argv = (["generate", "--device", "cpu", "--checkpoint", str(path), "--out", str(tmp_path / "g.png")]
                if command == "generate" else ["train", *TINY, "--resume", str(path), "--out", str(tmp_path / "r")])
        assert main(argv) == 2, name
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(f"fastgan: error: checkpoint {path} {message}"), err
        assert "Error" not in err.removeprefix("fastgan: error:"), err  # no internal exception's name


# ---- the Python API -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out", ["relative/run", None])
def test_the_python_api_returns_the_run_folder_absolute(image_folder, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    run = train_api(Config(root=str(image_folder), out=out, image_size=16, ngf=4, ndf=4, nz=8, batch_size=8,
                           workers=0, epochs=1, quiet=True, device="cpu"))
    assert run.is_absolute() and run == run.resolve(), run
    assert run.parent.parent == tmp_path.resolve() and (run / "netG.pth").is_file()


def test_a_resume_reads_its_checkpoint_once(image_folder, tmp_path, monkeypatch, capfd):
    """The CLI takes the run's options from the checkpoint and train() continues from the same read: one load."""
    from fastgan import checkpoint
    run = tmp_path / "run"
    assert main(["train", *TINY, "--root", str(image_folder), "--out", str(run), "--epochs", "1"]) == 0
    reads, real_read = [], checkpoint.read_file
    monkeypatch.setattr(checkpoint, "read_file", lambda path: (reads.append(path), real_read(path))[1])
    assert main(["train", "--out", str(run), "--resume", "auto", "--epochs", "2"]) == 0
    assert len(reads) == 1, reads
    # and a generator's plain state dict gets the message that says what it can be used for
    assert main(["train", "--resume", str(run / "netG.pth"), "--out", str(tmp_path / "other")]) == 2
    assert "fastgan generate" in capfd.readouterr().err.split("not a fastgan training checkpoint")[1]


# ---- the advice of errors --------------------------------------------------------------------------------------

def test_the_advice_check_finds_flags_the_command_does_not_have():
    """tests/conftest.py checks every error a command reports during the suite with foreign_flags: the check
    itself must see the old eval message's --image-size/--nc, and let another command's flags pass when the advice
    names that command."""
    from conftest import foreign_flags
    old = "--data d.fgd holds 32x32 images with 3 channel(s); pass matching --image-size/--nc, or prepare it again"
    assert foreign_flags("eval", old) == ["--image-size", "--nc"]
    assert foreign_flags("train", old) == []
    assert foreign_flags("eval", "give --root, or --data (fastgan prepare --image-size 16 --nc 3 makes one)") == []
    assert foreign_flags("train", "launch with torchrun --nproc_per_node 2 -m fastgan train --sync-bn") == []
    assert foreign_flags("generate", "lower --batch-size") == ["--batch-size"]
