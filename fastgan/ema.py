"""--ema: an exponential moving average of the generator's weights, as StyleGAN2-ADA keeps it (G_ema).

After every step, with cur_nimg the images trained before it (all ranks together):
    ema_nimg = min(ema_kimg * 1000, cur_nimg * ramp-up)      # the half-life, in images; ramp-up 0.05
    beta = 0.5 ** (batch_size / max(ema_nimg, 1e-8))
    p_ema = p.lerp(p_ema, beta) for each weight; buffers (BatchNorm's running statistics) copied
So the average forgets half of itself every ema_kimg thousand images, and early on, while the generator changes
fast, at most 5% of the images seen so far (the first step's beta is 0: the average starts as G).

The images counter and beta live on the training device, and the weight reaches lerp as a device tensor, so the
update needs no host sync (tests/test_no_host_sync.py proves it under a dispatch spy) and runs inside a CUDA graph
like the rest of the step. Under torchrun every rank holds the same
G (DDP) and so the same average; rank 0's is the one saved.
"""
from __future__ import annotations

import copy

import torch

from .checkpoint import unwrap

RAMPUP = 0.05  # StyleGAN2-ADA's ema_rampup: the half-life is at most this share of the images seen so far


class GeneratorEMA:
    def __init__(self, netG: torch.nn.Module, ema_kimg: float, batch_size: int):
        """`batch_size`: images per step over all ranks (the global batch)."""
        self.source = unwrap(netG)
        self.model = copy.deepcopy(self.source).eval().requires_grad_(False)
        self.ema_kimg, self.batch_size = float(ema_kimg), batch_size
        device = next(self.source.parameters()).device
        # float64: an exact count of images far past float32's 2**24
        self.images = torch.zeros((), dtype=torch.float64, device=device)
        self._pairs()

    def _pairs(self) -> None:
        self.ema_params = list(self.model.parameters())
        self.params = list(self.source.parameters())
        self.ema_buffers = list(self.model.buffers())
        self.buffers = list(self.source.buffers())

    @torch.no_grad()
    def update(self) -> None:
        """Fold the generator's current weights into the average, then count this step's images (device-only)."""
        half_life = torch.clamp(torch.clamp(self.images * RAMPUP, max=self.ema_kimg * 1000), min=1e-8)
        beta = torch.pow(0.5, self.batch_size / half_life).float()
        # p_ema <- p_ema + (1 - beta) (p - p_ema), StyleGAN2-ADA's p.lerp(p_ema, beta) in place. The weight goes
        # in as a list of (the same) 0-dim device tensor: the overload that takes one weight wants a Python number,
        # and torch would read the tensor into one with .item(), a host sync that no CUDA graph can capture. lerp's
        # own formula is kept (a sub, mul and add would round differently, and miss G exactly at beta 0)
        torch._foreach_lerp_(self.ema_params, self.params, [1 - beta] * len(self.params))
        torch._foreach_copy_(self.ema_buffers, self.buffers)
        self.images.add_(self.batch_size)

    def tensors(self) -> list[torch.Tensor]:
        """Everything the update writes: what a CUDA graph's warm-up must put back."""
        return [*self.ema_params, *self.ema_buffers, self.images]

    def state_dict(self) -> dict:
        return {"netG_ema": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "ema_images": float(self.images)}  # note: a host sync, at checkpoints only

    @torch.no_grad()
    def load_state_dict(self, saved: dict) -> None:
        self.model.load_state_dict(saved["netG_ema"])
        self.images.fill_(saved["ema_images"])

    @torch.no_grad()
    def start_from_generator(self, images: float) -> None:
        """Begin the average at G's current weights, as if `images` had been trained (a resume of a run that had
        no average: its ramp-up counts the images the generator has seen)."""
        torch._foreach_copy_(self.ema_params, self.params)
        torch._foreach_copy_(self.ema_buffers, self.buffers)
        self.images.fill_(images)
