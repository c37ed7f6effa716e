"""The training step as a run executes it: both networks, their optimizers, the GradScaler and the training
noise, with the speed machinery (DDP, torch.compile, a CUDA graph) wrapped around step.train_step from outside.

    trainer = build_trainer(cfg, device, precision, ranks, loader)
    stats = trainer(batch)   # one D update and one G update; statistics stay on the device

`fastgan train` and bench/throughput.py build their steps here, so the bench measures the step users run.
Everything is decided once, here; the loop only calls the trainer with each batch its loader yields.
"""
from __future__ import annotations

import functools
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import distributed, state
from .config import Config
from .ema import GeneratorEMA
from .errors import FastganError
from .models import Discriminator, Generator, init_weights
from .step import train_step


@dataclass
class Precision:
    name: str           # fp32 | fp16 | bf16
    autocast: object    # a context manager: nullcontext() for fp32
    scaler: torch.amp.GradScaler  # disabled unless fp16

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the networks compute in, and so the best dtype for a batch to arrive in."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.name, torch.float32)


def resolve_precision(amp: str, device: torch.device, cuda_graphs: bool = False) -> Precision:
    """--amp: off -> fp32; auto -> fp16 + GradScaler on CUDA, bf16 on the CPU (where fp16 autocast is poor)."""
    name = {"off": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(amp) or ("fp16" if device.type == "cuda" else "bf16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FastganError("--amp bf16 asked for, but this GPU does not support bfloat16; use --amp fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name)
    # CUDA graphs need autocast's cast cache off: cached casts would outlive the captured region
    autocast = torch.autocast(device.type, dtype=dtype, cache_enabled=not cuda_graphs) if dtype else nullcontext()
    # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none
    scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")
    return Precision(name, autocast, scaler)


def build_models(cfg: Config, device: torch.device) -> tuple[Generator, Discriminator]:
    """G and D with the DCGAN init, drawn on the CPU from torch's global RNG so they match on every device."""
    netG = Generator(cfg.nz, cfg.ngf, cfg.nc, cfg.image_size)
    netG.apply(init_weights)
    netD = Discriminator(cfg.ndf, cfg.nc, cfg.image_size)
    netD.apply(init_weights)
    memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
    return netG.to(device, memory_format=memory_format), netD.to(device, memory_format=memory_format)


def build_optimizers(cfg: Config, netG, netD, capturable: bool = False) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam(lr, (beta1, 0.999)) for each network, fused: one kernel for all of a network's weights instead of
    several per tensor (tested against the tutorial's default Adam). capturable keeps its step count on the
    device, which a CUDA graph needs."""
    options = dict(lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=True, capturable=capturable)
    return torch.optim.Adam(netG.parameters(), **options), torch.optim.Adam(netD.parameters(), **options)


def import_cpp_extension_quietly() -> None:
    """torch.compile on the CPU imports torch.utils.cpp_extension, which warns "No CUDA runtime is found" on a
    machine with a CUDA build of torch and the CUDA toolkit but no GPU: true, and beside the point for a CPU run.
    The warning comes once, at import: import it here with its logger held at errors."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(level)


@dataclass
class Trainer:
    """What a run trains: the plain networks (for samples and checkpoints), their optimizers, the GradScaler and
    the training noise's generator, and `step(batch) -> statistics`, the step as this run executes it."""
    netG: Generator
    netD: Discriminator
    optimizerG: torch.optim.Adam
    optimizerD: torch.optim.Adam
    scaler: torch.amp.GradScaler
    noise_generator: torch.Generator
    ema: Optional[GeneratorEMA]  # --ema: G's moving average, updated after each step (in the graph with graphs)
    step: Callable[[Optional[torch.Tensor]], torch.Tensor]
    description: str  # how the step runs, for the run's first lines

    @property
    def sampler(self) -> torch.nn.Module:
        """The generator that draws the run's samples: the moving average when there is one."""
        return self.ema.model if self.ema is not None else self.netG

    def __call__(self, batch: Optional[torch.Tensor]) -> torch.Tensor:
        return self.step(batch)


def build_trainer(cfg: Config, device: torch.device, precision: Precision,
                  ranks: distributed.Ranks = distributed.Ranks(), loader=None) -> Trainer:
    """The networks (seeded from cfg.seed), optimizers and noise, and the step wrapped as cfg asks.

    With --cuda-graphs and a loader that can gather inside the graph (prepared data), the whole step is one
    graph replay and the loader yields placeholders; with any other loader each batch is copied into the
    graph's static input first."""
    torch.manual_seed(cfg.seed)
    netG, netD = build_models(cfg, device)
    optimizerG, optimizerD = build_optimizers(cfg, netG, netD, capturable=cfg.cuda_graphs)
    noise_generator = state.noise_generator(cfg.seed, device)
    batch_size = distributed.per_rank_batch(cfg.batch_size, ranks.world_size)
    rows = slice(ranks.rank * batch_size, (ranks.rank + 1) * batch_size)

    def draw_noise() -> torch.Tensor:
        # every rank draws the whole batch's noise and takes its rows: the single process's noise
        return torch.randn(cfg.batch_size, cfg.nz, 1, 1, device=device, generator=noise_generator)[rows]

    # The step runs the (possibly DDP-wrapped, compiled) modules; samples and checkpoints use the plain ones
    stepG, stepD, stepD_for_G = distributed.wrap(netG, netD, ranks, device, cfg.sync_bn)
    if cfg.compile:
        if device.type == "cpu":
            import_cpp_extension_quietly()
        compile_once = functools.cache(torch.compile)  # without torchrun, D for G's update is D: one compile
        stepG, stepD, stepD_for_G = compile_once(stepG), compile_once(stepD), compile_once(stepD_for_G)
    step = functools.partial(train_step, stepG, stepD, optimizerG, optimizerD, autocast=precision.autocast,
                             scaler=precision.scaler, netD_for_G=stepD_for_G)
    ema = GeneratorEMA(netG, cfg.ema_kimg, cfg.batch_size) if cfg.ema_kimg is not None else None
    if ema is not None:
        plain_step = step

        def step(real: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            stats = plain_step(real, noise)
            ema.update()
            return stats
    parts = Trainer(netG, netD, optimizerG, optimizerD, precision.scaler, noise_generator, ema, None, "eager")
    if not cfg.cuda_graphs:
        parts.step = lambda real: step(real, draw_noise())
        return parts

    from .graphs import GraphedStep, StaticBatch
    graph_parts = dict(modules=(netG, netD), optimizers=(optimizerG, optimizerD), scaler=precision.scaler,
                       generators=[noise_generator])
    ema_state = ema.tensors() if ema is not None else []  # the average's update is captured with the step
    if hasattr(loader, "in_graph"):
        feed = loader.in_graph()
        graphed = GraphedStep(step, lambda: (feed(), draw_noise()), state=[feed.position, *ema_state],
                              **graph_parts)
        parts.step = lambda _placeholder: graphed()
        parts.description = "one CUDA graph per step, the batch gathered inside it"
        return parts
    static = StaticBatch(draw_noise)
    graphed = GraphedStep(step, static, state=ema_state, **graph_parts)

    def step_on(real: torch.Tensor) -> torch.Tensor:
        static.feed(real)
        return graphed()
    parts.step = step_on
    parts.description = "one CUDA graph per step, each batch copied into it"
    return parts
