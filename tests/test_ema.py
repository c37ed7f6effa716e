"""--ema: the generator's moving average against StyleGAN2-ADA's update, and through training, checkpoints and
resume. (The update inside a CUDA graph is tested against eager on the GPU in tests/test_graphs.py.)"""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from fastgan.cli import main
from fastgan.config import Config
from fastgan.ema import RAMPUP, GeneratorEMA
from fastgan.errors import FastganError
from fastgan.models import Generator, init_weights
from fastgan.report import image_grid
from fastgan.sampling import sample

TINY = ["--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "8", "--workers", "0",
        "--quiet", "--log-every", "2", "--sample-every", "2", "--device", "cpu"]  # 24 images: 3 steps an epoch


def train(*args):
    return main(["train", *TINY, *map(str, args)])


def load(path):
    return torch.load(path, weights_only=True)


def stylegan2_ada_update(G_ema, G, cur_nimg: int, batch_size: int, ema_kimg: float) -> None:
    """StyleGAN2-ADA's training_loop.py, verbatim but for the names (ema_rampup = 0.05)."""
    ema_nimg = ema_kimg * 1000
    ema_nimg = min(ema_nimg, cur_nimg * 0.05)
    ema_beta = 0.5 ** (batch_size / max(ema_nimg, 1e-8))
    with torch.no_grad():
        for p_ema, p in zip(G_ema.parameters(), G.parameters()):
            p_ema.copy_(p.lerp(p_ema, ema_beta))
        for b_ema, b in zip(G_ema.buffers(), G.buffers()):
            b_ema.copy_(b)


def tiny_generator(seed=0) -> Generator:
    torch.manual_seed(seed)
    return Generator(8, 4, 3, 16).apply(init_weights)


def perturb(G, step: int) -> None:
    """Stand-in for a training step: move every weight and BatchNorm statistic by a step-dependent amount."""
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)
        for b in G.buffers():
            if b.dtype.is_floating_point:
                b.add_(torch.rand(b.shape, generator=g))
            else:
                b.add_(1)


def test_the_update_is_lerp_with_one_minus_beta_bit_for_bit():
    """The update hands lerp its weight as a device tensor (no host sync, see tests/test_no_host_sync.py) and
    must stay the very lerp that a Python-number weight gives, bit for bit, from the first step (beta 0: the
    average becomes G exactly) through the ramp-up to the cap. A difference, product and sum instead rounds
    otherwise in the last bit of most weights."""
    G, batch, ema_kimg = tiny_generator(), 64, 0.2
    ema = GeneratorEMA(G, ema_kimg, batch)
    reference = [p.detach().clone() for p in ema.model.parameters()]
    for step in range(70):  # the 200-image cap is reached at 4,000 images, step 63
        perturb(G, step)
        ema.update()
        half_life = max(min(ema_kimg * 1000, step * batch * RAMPUP), 1e-8)
        beta = torch.tensor(0.5 ** (batch / half_life), dtype=torch.float32)
        torch._foreach_lerp_(reference, list(G.parameters()), float(1 - beta))
        for a, b in zip(ema.model.parameters(), reference):
            assert torch.equal(a, b), step


