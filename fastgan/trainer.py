"""The training step as a run executes it: both networks, their optimizers, the GradScaler and the training
noise, with the speed machinery (DDP, torch.compile, a CUDA graph) wrapped around step.train_step from outside.

    trainer = build_trainer(cfg, device, precision, ranks, data.graph_feed)
    stats = trainer(batch)   # one D update and one G update; statistics stay on the device

`fastgan train` and bench/throughput.py build their steps here, so the bench measures the step users run.
Everything is decided once, here; the loop only calls the trainer with each batch its loader yields.
"""
from __future__ import annotations

import functools
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from . import distributed
from .checkpoint import unwrap
from .config import Config
from .cpu import why_bf16_is_emulated
from .ema import GeneratorEMA
from .errors import FastganError
from .models import Discriminator, Generator, init_weights
from .step import train_step

if TYPE_CHECKING:
    from .data.prepared import GraphFeed


@dataclass
class Precision:
    name: str           # fp32 | fp16 | bf16
    autocast: object    # a context manager: nullcontext() for fp32
    scaler: torch.amp.GradScaler  # disabled unless fp16
    note: str = ""      # where the precision is slow here, or not what --amp usually gives: the run says it

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the networks compute in, and so the best dtype for a batch to arrive in."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.name, torch.float32)


