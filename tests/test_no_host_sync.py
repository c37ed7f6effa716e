"""No host sync in the hot path, proven for every step variant the CPU can run: one training step after another
(the first one included, where Adam and the GradScaler make their state), the loop's per-step work beside it
(the statistics copied into the interval's history, the next batch of prepared data gathered), and the generator
call of --eval-every and the sample grids, each under a dispatch spy that fails on .item(), .cpu(), .tolist(),
nonzero and every other op that makes the host wait for the device or gives a data-dependent shape.

On a GPU, tests/test_graphs.py checks the graphed steps with CUDA's own sync detector; the spy sees the eager ops
that a CUDA graph captures, so a sync it finds here is one that would also break the capture there."""
import dataclasses
import itertools

import pytest
import torch

from fastgan.config import Config
from fastgan.distributed import Ranks
from fastgan.interval import IntervalStats
from fastgan.data.prepared import PreparedLoader
from fastgan.data.streamed import StreamedLoader
from fastgan.report import to_uint8
from fastgan.sampling import sample
from fastgan.trainer import build_trainer, resolve_precision
from hostsync import HostSyncError, no_host_sync

CPU = torch.device("cpu")
TINY = Config(image_size=16, ngf=4, ndf=4, nz=8, batch_size=4, device="cpu", seed=5)

VARIANTS = [dict(amp=amp, channels_last=channels_last, ema_kimg=ema_kimg, data=data)
            for amp, channels_last, ema_kimg, data in itertools.product(
                ("off", "bf16", "fp16"), (False, True), (None, 0.05), ("prepared", "streamed", "batches"))]


def variant_id(v: dict) -> str:
    return "-".join([{"off": "fp32"}.get(v["amp"], v["amp"]), "cl" if v["channels_last"] else "nchw",
                     "ema" if v["ema_kimg"] else "raw", v["data"]])


def pixels(n=16, size=16) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def one_trainer(variant: dict):
    """(trainer, batches, stats) as `fastgan train` builds them: prepared data gathers its batches on the device;
    "streamed" takes them from the host and disk tiers (gathered on pool threads, converted on the step's thread,
    under the spy); "batches" stands for the torch and DALI loaders, whose batches arrive on the device as they
    are."""
    cfg = dataclasses.replace(TINY, amp=variant["amp"], channels_last=variant["channels_last"],
                              ema_kimg=variant["ema_kimg"])
    precision = resolve_precision(cfg.amp, CPU)
    loader = PreparedLoader(pixels(), cfg.batch_size, CPU, channels_last=cfg.channels_last, seed=cfg.seed,
                            mirror=True, dtype=precision.dtype)
    loader.set_epoch(0)
    if variant["data"] == "prepared":
        batches = iter(loader)
    elif variant["data"] == "streamed":
        streamed = StreamedLoader(pixels().numpy(), cfg.batch_size, CPU, channels_last=cfg.channels_last,
                                  seed=cfg.seed, mirror=True, dtype=precision.dtype)
        streamed.set_epoch(0)
        batches = iter(streamed)
    else:
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        batches = iter([b.float().contiguous(memory_format=memory_format) for b in loader])
    trainer = build_trainer(cfg, CPU, precision)
    stats = IntervalStats(50, trainer, Ranks(), cfg.batch_size, None, torch.zeros(0, 2))
    return trainer, batches, stats


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_training_steps_never_sync(variant):
    trainer, batches, stats = one_trainer(variant)
    first = next(batches)  # the epoch's plan is made on the host at its start, once an epoch
    with no_host_sync():
        stats.add(trainer(first))  # the first step: Adam's and the scaler's state are born here
        stats.add(trainer(next(batches)))
        stats.add(trainer(next(batches)))
    values = stats.history[:stats.pending]
    assert stats.pending == 3 and torch.isfinite(values).all()
    if trainer.ema is not None:
        assert float(trainer.ema.images) == 3 * TINY.batch_size  # the average was updated, once a step


@pytest.mark.parametrize("ema_kimg", [None, 0.05], ids=["raw", "ema"])
def test_sampling_and_the_eval_every_generator_call_never_sync(ema_kimg):
    """The sample grids and --eval-every call the run's sampler (the average with --ema) in eval mode: device
    work only; saving and measuring then copy the images to the host once, deliberately (report.to_uint8)."""
    trainer, batches, _ = one_trainer(dict(amp="bf16", channels_last=True, ema_kimg=ema_kimg, data="prepared"))
    trainer(next(batches))
    noise = torch.randn(6, TINY.nz, 1, 1)
    with no_host_sync():
        grid_images = sample(trainer.sampler, noise, batch_statistics=True)
        measured = sample(trainer.sampler, noise)
    assert grid_images.shape == measured.shape == (6, 3, 16, 16) and to_uint8(measured).dtype == torch.uint8


def test_the_spy_catches_the_syncs_it_is_for():
    x = torch.randn(4, 3)
    to_device = eval("lambda t, device: t.to(device)", {"__name__": "fastgan.planted"})  # a move in fastgan's code
    for sync in (lambda t: t.sum().item(), lambda t: float(t.max()), lambda t: bool(t.sum() > 0),
                 lambda t: t[t > 0], lambda t: t.nonzero(), lambda t: t.tolist(), lambda t: t.cpu(),
                 lambda t: t.numpy(), lambda t: to_device(t, "cpu"), lambda t: to_device(t, CPU),
                 lambda t: torch.equal(t, t), lambda t: torch.unique(t),
                 lambda t: torch._foreach_lerp_([t.clone()], [t], 1 - t.sum())):  # the old --ema update's sync
        with pytest.raises(HostSyncError), no_host_sync():
            sync(x)
    with no_host_sync():  # and lets device work and dtype conversions through
        x.to(torch.bfloat16).float().mul_(2).contiguous(memory_format=torch.contiguous_format)
