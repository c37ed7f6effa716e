"""--cuda-graphs: the whole D+G step (forwards, backwards, both Adam steps, BatchNorm's running statistics)
captured once in one CUDA graph and replayed for every batch, so that the CPU launches one graph instead of
hundreds of kernels per step.

How it stays the same algorithm: each new batch and noise are copied into static input buffers; Adam runs with
capturable=True (its step count lives on the device); autocast runs with its cast cache off, as graphs require;
the warm-up iterations that capture needs run on the first batch and are then undone (weights, BatchNorm
buffers and optimizer state restored in place, so the graph's addresses stay valid), so the run trains on
exactly the batches it would have without graphs.

fp16's GradScaler works inside the graph: with fused Adam, GradScaler.step hands the optimizer its found_inf
and grad_scale tensors instead of reading the inf/NaN check on the host, so unscaling, skipping a step whose
gradients overflowed, and updating the scale are all device kernels, captured and replayed like the rest.
The scale and its growth tracker are part of what the warm-up restores.
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import FastganError

WARMUP_STEPS = 3  # eager iterations on a side stream before capture (lazy state, cuDNN autotuning)


class GraphedStep:
    """Call it as step(real, noise) -> statistics tensor, like the eager step it wraps."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], modules, optimizers, scaler):
        if scaler.is_enabled() and not all(getattr(o, "_step_supports_amp_scaling", False) for o in optimizers):
            raise FastganError("--cuda-graphs with fp16 needs fused Adam, whose step takes the GradScaler's "
                               "inf check on the device")
        self.step, self.modules, self.optimizers, self.scaler = step, modules, optimizers, scaler
        self.graph = None

    def _state_tensors(self) -> list[torch.Tensor]:
        tensors = [t for m in self.modules for t in [*m.parameters(), *m.buffers()]]
        return tensors + [v for opt in self.optimizers for s in opt.state.values() for v in s.values()
                          if isinstance(v, torch.Tensor)]

    def _capture(self, real: torch.Tensor, noise: torch.Tensor) -> None:
        before = {id(t): t.detach().clone() for t in self._state_tensors()}
        scaler_before = self.scaler.state_dict()  # plain numbers; {} when the scaler is off
        self.real, self.noise = real.clone(memory_format=torch.preserve_format), noise.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.step(self.real, self.noise)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.stats = self.step(self.real, self.noise)
        # Undo the warm-up in place: the graph holds these tensors' addresses
        with torch.no_grad():
            for t in self._state_tensors():
                saved = before.get(id(t))
                t.copy_(saved) if saved is not None else t.zero_()  # Adam state born in the warm-up: fresh is 0
            if scaler_before:  # the scale tensors were created by the warm-up's first scale(): set, not replace
                self.scaler._scale.fill_(scaler_before["scale"])
                self.scaler._growth_tracker.fill_(scaler_before["_growth_tracker"])

    def __call__(self, real: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            self._capture(real, noise)
        self.real.copy_(real, non_blocking=True)
        self.noise.copy_(noise, non_blocking=True)
        self.graph.replay()
        return self.stats  # the graph's static output: the caller copies it before the next replay
