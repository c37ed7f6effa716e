"""Many GPUs or machines through torchrun: one process per GPU (NCCL), or CPU processes (gloo), under
DistributedDataParallel.

    torchrun --nproc_per_node 8 -m fastgan train --root ~/celeba --amp --compile
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint host0:29500 -m fastgan train ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them fastgan trains in one process as before.

--batch-size is the global batch: each of the N ranks trains on batch_size / N images per step and DDP averages
the gradients, so a step with N ranks uses the same number of images as a step on one device and the
tutorial's learning rate keeps its meaning. The ranks' batches side by side are the single process's batches
(pipeline_torch.rank_order) and each rank draws its slice of the single process's noise, so the only
difference from one device is BatchNorm: each rank normalises with its own batch's statistics and keeps its own
running statistics (checkpoints store rank 0's), unless --sync-bn makes BatchNorm use the whole global batch
(fastgan.syncbn: on CUDA and on the CPU, without a host sync).

Rank 0 writes everything (samples, metrics, checkpoints); every rank reads the checkpoint it resumes from, so
with several machines the run folder must be on a shared file system to resume.
"""
from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from . import syncbn
from .errors import FastganError

# Generous: rank 0 may index a large image folder (minutes for CelebA, once) while the others wait for it
TIMEOUT = timedelta(minutes=30)


@dataclass
class Ranks:
    """Where this process stands among torchrun's: rank 0 of 1 when fastgan runs without torchrun."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False           # started by torchrun: a process group exists (even with one process)
    group: Optional[object] = field(default=None, repr=False)  # gloo group: host-side votes, never the GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def vote(self, flag: bool) -> bool:
        """True when any rank passes True. A collective: every rank must call it at the same point."""
        if not self.launched:
            return flag
        # note: a host-side all-reduce over gloo (tens of microseconds); it never waits for the GPU
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    @contextmanager
    def together(self, what: str):
        """Run a block on every rank and stop every rank if it fails on any: the rank that failed raises its
        own error, the others a FastganError saying that another rank failed, instead of waiting for it."""
        try:
            yield
        except BaseException:
            if self.launched:
                self.vote(True)
            raise
        if self.vote(False):
            raise FastganError(f"stopped because another rank failed {what} (its error is above)")

    @contextmanager
    def local_main_first(self, what: str):
        """The block runs on each machine's local rank 0 first (filling caches), then on the other ranks."""
        if self.launched and self.local_rank != 0 and self.vote(False):
            raise FastganError(f"stopped because another rank failed {what} (its error is above)")
        try:
            yield
        except BaseException:
            if self.launched and self.local_rank == 0:
                self.vote(True)
            raise
        if self.launched and self.local_rank == 0 and self.vote(False):
            raise FastganError(f"stopped because another rank failed {what} (its error is above)")


def environment() -> Optional[tuple[int, int, int]]:
    """(rank, world size, local rank) from torchrun's environment, or None when not launched by it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise FastganError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
    if not 0 <= rank < world_size:
        raise FastganError(f"RANK {rank} is outside WORLD_SIZE {world_size}")
    return rank, world_size, local_rank


def resolve_device(name: str) -> torch.device:
    """--device: auto is CUDA when torch sees a GPU; cuda without one is refused (the one place that says so)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise FastganError("--device cuda asked for, but torch sees no CUDA GPU (torch.cuda.is_available() "
                           "is False); use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """Each rank's share of the global --batch-size, which must split evenly."""
    if batch_size % world_size:
        lower = batch_size - batch_size % world_size
        options = f"{lower} or {lower + world_size}" if lower else f"{world_size}"
        raise FastganError(f"--batch-size {batch_size} is the total over {world_size} processes and must divide "
                           f"evenly among them: use {options}")
    return batch_size // world_size


def start(device_choice: str, batch_size: int, cuda_graphs: bool, sync_bn: bool) -> tuple[Ranks, Optional[torch.device]]:
    """Join torchrun's process group when launched by it: (ranks, this rank's device); (Ranks(), None) otherwise.

    Everything that can be checked alone is checked before joining, so that bad options fail on every rank at
    once instead of leaving the others waiting."""
    found = environment()
    if found is None:
        if sync_bn:
            raise FastganError("--sync-bn synchronises BatchNorm across torchrun's processes: launch with "
                               "torchrun --nproc_per_node N -m fastgan train ...")
        return Ranks(), None
    rank, world_size, local_rank = found
    per_rank_batch(batch_size, world_size)
    if cuda_graphs:
        raise FastganError("--cuda-graphs is not supported under torchrun yet (the gradient all-reduce would "
                           "have to be captured in the graph); leave it out")
    device = resolve_device(device_choice)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise FastganError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                               "lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    # the votes (stop requests, failures) go over gloo on the host, so that they never wait for the GPU
    group = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend == "nccl" else None
    return Ranks(rank, world_size, local_rank, launched=True, group=group), device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(netG: torch.nn.Module, netD: torch.nn.Module, ranks: Ranks, device: torch.device, sync_bn: bool):
    """(G for the step, D for the step, D for G's update) under DDP; the plain modules without torchrun.

    broadcast_buffers=False (forward_sync_buffers in newer torch): each rank keeps its own BatchNorm running
    statistics instead of taking rank 0's at every forward pass; that broadcast also writes in place into buffers that autograd saved for backward,
    the known failure of GAN steps that run D twice before one backward on CUDA (tests/test_distributed.py runs
    that pattern). G's update runs through the plain D (the same parameters, without DDP's hooks): D's weights
    get no gradient there, so DDP has nothing to reduce and is kept out of that pass.
    """
    if not ranks.launched:
        return netG, netD, netD
    if sync_bn:  # in place: the optimizers, samples and checkpoints keep using these same modules
        netG, netD = syncbn.convert(netG), syncbn.convert(netD)
    ids = [device.index] if device.type == "cuda" else None
    # torch 2.14 renames broadcast_buffers to forward_sync_buffers (the sync at construction is harmless here:
    # every rank starts from the same weights and buffers)
    newer = "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    ddp = dict(device_ids=ids, **{"forward_sync_buffers" if newer else "broadcast_buffers": False})
    return (torch.nn.parallel.DistributedDataParallel(netG, **ddp),
            torch.nn.parallel.DistributedDataParallel(netD, **ddp), netD)


def is_lost_peer(error: BaseException) -> bool:
    """Whether an error means that another rank went away (it failed or was killed) mid-collective."""
    text = str(error).lower()
    return isinstance(error, getattr(dist, "DistBackendError", ())) or any(
        s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe"))
