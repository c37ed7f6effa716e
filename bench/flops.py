"""The FLOP count of one training step, derived from the model: what the benches' "share of the FLOP floor" divides by.

    python bench/flops.py                 # the tutorial's model (64x64, ngf = ndf = 64): GFLOP per image
    python bench/flops.py --ngf 32 --image-size 32

Each convolution's multiply-adds are counted on one forward pass of G and of D (forward hooks on every Conv2d,
output elements x input channels per group x kernel area, and ConvTranspose2d, input elements x output channels
per group x kernel area), and the step is built from them as
Algorithm 1 runs it, a backward pass costing a forward's work once for the weights' gradients and once for the
inputs':
  - G's forward: G;
  - D's update: D on the real batch and on the detached fakes, each forward, weight and input gradients, less
    the first layer's input gradient (images need none): 2 (3D - D1);
  - G's update: D on the fakes forward and its input gradients only (fastgan asks for no D weight gradients
    there), then G's weight and input gradients, less G's first layer's input gradient (the noise needs none):
    2D + 2G - G1.
One multiply-add is two FLOPs. Batch norm, activations, the losses and Adam are left out: elementwise, a few
percent of the convolutions' work at 64x64, and bound by memory, not by the matrix units the floor counts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastgan.models import Discriminator, Generator  # noqa: E402


def conv_macs(model: torch.nn.Module, example: torch.Tensor) -> list[int]:
    """Multiply-adds of each convolution of `model` on one forward pass of `example` (batch 1), in order."""
    counts: list[int] = []

    def count(layer, inputs, output):
        kernel = layer.weight.shape[2] * layer.weight.shape[3]
        if isinstance(layer, torch.nn.ConvTranspose2d):  # each input element is spread over kernel x outputs
            counts.append(inputs[0].numel() * layer.out_channels // layer.groups * kernel)
        else:  # each output element gathers kernel x inputs
            counts.append(output.numel() * layer.in_channels // layer.groups * kernel)

    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    handles = [m.register_forward_hook(count) for m in convs]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def step_flop_per_image(nz: int = 100, ngf: int = 64, ndf: int = 64, nc: int = 3, image_size: int = 64) -> float:
    """FLOPs of one training step per image (see the module's docstring for the count)."""
    g = conv_macs(Generator(nz, ngf, nc, image_size), torch.zeros(1, nz, 1, 1))
    d = conv_macs(Discriminator(ndf, nc, image_size), torch.zeros(1, nc, image_size, image_size))
    G, D = sum(g), sum(d)
    macs = G + 2 * (3 * D - d[0]) + 2 * D + 2 * G - g[0]
    return 2.0 * macs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nz", type=int, default=100)
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--ndf", type=int, default=None, help="[--ngf]")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    flop = step_flop_per_image(args.nz, args.ngf, args.ndf or args.ngf, 3, args.image_size)
    print(f"{flop / 1e9:.3f} GFLOP per image per training step ({args.image_size}x{args.image_size}, "
          f"ngf {args.ngf}, ndf {args.ndf or args.ngf}, nz {args.nz})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
