"""--cuda-graphs: the whole D+G step (the batch's inputs, forwards, backwards, both Adam steps, BatchNorm's
running statistics) captured once in one CUDA graph and replayed for every batch, so that the CPU launches one
graph instead of hundreds of kernels per step.

How it stays the same algorithm: the step's inputs come from a capturable function that runs inside the graph:
the training noise is drawn there from its own generator (registered with the graph, so every replay draws the
next noise, exactly as eager draws would), and the batch is either gathered there from data held on the device
(prepared data: a device-side position in the epoch's order, advanced by the graph itself) or read from a static
buffer that each loader batch is copied into. Adam runs with capturable=True (its step count lives on the
device); autocast runs with its cast cache off, as graphs require; the warm-up iterations that capture needs
run first and are then undone (weights, BatchNorm buffers, optimizer state, the GradScaler, the noise generator
and the data position restored in place, so the graph's addresses stay valid), so the run trains on exactly the
batches and noise it would have without graphs.

fp16's GradScaler works inside the graph: with fused Adam, GradScaler.step hands the optimizer its found_inf
and grad_scale tensors instead of reading the inf/NaN check on the host, so unscaling, skipping a step whose
gradients overflowed, and updating the scale are all device kernels, captured and replayed like the rest.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .errors import FastganError

WARMUP_STEPS = 3  # eager iterations on a side stream before capture (lazy state, cuDNN autotuning)


class GraphedStep:
    """Call it as step() -> statistics tensor: one graph replay, nothing else.

    `step(real, noise)` is the eager step; `inputs()` makes its (real, noise) with device work only (it runs
    inside the graph). `state` lists further tensors that inputs() advances (a data position), restored after
    the warm-up like the weights; `generators` the random generators that inputs() draws from."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 inputs: Callable[[], tuple[torch.Tensor, torch.Tensor]], modules, optimizers, scaler,
                 generators: Sequence[torch.Generator] = (), state: Sequence[torch.Tensor] = ()):
        if scaler.is_enabled() and not all(getattr(o, "_step_supports_amp_scaling", False) for o in optimizers):
            raise FastganError("--cuda-graphs with fp16 needs fused Adam, whose step takes the GradScaler's "
                               "inf check on the device")
        if generators and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            raise FastganError(f"--cuda-graphs needs a torch whose CUDA graphs take their own random generators "
                               f"(CUDAGraph.register_generator_state); this is torch {torch.__version__}")
        if not all(g["capturable"] for o in optimizers for g in o.param_groups):
            raise FastganError("--cuda-graphs needs optimizers built with capturable=True")
        self.step, self.inputs, self.modules, self.optimizers = step, inputs, modules, optimizers
        self.scaler, self.generators, self.extra_state = scaler, list(generators), list(state)
        self.graph = None

    def _state_tensors(self) -> list[torch.Tensor]:
        tensors = [t for m in self.modules for t in [*m.parameters(), *m.buffers()]] + self.extra_state
        return tensors + [v for opt in self.optimizers for s in opt.state.values() for v in s.values()
                          if isinstance(v, torch.Tensor)]

    def _capture(self) -> None:
        before = {id(t): t.detach().clone() for t in self._state_tensors()}
        scaler_before = self.scaler.state_dict()  # plain numbers; {} when the scaler is off
        generators_before = [g.get_state() for g in self.generators]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.step(*self.inputs())
        torch.cuda.current_stream().wait_stream(side)
        # Undo the warm-up in place: the graph holds these tensors' addresses
        with torch.no_grad():
            for t in self._state_tensors():
                saved = before.get(id(t))
                t.copy_(saved) if saved is not None else t.zero_()  # Adam state born in the warm-up: fresh is 0
            if scaler_before:  # the scale tensors were created by the warm-up's first scale(): set, not replace
                self.scaler._scale.fill_(scaler_before["scale"])
                self.scaler._growth_tracker.fill_(scaler_before["_growth_tracker"])
        for generator, saved in zip(self.generators, generators_before):
            generator.set_state(saved)
        self.graph = torch.cuda.CUDAGraph()
        for generator in self.generators:  # each replay then advances it by what one step draws
            self.graph.register_generator_state(generator)
        # thread_local: CUDA calls from other threads during capture (the DataLoader's pin-memory thread, DALI's
        # buffer release) are theirs, not the graph's; "global" would make them break the capture now and then
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.stats = self.step(*self.inputs())

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.stats  # the graph's static output: the caller copies it before the next replay


class StaticBatch:
    """inputs() for batches that come from a loader: each batch is copied into one static buffer before the
    replay (one copy kernel); the noise is drawn inside the graph."""

    def __init__(self, draw_noise: Callable[[], torch.Tensor]):
        self.draw_noise, self.real = draw_noise, None

    def feed(self, real: torch.Tensor) -> None:
        if self.real is None:
            self.real = real.clone(memory_format=torch.preserve_format)
        else:
            self.real.copy_(real, non_blocking=True)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.real, self.draw_noise()
