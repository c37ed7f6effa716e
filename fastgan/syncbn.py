"""--sync-bn: BatchNorm2d whose training statistics cover the global batch of all torchrun processes.

torch.nn.SyncBatchNorm allows ranks with empty or unequal batches and filters their statistics with boolean
masks: three host syncs per BatchNorm forward (13 BatchNorm forwards per fastgan step), and it has no CPU kernels.
fastgan's ranks always hold equal, non-empty batches, so the statistics combine exactly with plain torch ops and
collectives: no host sync, and the same code runs on CUDA (NCCL) and on the CPU (gloo).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

CHANNEL = (slice(None), None, None)  # (C,) -> (C, 1, 1): a per-channel value against an NCHW tensor
# torch 2.14 renames all_gather_into_tensor (deprecated there) to all_gather_single; older torch (the GPU
# machines' 2.11) has only the old name. Same arguments, same collective.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over the global batch. Every rank must call it at the same point with an input of
    the same shape (fastgan splits the global batch evenly): the statistics of equal counts combine without
    counting them."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps: float, momentum, process_group,
                world_size: int):
        channels = input.shape[1]
        x = input.float()  # statistics in float32 also when autocast hands over fp16 or bf16
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        # every rank's (mean, var), rank after rank: a flat output, because gloo takes no stacked one.
        # note: one collective; on CUDA it is queued on the stream like any kernel, the host does not wait
        gathered = x.new_empty(world_size * 2, channels)
        all_gather_single(gathered, torch.stack([mean, var]), group=process_group)
        means, variances = gathered.view(world_size, 2, channels).unbind(1)
        # equal counts per rank: the law of total variance without weights
        mean = means.mean(0)
        var = variances.mean(0) + (means - mean).square().mean(0)
        count = world_size * (input.numel() // channels)
        if running_mean is not None:
            # as nn.BatchNorm2d: the running variance takes the unbiased estimate of the global batch
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.float()
        shift = -mean * scale if bias is None else bias.float() - mean * scale
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.process_group, ctx.count = process_group, count
        ctx.bias_dtype = None if bias is None else bias.dtype
        # elementwise on the input's layout: channels_last stays channels_last
        return (x * scale[CHANNEL] + shift[CHANNEL]).to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        dy = grad_output.float()
        xmu = input.float() - mean[CHANNEL]
        sum_dy = dy.sum((0, 2, 3))
        sum_dy_xmu = (dy * xmu).sum((0, 2, 3))
        # this rank's share only, as torch's SyncBatchNorm: DDP averages the parameter gradients across ranks
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums, group=ctx.process_group)  # note: the one collective of the backward pass
            global_dy, global_dy_xmu = (s / ctx.count for s in sums.chunk(2))
            gain = invstd if weight is None else weight.float() * invstd
            # w * invstd * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))), per channel
            grad_input = (dy * gain[CHANNEL] - (gain * global_dy)[CHANNEL]
                          - xmu * (gain * invstd.square() * global_dy_xmu)[CHANNEL]).to(input.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d with the global batch's statistics in training under a process group of several ranks;
    plain nn.BatchNorm2d in eval mode and with one rank or none. Same parameters, buffers and state-dict keys."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group  # None: the default group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        world_size = dist.get_world_size(self.process_group) if dist.is_available() and dist.is_initialized() else 1
        batch_statistics = self.training or self.running_mean is None  # as nn.BatchNorm2d decides
        if world_size == 1 or not batch_statistics:
            return super().forward(input)
        update = self.training and self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        if update:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average; a device tensor, not a float: no host sync
                momentum = self.num_batches_tracked.reciprocal().to(self.running_mean.dtype)
        return SyncBatchNormFunction.apply(input, self.weight, self.bias,
                                           self.running_mean if update else None,
                                           self.running_var if update else None,
                                           self.eps, momentum, self.process_group, world_size)


def convert(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every nn.BatchNorm2d in module by SyncBatchNorm2d, in place, and return module (or the
    replacement when module itself is one). The replacements hold the same Parameter and buffer objects, so
    optimizers built before still update them and state-dict keys stay those of pytorch/examples."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        synced = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, process_group, device="meta")
        for name in ("weight", "bias"):  # None where module has none (affine=False, or bias=False in torch 2.14)
            setattr(synced, name, getattr(module, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            synced.register_buffer(name, getattr(module, name))
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert(child, process_group))
    return module
