"""Images from a generator for people to look at: the fixed noise behind the progress grids, and sampling that
leaves the generator's state alone (training grids and `fastgan generate`)."""
from __future__ import annotations

import torch

from .config import Config

FIXED_NOISE_SIZE = 64  # the tutorial's 8x8 progress grid


def make_fixed_noise(cfg: Config) -> torch.Tensor:
    """The noise behind every progress grid: its own generator, so it does not shift the training noise."""
    return torch.randn(FIXED_NOISE_SIZE, cfg.nz, 1, 1, generator=torch.Generator().manual_seed(cfg.seed))


@torch.no_grad()
def sample(netG: torch.nn.Module, noise: torch.Tensor, batch_statistics: bool = False) -> torch.Tensor:
    """G(noise) in eval mode, leaving G's state alone. BatchNorm normalises with its running statistics
    (deterministic per image), or with `batch_statistics` with the statistics of this batch, as training mode
    does but without updating the running ones: the untrained generator's running statistics (mean 0, variance
    1) barely scale its N(0, 0.02)-weighted activations and give a flat grey grid, where the tutorial, sampling
    in training mode, shows what an untrained DCGAN makes."""
    was_training = netG.training
    netG.eval()
    # each BatchNorm's output replaced by its input normalised over the batch: a local computation (no
    # SyncBatchNorm collective, since rank 0 samples alone) that writes to no buffer
    hooks = [module.register_forward_hook(normalise_over_batch) for module in netG.modules()
             if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)] if batch_statistics else []
    try:
        return netG(noise).float()
    finally:
        for hook in hooks:
            hook.remove()
        netG.train(was_training)


def normalise_over_batch(bn: torch.nn.modules.batchnorm._BatchNorm, inputs: tuple, output: torch.Tensor):
    return torch.nn.functional.batch_norm(inputs[0], None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
