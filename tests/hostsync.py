"""A dispatch spy that fails on host syncs: what the no-host-sync tests (tests/test_no_host_sync.py, the sync-BN
ranks of tests/test_syncbn.py) run the hot path under, on the CPU, where CUDA's own sync detector cannot look."""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncError(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Every aten op, forward and backward, passes through here: raise on those that make the host wait for the
    device's data: .item(), float(), bool() (aten._local_scalar_dense, aten.is_nonzero), torch.equal, and those
    whose output shape depends on the data (nonzero, masked_select, indexing with a boolean mask, unique)."""
    DATA_DEPENDENT = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_static", "masked_select",
                      "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "argwhere",
                      "repeat_interleave"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_")
        masks = [i for i in (args[1] if name in ("index", "index_put", "_index_put_impl") else ())
                 if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)]
        if name in self.DATA_DEPENDENT or masks:
            raise HostSyncError(f"host sync: aten.{name}" + (" with a boolean mask" if masks else ""))
        return func(*args, **(kwargs or {}))


def _names_the_cpu(value) -> bool:
    return (isinstance(value, str) and value.split(":")[0] == "cpu") or (
        isinstance(value, torch.device) and value.type == "cpu")


@contextmanager
def no_host_sync():
    """NoHostSync, plus the reads of a tensor into host memory that no aten op shows when the tensor is already
    on the CPU (where these tests run): .tolist(), .numpy(), .cpu(), and .to() a CPU device from fastgan's own
    code. (torch's own same-device moves, such as the GradScaler's scale.to(outputs.device), stay allowed: on the
    CPU a move to the host and one to the training device look alike, and only fastgan's are the code under test.)
    Like the dispatch mode, these apply to the calling (step's) thread only: a loader's pool threads gather on the
    host by design, ahead of the step, and their host buffers' .numpy() views wait for no device."""
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu", "to")}

    spied = threading.get_ident()

    def refuse(name):
        def method(self, *args, **kwargs):
            if threading.get_ident() != spied:
                return originals[name](self, *args, **kwargs)
            raise HostSyncError(f"host sync: .{name}()")
        return method

    def to(self, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if threading.get_ident() == spied and caller.split(".")[0] == "fastgan" and any(
                _names_the_cpu(a) for a in (*args, kwargs.get("device"))):
            raise HostSyncError(f"host sync: .to() a CPU device in {caller}")
        return originals["to"](self, *args, **kwargs)

    for name in ("tolist", "numpy", "cpu"):
        setattr(torch.Tensor, name, refuse(name))
    torch.Tensor.to = to
    try:
        with NoHostSync():
            yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
