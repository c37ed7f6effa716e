"""One DCGAN training step: Algorithm 1 of Goodfellow et al. as the PyTorch DCGAN tutorial writes it.

Speed machinery (autocast, GradScaler, channels_last, torch.compile) wraps this function from outside; the
step itself never asks which of them is on. It returns its statistics as a device tensor, so that calling
it never waits for the device.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

REAL_LABEL = 1.0
FAKE_LABEL = 0.0
STAT_NAMES = ("loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2")


def bce(logits: torch.Tensor, label: float) -> torch.Tensor:
    """The tutorial's BCELoss(Sigmoid(x), label), computed on logits (stable, and legal under autocast)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


def local_gradients(module):
    """Under DDP: keep the next backward's gradients local (no all-reduce), a no-op for a plain module."""
    return module.no_sync() if hasattr(module, "no_sync") else nullcontext()


def train_step(netG, netD, optimizerG, optimizerD, real: torch.Tensor, noise: torch.Tensor,
               autocast, scaler, netD_for_G=None) -> torch.Tensor:
    """One D update then one G update; returns [Loss_D, Loss_G, D(x), D(G(z)) before, D(G(z)) after] (float32).

    `autocast` is a context manager (nullcontext when off); `scaler` a GradScaler (disabled when off).
    `netD_for_G`: D as G's update sees it, when it differs from netD: under DDP the plain module, whose weights
    DDP's hooks must not expect gradients for (see distributed.wrap).
    """
    netD_for_G = netD if netD_for_G is None else netD_for_G
    ############################
    # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
    ###########################
    # Train with an all-real batch; under DDP its gradients are all-reduced once, with the fake batch's
    netD.zero_grad(set_to_none=True)
    with local_gradients(netD):
        with autocast:
            logits_real = netD(real)
            errD_real = bce(logits_real, REAL_LABEL)
        scaler.scale(errD_real).backward()

    # Train with an all-fake batch; detach so that D's loss does not reach G
    with autocast:
        fake = netG(noise)
        logits_fake = netD(fake.detach())
        errD_fake = bce(logits_fake, FAKE_LABEL)
    scaler.scale(errD_fake).backward()
    scaler.step(optimizerD)

    ############################
    # (2) Update G network: maximize log(D(G(z)))
    ###########################
    netG.zero_grad(set_to_none=True)
    # G's loss flows back through D, but D's weights need no gradients here (the tutorial computes them and
    # zeroes them at the next D step): skipping them saves a third of that backward pass and changes no result
    netD_for_G.requires_grad_(False)
    with autocast:
        # D was just updated: another forward pass of the same fake batch through it
        logits_gen = netD_for_G(fake)
        errG = bce(logits_gen, REAL_LABEL)  # fake labels are real for the generator cost
    scaler.scale(errG).backward()
    netD_for_G.requires_grad_(True)
    scaler.step(optimizerG)
    scaler.update()

    with torch.no_grad():
        return torch.stack([
            (errD_real + errD_fake).float(),
            errG.float(),
            logits_real.float().sigmoid().mean(),
            logits_fake.float().sigmoid().mean(),
            logits_gen.float().sigmoid().mean(),
        ])