# 10 kimg: in the ramp-up throughout (5% of 5,120 images); 0.2 kimg: the 200-image cap from 4,000 images (step 63)
@pytest.mark.parametrize("ema_kimg", [10.0, 0.2])
def test_the_average_follows_stylegan2_adas_update(ema_kimg):
    G, batch, steps = tiny_generator(), 64, 80
    ema = GeneratorEMA(G, ema_kimg, batch)
    reference = copy.deepcopy(G)
    for step in range(steps):
        perturb(G, step)
        ema.update()
        stylegan2_ada_update(reference, G, step * batch, batch, ema_kimg)
    # the same arithmetic in another order (lerp from the other end): float32 rounding, ~1e-8 per update on weights
    # of ~0.05; a wrong beta at one step (a step's move is ~1e-2) would be off by far more than 1e-6
    for a, b in zip(ema.model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(ema.model.buffers(), G.buffers()):  # buffers are copied, not averaged
        assert torch.equal(a, b)
    assert float(ema.images) == steps * batch
    # it is an average: neither the generator nor where it started
    moved = max((a - b).abs().max() for a, b in zip(ema.model.parameters(), G.parameters()))
    assert moved > 1e-3


def test_the_first_update_copies_g_and_the_half_life_is_kimg_thousand_images():
    G, batch = tiny_generator(), 32
    ema = GeneratorEMA(G, 10.0, batch)
    perturb(G, 0)
    ema.update()  # no images seen yet: beta = 0, the average is G
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), G.parameters()))
    # long after the ramp-up: after kimg * 1000 images of a G standing still at a new place, half the gap is gone
    ema.images.fill_(10_000 / RAMPUP)
    start = [p.detach().clone() for p in ema.model.parameters()]
    target = [p.detach().clone() + 1.0 for p in G.parameters()]
    with torch.no_grad():
        for p, t in zip(G.parameters(), target):
            p.copy_(t)
    for _ in range(10_000 // batch):  # 312 steps x 32 = 9,984 images: 0.5 ** (9984 / 10000) of the gap left
        ema.update()
    left = 0.5 ** (312 * 32 / 10_000)
    for p, s, t in zip(ema.model.parameters(), start, target):
        torch.testing.assert_close(t - p, (t - s) * left, rtol=1e-4, atol=1e-5)


def test_ema_option_is_checked_in_one_place(capsys):
    with pytest.raises(FastganError, match=r"^ema_kimg \(--ema\) must be a positive number"):
        Config(ema_kimg=0).validate()
    assert main(["train", *TINY, "--ema", "-1"]) == 2
    assert "error: --ema must be a positive number of thousands of images, got -1.0" in capsys.readouterr().err


def test_a_run_with_ema_writes_and_resumes_it_exactly(image_folder, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train("--root", image_folder, "--out", whole, "--epochs", 2, "--ema") == 0
    assert train("--root", image_folder, "--out", split, "--epochs", 1, "--ema") == 0
    assert train("--out", split, "--resume", "auto", "--epochs", 2) == 0  # --ema comes from the checkpoint
    a, b = load(whole / "checkpoints" / "last.pt"), load(split / "checkpoints" / "last.pt")
    assert a["ema_images"] == b["ema_images"] == 6 * 8
    for k, v in a["netG_ema"].items():
        assert torch.equal(v, b["netG_ema"][k]), k
    ema_file, raw_file = load(whole / "netG_ema.pth"), load(whole / "netG.pth")
    assert all(torch.equal(v, a["netG_ema"][k]) for k, v in ema_file.items())
    assert all(torch.equal(v, load(split / "netG_ema.pth")[k]) for k, v in ema_file.items())
    assert any(not torch.equal(v, raw_file[k]) for k, v in ema_file.items())  # an average, not G
    # the grids come from the average, and say so; the animation is made of them
    grids = sorted(p.name for p in (whole / "samples").glob("fake_*.png"))
    assert grids and all(name.startswith("fake_ema_step") for name in grids)
    last_grid = np.asarray(Image.open(whole / "samples" / "fake_ema_step0000006_epoch002.png"))
    for weights, same in [(ema_file, True), (raw_file, False)]:
        netG = Generator(8, 4, 3, 16)
        netG.load_state_dict(weights)
        drawn = np.asarray(image_grid(sample(netG, a["fixed_noise"]), nrow=8))
        assert np.array_equal(drawn, last_grid) == same
    assert (whole / "progress.gif").exists()


def test_a_run_without_ema_has_none(image_folder, tmp_path):
    assert train("--root", image_folder, "--out", tmp_path / "run", "--epochs", 1) == 0
    assert load(tmp_path / "run" / "checkpoints" / "last.pt")["netG_ema"] is None
    assert not (tmp_path / "run" / "netG_ema.pth").exists()


def test_ema_added_on_resume_starts_at_the_resumed_generator(image_folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert train("--root", image_folder, "--out", run, "--epochs", 1) == 0
    resumed_G = load(run / "checkpoints" / "epoch001.pt")["netG"]
    started = {}
    real_start = GeneratorEMA.start_from_generator

    def spy(self, images):
        real_start(self, images)
        started.update(images=images, weights={k: v.clone() for k, v in self.model.state_dict().items()})
    monkeypatch.setattr(GeneratorEMA, "start_from_generator", spy)
    assert train("--out", run, "--resume", "auto", "--epochs", 2, "--ema", 0.01) == 0
    assert started["images"] == 3 * 8  # the ramp-up counts the images G has already seen
    assert all(torch.equal(v, resumed_G[k]) for k, v in started["weights"].items())
    assert load(run / "checkpoints" / "last.pt")["ema_images"] == 6 * 8
