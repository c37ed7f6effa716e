"""The DCGAN generator and discriminator of the PyTorch DCGAN faces tutorial, at any power-of-two size.

At 64x64 with the default widths the modules, their order and so their state-dict keys are exactly those of
pytorch/examples `dcgan/main.py` (`main.0.weight` ...), so its `netG_epoch_N.pth` files load as they are.
Other sizes add or remove stride-2 blocks (pytorch/examples issue #70); the width multiplier grows by 2 per
block as in the tutorial but stops at 8, so 128 and 256 stay the tutorial's widths plus more resolution
instead of 2048-channel layers.

The one deliberate difference from the tutorial: the discriminator ends at the logits (no Sigmoid); the
training step uses BCE-with-logits, the same mathematics, but legal under autocast and numerically stable.
"""
from __future__ import annotations

import math

from torch import nn

MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 256
MAX_WIDTH_MULTIPLIER = 8  # the tutorial's ngf * 8 at 4x4; larger images get more blocks, not wider ones


def check_image_size(image_size: int) -> None:
    """Raise ValueError unless image_size is a power of two from 16 to 256."""
    if not (MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE) or image_size & (image_size - 1):
        raise ValueError(
            f"image size must be a power of two from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} "
            f"(16, 32, 64, 128, 256), got {image_size}")


def width_multipliers(image_size: int) -> list[int]:
    """Channel multipliers of the feature maps from 4x4 up to image_size/2: [8, 4, 2, 1] at 64."""
    check_image_size(image_size)
    blocks = int(math.log2(image_size)) - 2  # feature maps at 4, 8, ..., image_size / 2
    return [min(2 ** i, MAX_WIDTH_MULTIPLIER) for i in reversed(range(blocks))]


class Generator(nn.Module):
    """z (N, nz, 1, 1) -> image (N, nc, image_size, image_size) in [-1, 1]."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, image_size: int = 64):
        super().__init__()
        mults = width_multipliers(image_size)
        layers: list[nn.Module] = [
            # input is z, going into a convolution; state size. (ngf*mults[0]) x 4 x 4
            nn.ConvTranspose2d(nz, ngf * mults[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * mults[0]),
            nn.ReLU(True),
        ]
        for m_in, m_out in zip(mults, mults[1:]):
            # state size doubles: (ngf*m_out) x 2s x 2s
            layers += [
                nn.ConvTranspose2d(ngf * m_in, ngf * m_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ngf * m_out),
                nn.ReLU(True),
            ]
        # state size. (nc) x image_size x image_size
        layers += [nn.ConvTranspose2d(ngf * mults[-1], nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z):
        return self.main(z)


class Discriminator(nn.Module):
    """image (N, nc, image_size, image_size) -> logits (N,); sigmoid(logits) is the tutorial's D(x)."""

    def __init__(self, ndf: int = 64, nc: int = 3, image_size: int = 64):
        super().__init__()
        mults = list(reversed(width_multipliers(image_size)))  # [1, 2, 4, 8] at 64
        layers: list[nn.Module] = [
            # input is (nc) x image_size x image_size; state size. (ndf) x image_size/2 x image_size/2
            nn.Conv2d(nc, ndf * mults[0], 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for m_in, m_out in zip(mults, mults[1:]):
            # state size halves: (ndf*m_out) x s/2 x s/2
            layers += [
                nn.Conv2d(ndf * m_in, ndf * m_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ndf * m_out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        # state size. 1 x 1 x 1: the logit (the tutorial's Sigmoid is folded into the loss)
        layers.append(nn.Conv2d(ndf * mults[-1], 1, 4, 1, 0, bias=False))
        self.main = nn.Sequential(*layers)

    def forward(self, images):
        return self.main(images).flatten()


def init_weights(module: nn.Module) -> None:
    """The DCGAN paper's init: N(0, 0.02) for every convolution, BatchNorm weight N(1, 0.02) and bias 0.

    Use as `net.apply(init_weights)`. It matches ConvTranspose2d too (the tutorial's `'Conv' in classname`).
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