def resolve_precision(amp: str, device: torch.device, cuda_graphs: bool = False) -> Precision:
    """--amp: off -> fp32; fp16, bf16 as asked; auto -> the fastest mixed precision the device really has: fp16 +
    GradScaler on CUDA; on the CPU bf16 where it has bf16 instructions (fp16 autocast is poor there), else fp32,
    as emulated bf16 is 2 to 10 times slower than fp32 (bench/RESULTS.md)."""
    emulated = why_bf16_is_emulated() if device.type == "cpu" and amp in ("auto", "bf16") else None
    if amp != "auto":
        name = {"off": "fp32", "fp16": "fp16", "bf16": "bf16"}[amp]
    elif device.type == "cuda":
        name = "fp16"
    else:
        name = "fp32" if emulated else "bf16"
    note = ""
    if emulated:  # said either way: the user asked for mixed precision and gets fp32, or gets the slow kind
        note = f"{emulated}: " + ("bf16 would be emulated, 2 to 10 times slower than fp32, so --amp trains in fp32 "
                                  "here" if amp == "auto" else "--amp bf16 is emulated, 2 to 10 times slower than "
                                  "fp32 (--amp alone trains in fp32 here)")
    elif device.type == "cpu" and name == "fp16":  # obeyed, as asked, but --help calls it poor there
        note = ("fp16 autocast is slow on the CPU, several times slower than fp32 (--amp off); training in fp16 as "
                "--amp fp16 asks")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FastganError("--amp bf16 asked for, but this GPU does not support bfloat16; use --amp fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name)
    # CUDA graphs need autocast's cast cache off: cached casts would outlive the captured region
    autocast = torch.autocast(device.type, dtype=dtype, cache_enabled=not cuda_graphs) if dtype else nullcontext()
    # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none
    scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")
    return Precision(name, autocast, scaler, note)


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
    """What a run trains: the plain networks (for samples and checkpoints), their optimizers, the precision (its
    autocast and GradScaler), the training noise's generator, --ema's average, and `step(batch) -> statistics`,
    the step as this run executes it. state_dict() / load_state_dict() are what a checkpoint holds of them."""
    netG: Generator
    netD: Discriminator
    optimizerG: torch.optim.Adam
    optimizerD: torch.optim.Adam
    precision: Precision
    device: torch.device
    noise_generator: torch.Generator
    ema: Optional[GeneratorEMA]  # --ema: G's moving average, updated after each step (in the graph with graphs)
    step: Callable[[Optional[torch.Tensor]], torch.Tensor]
    description: str  # how the step runs, for the run's first lines

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.precision.scaler

    @property
    def sampler(self) -> torch.nn.Module:
        """The generator that draws the run's samples: the moving average when there is one."""
        return self.ema.model if self.ema is not None else self.netG

    def __call__(self, batch: Optional[torch.Tensor]) -> torch.Tensor:
        return self.step(batch)

    def state_dict(self) -> dict:
        """The networks (unwrapped from DDP and compile: pytorch/examples' keys), both optimizers, the GradScaler,
        the random states (the training noise's generator, torch's, the training GPU's) and --ema's average."""
        device = self.device
        return {
            # --ema: the generator's moving average and the images it has counted (None when off)
            **(self.ema.state_dict() if self.ema is not None else {"netG_ema": None}),
            "netG": unwrap(self.netG).state_dict(), "netD": unwrap(self.netD).state_dict(),
            "optimizerG": self.optimizerG.state_dict(), "optimizerD": self.optimizerD.state_dict(),
            "scaler": self.scaler.state_dict(),
            # the training device's CUDA RNG state only: every visible GPU's would not restore on a machine with
            # fewer
            "rng": {"noise": self.noise_generator.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        }

    def load_state_dict(self, saved: dict) -> None:
        """A checkpoint's networks, optimizers (with this run's capturable and fused), scaler, random states and
        average, into this trainer's objects in place (a CUDA graph may hold their addresses)."""
        self.netG.load_state_dict(saved["netG"])
        self.netD.load_state_dict(saved["netD"])
        if self.ema is not None:
            if saved.get("netG_ema") is not None:
                self.ema.load_state_dict(saved)
            else:  # --ema added on resume: the average starts at the resumed G, its ramp-up over the images G saw
                self.ema.start_from_generator(saved["step"] * saved["config"]["batch_size"])
        self.optimizerG.load_state_dict(with_run_options(saved["optimizerG"], self.optimizerG))
        self.optimizerD.load_state_dict(with_run_options(saved["optimizerD"], self.optimizerD))
        if self.scaler.is_enabled() and saved["scaler"]:  # a run that changes precision starts a fresh scaler
            self.scaler.load_state_dict(saved["scaler"])
        rng = saved["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda":
            cuda_state = training_device_rng(rng.get("cuda"), self.device)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, self.device)
        if "noise" in rng and rng["noise"].numel() == self.noise_generator.get_state().numel():
            self.noise_generator.set_state(rng["noise"])
        else:  # a version 1 checkpoint, or one from another device type: a fresh stream, seeded by the step
            self.noise_generator.manual_seed(int(np.random.SeedSequence([saved["config"]["seed"], 2, saved["step"]])
                                                 .generate_state(1)[0]))

    def all_finite(self) -> bool:
        """Whether every weight and optimizer state tensor is finite (one pass; at checkpoints only).

        BatchNorm's running statistics are left out: training (in train mode) never reads them, and a batch that
        overflowed in fp16, whose step the GradScaler skipped, has already left non-finite values in D's."""
        tensors = [*self.netG.parameters(), *self.netD.parameters()]
        tensors += [v for optimizer in (self.optimizerG, self.optimizerD) for s in optimizer.state.values()
                    for v in s.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        # note: one host sync, at saves only
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def noise_generator(seed: int, device: torch.device) -> torch.Generator:
    """The training noise's own generator, on the training device: its state is part of every checkpoint, and
    nothing else (loader workers, compile, libraries) can shift it. Seeded apart from the fixed noise's."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, 2]).generate_state(1)[0]))
    return generator


RUN_OPTIMIZER_OPTIONS = ("capturable", "fused")  # how this run steps, not what it learnt: never taken from a checkpoint


def with_run_options(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A copy of a saved optimizer state whose param groups carry this run's capturable and fused.

    load_state_dict restores the saved groups' options, so a checkpoint written without --cuda-graphs would
    come back with capturable False and fail at capture. Given this run's options, torch's own load also puts
    each `step` where they need it (on the parameter's device when capturable or fused)."""
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        return saved  # torch's load refuses it and says why
    groups = [{**group, **{k: current[k] for k in RUN_OPTIMIZER_OPTIONS if k in current}}
              for group, current in zip(saved["param_groups"], optimizer.param_groups)]
    return {**saved, "param_groups": groups}


def training_device_rng(saved, device: torch.device) -> Optional[torch.Tensor]:
    """The saved CUDA RNG state of the training device, or None when the checkpoint has none for it.

    Checkpoints hold that one state; older ones hold a list, one state per GPU visible when they were written,
    of which the entry at the training device's index is taken (none when that machine had fewer GPUs)."""
    if saved is None or isinstance(saved, torch.Tensor):
        return saved
    index = device.index if device.index is not None else torch.cuda.current_device()
    return saved[index] if index < len(saved) else None


def build_trainer(cfg: Config, device: torch.device, precision: Precision,
                  ranks: distributed.Ranks = distributed.Ranks(),
                  graph_feed: Optional[Callable[[], "GraphFeed"]] = None) -> Trainer:
    """The networks (seeded from cfg.seed), optimizers and noise, and the one step the loop calls, assembled in one
    pass as cfg asks: DDP, then torch.compile, then the update (--ema's average folded in after it), then the way
    a batch reaches it (given to it eagerly, copied into a CUDA graph's static input, or gathered inside the graph).

    `graph_feed`: where the data can be gathered inside a CUDA graph (prepared data in device memory: Data's
    graph_feed, PreparedLoader.in_graph), asked for under --cuda-graphs only; the loader then yields placeholders."""
    torch.manual_seed(cfg.seed)
    netG, netD = build_models(cfg, device)
    optimizerG, optimizerD = build_optimizers(cfg, netG, netD, capturable=cfg.cuda_graphs)
    noise_rng = noise_generator(cfg.seed, device)
    draw_noise = noise_drawer(cfg, ranks, device, noise_rng)
    ema = GeneratorEMA(netG, cfg.ema_kimg, cfg.batch_size) if cfg.ema_kimg is not None else None

    # The step runs the (possibly DDP-wrapped, compiled) modules; samples and checkpoints use the plain ones
    stepG, stepD, stepD_for_G = distributed.wrap(netG, netD, ranks, device, cfg.sync_bn)
    if cfg.compile:
        if device.type == "cpu":
            import_cpp_extension_quietly()
        compile_once = functools.cache(torch.compile)  # without torchrun, D for G's update is D: one compile
        stepG, stepD, stepD_for_G = compile_once(stepG), compile_once(stepD), compile_once(stepD_for_G)
    update = functools.partial(train_step, stepG, stepD, optimizerG, optimizerD, autocast=precision.autocast,
                               scaler=precision.scaler, netD_for_G=stepD_for_G)
    if ema is not None:
        update = with_average(update, ema)

    if not cfg.cuda_graphs:
        step, description = (lambda real: update(real, draw_noise())), "eager"
    else:
        step, description = graphed(update, draw_noise, graph_feed() if graph_feed is not None else None,
                                    modules=(netG, netD), optimizers=(optimizerG, optimizerD),
                                    scaler=precision.scaler, generators=[noise_rng],
                                    state=ema.tensors() if ema is not None else [])
    return Trainer(netG, netD, optimizerG, optimizerD, precision, device, noise_rng, ema, step, description)


def noise_drawer(cfg: Config, ranks: distributed.Ranks, device: torch.device,
                 generator: torch.Generator) -> Callable[[], torch.Tensor]:
    """draw() -> this rank's rows of the step's noise: every rank draws the whole batch's noise and takes its rows,
    so that the ranks together train on the single process's noise."""
    batch_size = distributed.per_rank_batch(cfg.batch_size, ranks.world_size)
    rows = slice(ranks.rank * batch_size, (ranks.rank + 1) * batch_size)
    return lambda: torch.randn(cfg.batch_size, cfg.nz, 1, 1, device=device, generator=generator)[rows]


def with_average(update: Callable, ema: GeneratorEMA) -> Callable:
    """update(real, noise), then --ema's average folds in G's new weights (device work only: capturable)."""
    def update_and_average(real: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        stats = update(real, noise)
        ema.update()
        return stats
    return update_and_average


def graphed(update: Callable, draw_noise: Callable, feed: Optional["GraphFeed"], state: list,
            **graph_parts) -> tuple[Callable, str]:
    """(step, its description): the update and its noise (and, given `feed`, the batch's gather) in one CUDA graph;
    `state` the further tensors the warm-up must put back (the EMA's)."""
    from .graphs import GraphedStep, StaticBatch
    if feed is not None:  # the gather is captured with the step: the loader's batch is a placeholder
        graph = GraphedStep(update, lambda: (feed(), draw_noise()), state=[feed.position, *state], **graph_parts)
        return (lambda _placeholder: graph()), "one CUDA graph per step, the batch gathered inside it"
    static = StaticBatch(draw_noise)
    graph = GraphedStep(update, static, state=state, **graph_parts)

    def step_on(real: torch.Tensor) -> torch.Tensor:
        static.feed(real)  # one copy kernel into the graph's static input
        return graph()
    return step_on, "one CUDA graph per step, each batch copied into it"
