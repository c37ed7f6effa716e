"""fastgan generate: latent interpolation (--interpolate, slerp, grid and GIF) and the choice between the EMA and
the raw generator (--no-ema), through the real command line on tiny generators."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastgan import checkpoint
from fastgan.cli import main
from fastgan.generate import interpolate, latents, slerp
from fastgan.models import Generator
from fastgan.report import image_grid
from fastgan.sampling import sample

CPU = ["--device", "cpu"]  # every test names its device: "auto" would pick a GPU where there is one
NZ, SIZE = 8, 16
TILE = SIZE + 2  # image_grid's 2-pixel padding


def tiny_generator(seed: int) -> Generator:
    """A 16x16 generator whose images vary. Freshly made, its BatchNorm running statistics (mean 0, variance 1)
    shrink every image to within a grey level or two of flat grey: no two seeds or generators could be told
    apart. So the running statistics are set to those of 256 latents (momentum None: a plain average)."""
    torch.manual_seed(seed)
    netG = Generator(nz=NZ, ngf=4, nc=3, image_size=SIZE)
    for module in netG.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        netG.train()(torch.randn(256, NZ, 1, 1))
    return netG.eval()


@pytest.fixture
def netG_file(tmp_path):
    path = tmp_path / "netG.pth"
    torch.save(tiny_generator(0).state_dict(), path)
    return path


def generate(*args):
    return main(["generate", *CPU, *map(str, args)])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def tile(grid: np.ndarray, row: int, column: int) -> np.ndarray:
    top, left = 2 + row * TILE, 2 + column * TILE
    return grid[top:top + SIZE, left:left + SIZE]


# ---- slerp --------------------------------------------------------------------------------------------------

def test_slerp_ends_are_the_latents_themselves():
    a, b = torch.randn(2, NZ, 1, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    assert slerp(a, b, 0.5).shape == a.shape and slerp(a, b, 0.5).dtype == a.dtype


def test_slerp_of_orthogonal_unit_vectors_halfway_is_their_normalised_sum():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    # sin(pi/4)/sin(pi/2) = 1/sqrt(2) for each; lerp would give 0.5 each, a vector of norm 0.71
    torch.testing.assert_close(slerp(a, b, 0.5), (a + b) / math.sqrt(2), rtol=0, atol=1e-7)  # float32 rounding
    torch.testing.assert_close(slerp(a, b, 1 / 3), torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6),
                                                                 0.0]), rtol=0, atol=1e-7)


def test_slerp_keeps_the_norm_of_equal_norm_ends():
    a, b = torch.randn(2, 100, generator=torch.Generator().manual_seed(1))
    b = b * a.norm() / b.norm()
    for t in (0.1, 0.25, 0.5, 0.9):
        # float32 vectors of norm ~10: rounding is ~1e-6; lerp falls short by a few percent halfway
        torch.testing.assert_close(slerp(a, b, t).norm(), a.norm(), rtol=1e-5, atol=0)


def test_slerp_of_parallel_vectors_is_lerp_not_nan():
    a = torch.tensor([3.0, 4.0])
    # the angle is 0: sin(w) is 0 and the slerp formula 0/0; the arc and the chord are the same line
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a, rtol=0, atol=1e-6)
    torch.testing.assert_close(slerp(a, -a, 0.25), 0.5 * a, rtol=0, atol=1e-6)  # opposite: no single arc
    z = torch.randn(100, generator=torch.Generator().manual_seed(0))
    # a latent with itself: the cosine rounds to 1 + 2e-16 here, whose arccos is NaN
    torch.testing.assert_close(slerp(z, z, 0.5), z, rtol=0, atol=1e-6)


# ---- --interpolate ------------------------------------------------------------------------------------------

def test_interpolation_grid_has_a_row_per_interpolation_and_the_gif_walks_there_and_back(netG_file, tmp_path,
                                                                                         capsys):
    out = tmp_path / "walk.png"
    assert generate("--checkpoint", netG_file, "--interpolate", 5, "--n", 3, "--seed", 0, "--out", out) == 0
    assert Image.open(out).size == (5 * TILE + 2, 3 * TILE + 2)  # 5 steps a row, 3 rows
    gif = Image.open(tmp_path / "walk.gif")
    assert gif.n_frames == 5 + 3  # steps 0..4, then 3, 2, 1 back: the loop restarts at 0
    assert gif.info.get("loop") == 0  # forever
    durations = []
    for k in range(gif.n_frames):
        gif.seek(k)
        durations.append(gif.info["duration"])
    # equal: a turning point shown twice is merged by Pillow into one frame of double length, a stall
    assert len(set(durations)) == 1, durations
    # each frame: the 3 rows' images at one step, 2 a row, scaled up whole so that a 16-pixel face is 128 across
    assert gif.size == (8 * (2 * TILE + 2), 8 * (2 * TILE + 2))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == "fastgan: wrote 3 interpolations of 5 images from the generator in netG.pth to " \
                   f"{out} and {out.with_suffix('.gif')}"


def test_an_out_ending_in_gif_names_the_animation_whose_frames_are_the_grids_pixels_scaled_up(netG_file,
                                                                                              tmp_path, capsys):
    gif_path = tmp_path / "walk.gif"
    assert generate("--checkpoint", netG_file, "--interpolate", 4, "--n", 2, "--seed", 1, "--out", gif_path) == 0
    grid_path = tmp_path / "walk.png"  # the grid beside it
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"to {grid_path} and {gif_path}")
    grid = pixels(grid_path)
    gif = Image.open(gif_path)
    assert gif.size == (8 * (2 * TILE + 2), 8 * (TILE + 2))  # 2 rows side by side at each step, 8x
    gif.seek(0)
    frame = np.asarray(gif.convert("RGB"), dtype=np.int64)
    # frame 0 holds step 0 of each row: row 1's first face sits second in the frame; each of its pixels is an
    # 8x8 block of one colour, the grid's pixel up to GIF's 256-colour palette (measured: 2.5 levels on average,
    # 33 at most; another face differs by tens of levels on average)
    face = frame[8 * 2: 8 * (2 + SIZE), 8 * (2 + TILE): 8 * (2 + TILE + SIZE)]
    blocks = face.reshape(SIZE, 8, SIZE, 8, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()  # nearest neighbour: no blur
    assert np.abs(blocks[:, 0, :, 0] - tile(grid, 1, 0)).mean() <= 5
    assert np.abs(blocks[:, 0, :, 0] - tile(grid, 0, 0)).mean() > 10  # (row 0's face: another one)


def test_rows_run_between_the_latents_that_plain_generation_draws(netG_file, tmp_path):
    rows, steps = 3, 4
    assert generate("--checkpoint", netG_file, "--interpolate", steps, "--n", rows, "--seed", 7,
                    "--out", tmp_path / "walk.png") == 0
    assert generate("--checkpoint", netG_file, "--n", rows + 1, "--seed", 7, "--out", tmp_path / "plain.png") == 0
    walk, plain = pixels(tmp_path / "walk.png"), pixels(tmp_path / "plain.png")
    plain_tiles = [tile(plain, i // 2, i % 2) for i in range(rows + 1)]  # 4 images: 2 a row
    for row in range(rows):
        # the same latents through the same eval-mode generator, in batches of other sizes: equal to the grey
        # level, or one off where a float differs in its last bits across batch sizes and rounds the other way
        assert np.abs(tile(walk, row, 0) - plain_tiles[row]).max() <= 1
        assert np.abs(tile(walk, row, steps - 1) - plain_tiles[row + 1]).max() <= 1
        inner = tile(walk, row, 1)
        assert np.abs(inner - plain_tiles[row]).mean() > 2 and np.abs(inner - plain_tiles[row + 1]).mean() > 2


def test_interpolation_images_are_the_generator_on_slerped_latents(tmp_path):
    netG = tiny_generator(3)
    torch.save(netG.state_dict(), tmp_path / "netG.pth")
    out = interpolate(tmp_path / "netG.pth", rows=2, steps=3, seed=5, out=tmp_path / "api.png", device="cpu")
    assert out == tmp_path / "api.png" and out.with_suffix(".gif").is_file()
    ends = latents(3, NZ, seed=5)
    expected = [slerp(ends[r], ends[r + 1], t) for r in range(2) for t in (0.0, 0.5, 1.0)]
    want = np.asarray(image_grid(sample(netG, torch.stack(expected)), nrow=3)).astype(int)
    assert np.abs(pixels(out) - want).max() <= 1  # one grey level: batch-size rounding, as above


def test_interpolation_is_repeatable_per_seed(netG_file, tmp_path):
    files = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert generate("--checkpoint", netG_file, "--interpolate", 3, "--n", 2, "--seed", seed,
                        "--out", tmp_path / f"{name}.png") == 0
        files[name] = ((tmp_path / f"{name}.png").read_bytes(), (tmp_path / f"{name}.gif").read_bytes())
    assert files["a"] == files["b"]  # one seed: the same bytes, grid and GIF
    assert files["a"][0] != files["c"][0] and files["a"][1] != files["c"][1]


def test_interpolation_rows_default_to_8(netG_file, tmp_path):
    assert generate("--checkpoint", netG_file, "--interpolate", 2, "--out", tmp_path / "w.png") == 0
    assert Image.open(tmp_path / "w.png").size == (2 * TILE + 2, 8 * TILE + 2)


@pytest.mark.parametrize("existing", ["walk.png", "walk.gif"])
def test_interpolation_overwrites_nothing(netG_file, tmp_path, capsys, existing):
    (tmp_path / existing).write_bytes(b"the user's file")
    assert generate("--checkpoint", netG_file, "--interpolate", 3, "--out", tmp_path / "walk.png") == 2
    err = capsys.readouterr().err
    assert err == f"fastgan: error: --out {tmp_path / existing} already exists; choose another name " \
                  "(fastgan overwrites nothing)\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("walk")] == [existing]
    assert (tmp_path / existing).read_bytes() == b"the user's file"


@pytest.mark.parametrize("steps", [1, 0, -3])
def test_interpolation_needs_two_steps(netG_file, tmp_path, capsys, steps):
    assert generate("--checkpoint", netG_file, "--interpolate", steps, "--out", tmp_path / "walk.png") == 2
    assert capsys.readouterr().err == ("fastgan: error: --interpolate needs at least 2 steps (both ends of each "
                                       f"row), got {steps}\n")
    assert list(tmp_path.glob("walk*")) == []


def test_interpolation_refuses_individual(netG_file, tmp_path, capsys):
    assert generate("--checkpoint", netG_file, "--interpolate", 3, "--out", tmp_path / "walk.png",
                    "--individual", tmp_path / "each") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--individual" in err and "--interpolate" in err
    assert not (tmp_path / "each").exists() and list(tmp_path.glob("walk*")) == []


# ---- the EMA generator --------------------------------------------------------------------------------------

def training_checkpoint(path, netG: Generator, netG_ema):
    """What a training run with --ema writes, as far as generate reads it (netG_ema None: trained without)."""
    checkpoint.write_file(path, {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "epoch": 1,
                                 "netG": netG.state_dict(),
                                 "netG_ema": None if netG_ema is None else netG_ema.state_dict()})
    return path


def grid_of(netG: Generator, n: int, seed: int) -> np.ndarray:
    """What generate --n n --seed seed should write, from running netG directly."""
    noise = torch.randn(n, NZ, 1, 1, generator=torch.Generator().manual_seed(seed))
    return np.asarray(image_grid(sample(netG, noise))).astype(int)


def test_generate_uses_the_ema_generator_unless_no_ema(tmp_path, capsys):
    raw, ema = tiny_generator(1), tiny_generator(2)
    last = training_checkpoint(tmp_path / "last.pt", raw, ema)
    assert generate("--checkpoint", last, "--n", 4, "--seed", 0, "--out", tmp_path / "ema.png") == 0
    assert "from the EMA generator to" in capsys.readouterr().err
    assert generate("--checkpoint", last, "--n", 4, "--seed", 0, "--out", tmp_path / "raw.png", "--no-ema") == 0
    assert "from the raw generator (--no-ema) to" in capsys.readouterr().err
    # the same batch through the same eval-mode network: bit for bit the same images
    assert np.array_equal(pixels(tmp_path / "ema.png"), grid_of(ema, 4, 0))
    assert np.array_equal(pixels(tmp_path / "raw.png"), grid_of(raw, 4, 0))
    assert np.abs(pixels(tmp_path / "ema.png") - pixels(tmp_path / "raw.png")).mean() > 2


def test_interpolation_uses_the_ema_generator_too(tmp_path, capsys):
    raw, ema = tiny_generator(1), tiny_generator(2)
    last = training_checkpoint(tmp_path / "last.pt", raw, ema)
    for name, flags in (("ema", []), ("raw", ["--no-ema"])):
        assert generate("--checkpoint", last, "--interpolate", 2, "--n", 1, "--seed", 0,
                        "--out", tmp_path / f"{name}.png", *flags) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "from the EMA generator to" in err[0] and "from the raw generator (--no-ema) to" in err[1]
    # one row of 2 steps is the two latents themselves: generate --n 2's images, side by side
    assert np.array_equal(pixels(tmp_path / "ema.png"), grid_of(ema, 2, 0))
    assert np.array_equal(pixels(tmp_path / "raw.png"), grid_of(raw, 2, 0))


def test_a_checkpoint_without_ema_gives_its_generator_either_way(tmp_path, capsys):
    raw = tiny_generator(1)
    last = training_checkpoint(tmp_path / "last.pt", raw, None)
    for name, flags in (("default", []), ("no-ema", ["--no-ema"])):
        assert generate("--checkpoint", last, "--n", 4, "--seed", 0, "--out", tmp_path / f"{name}.png", *flags) == 0
        assert np.array_equal(pixels(tmp_path / f"{name}.png"), grid_of(raw, 4, 0))
    assert capsys.readouterr().err.count("from the raw generator (the checkpoint holds no EMA one) to") == 2


def test_a_plain_state_dict_is_used_as_it_is_with_no_ema(tmp_path, capsys):
    ema = tiny_generator(2)
    torch.save(ema.state_dict(), tmp_path / "netG_ema.pth")
    assert generate("--checkpoint", tmp_path / "netG_ema.pth", "--n", 4, "--seed", 0, "--no-ema",
                    "--out", tmp_path / "g.png") == 0
    assert np.array_equal(pixels(tmp_path / "g.png"), grid_of(ema, 4, 0))
    assert "from the generator in netG_ema.pth to" in capsys.readouterr().err


def test_a_run_folder_gives_its_latest_checkpoint_as_eval_takes_a_run_folder(tmp_path, capsys):
    """--checkpoint RUN is RUN/checkpoints/last.pt (its EMA generator here); a folder without one is refused
    with what it is, not called missing."""
    raw, ema = tiny_generator(1), tiny_generator(2)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    last = training_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", raw, ema)
    assert generate("--checkpoint", tmp_path / "run", "--n", 4, "--seed", 0, "--out", tmp_path / "g.png") == 0
    assert np.array_equal(pixels(tmp_path / "g.png"), grid_of(ema, 4, 0))
    assert f"from the EMA generator of {last} to" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert generate("--checkpoint", tmp_path / "empty", "--out", tmp_path / "e.png") == 2
    assert capsys.readouterr().err == (f"fastgan: error: --checkpoint {tmp_path / 'empty'} is a folder without "
                                       "checkpoints/last.pt, not a fastgan run folder; give a run folder, a checkpoint "
                                       "(RUN/checkpoints/epoch001.pt) or a generator file (RUN/netG.pth)\n")
    assert not (tmp_path / "e.png").exists()


def test_generator_state_picks_by_ema():
    raw, ema = tiny_generator(1).state_dict(), tiny_generator(2).state_dict()
    payload = {"format": checkpoint.FORMAT, "netG": raw, "netG_ema": ema}
    key = "main.0.weight"
    assert torch.equal(checkpoint.generator_state(payload, "x.pt")[key], ema[key])
    assert torch.equal(checkpoint.generator_state(payload, "x.pt", ema=False)[key], raw[key])
    del payload["netG_ema"]  # checkpoints from before --ema existed
    assert torch.equal(checkpoint.generator_state(payload, "x.pt")[key], raw[key])
