import pytest
import torch
from torch import nn

from fastgan.models import Discriminator, Generator, count_parameters, init_weights, width_multipliers

# pytorch/examples dcgan/main.py at 64x64, nz=100, ngf=ndf=64, nc=3
EXAMPLES_G = {
    "main.0.weight": (100, 512, 4, 4), "main.1.weight": (512,), "main.1.bias": (512,),
    "main.1.running_mean": (512,), "main.1.running_var": (512,), "main.1.num_batches_tracked": (),
    "main.3.weight": (512, 256, 4, 4), "main.4.weight": (256,), "main.4.bias": (256,),
    "main.4.running_mean": (256,), "main.4.running_var": (256,), "main.4.num_batches_tracked": (),
    "main.6.weight": (256, 128, 4, 4), "main.7.weight": (128,), "main.7.bias": (128,),
    "main.7.running_mean": (128,), "main.7.running_var": (128,), "main.7.num_batches_tracked": (),
    "main.9.weight": (128, 64, 4, 4), "main.10.weight": (64,), "main.10.bias": (64,),
    "main.10.running_mean": (64,), "main.10.running_var": (64,), "main.10.num_batches_tracked": (),
    "main.12.weight": (64, 3, 4, 4),
}
EXAMPLES_D = {
    "main.0.weight": (64, 3, 4, 4),
    "main.2.weight": (128, 64, 4, 4), "main.3.weight": (128,), "main.3.bias": (128,),
    "main.3.running_mean": (128,), "main.3.running_var": (128,), "main.3.num_batches_tracked": (),
    "main.5.weight": (256, 128, 4, 4), "main.6.weight": (256,), "main.6.bias": (256,),
    "main.6.running_mean": (256,), "main.6.running_var": (256,), "main.6.num_batches_tracked": (),
    "main.8.weight": (512, 256, 4, 4), "main.9.weight": (512,), "main.9.bias": (512,),
    "main.9.running_mean": (512,), "main.9.running_var": (512,), "main.9.num_batches_tracked": (),
    "main.11.weight": (1, 512, 4, 4),
}


def test_state_dicts_match_pytorch_examples_at_64():
    g, d = Generator(), Discriminator()
    assert {k: tuple(v.shape) for k, v in g.state_dict().items()} == EXAMPLES_G
    assert {k: tuple(v.shape) for k, v in d.state_dict().items()} == EXAMPLES_D
    assert count_parameters(g) == 3_576_704
    assert count_parameters(d) == 2_765_568


def test_layers_are_the_tutorials():
    g, d = Generator(), Discriminator()
    assert [type(m).__name__ for m in g.main] == ["ConvTranspose2d", "BatchNorm2d", "ReLU"] * 4 + [
        "ConvTranspose2d", "Tanh"]
    assert [type(m).__name__ for m in d.main] == ["Conv2d", "LeakyReLU"] + [
        "Conv2d", "BatchNorm2d", "LeakyReLU"] * 3 + ["Conv2d"]  # logits: no Sigmoid
    assert all(m.bias is None for m in [*g.main, *d.main] if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
    assert all(m.negative_slope == 0.2 for m in d.main if isinstance(m, nn.LeakyReLU))


@pytest.mark.parametrize("size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("nc", [1, 3])
def test_shapes_at_every_size(size, nc):
    g = Generator(nz=8, ngf=4, nc=nc, image_size=size)
    d = Discriminator(ndf=4, nc=nc, image_size=size)
    images = g(torch.randn(2, 8, 1, 1))
    assert images.shape == (2, nc, size, size)
    assert images.abs().max() <= 1
    logits = d(images)
    assert logits.shape == (2,)
    assert torch.isfinite(logits).all()


def test_width_multipliers_stop_at_8():
    assert width_multipliers(16) == [2, 1]
    assert width_multipliers(64) == [8, 4, 2, 1]
    assert width_multipliers(256) == [8, 8, 8, 4, 2, 1]


@pytest.mark.parametrize("size", [8, 24, 48, 63, 65, 512, 0, -64])
def test_bad_sizes_are_refused(size):
    with pytest.raises(ValueError, match="power of two from 16 to 256"):
        Generator(image_size=size)
    with pytest.raises(ValueError, match="power of two"):
        Discriminator(image_size=size)


def test_init_weights_is_dcgan():
    torch.manual_seed(0)
    g = Generator().apply(init_weights)
    d = Discriminator().apply(init_weights)
    for m in [*g.main, *d.main]:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if m.weight.numel() > 10_000:
                assert abs(m.weight.mean().item()) < 2e-3
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.05)
        elif isinstance(m, nn.BatchNorm2d):
            assert m.weight.mean().item() == pytest.approx(1.0, abs=0.01)
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.4)
            assert torch.all(m.bias == 0)
