"""Run fastgan's command line under torchrun and record, per rank, what the rank trained on and ended with.

    PROBE_DIR=/tmp/x torchrun --standalone --nproc_per_node 2 tests/ddp_probe.py train ...

Writes PROBE_DIR/rank<R>.pt: {"batches": [real batch of each step], "netG": ..., "netD": ..., and with --ema
"netG_ema": ...} (this rank's own modules, not rank 0's checkpoint). PROBE_FAIL="<rank>:<step>" makes that rank raise at that step.
"""
import gc
import os
import sys

import torch

import fastgan.ema
import fastgan.trainer
from fastgan.checkpoint import unwrap
from fastgan.cli import main

rank = int(os.environ.get("RANK", 0))
real_step = fastgan.trainer.train_step
seen, modules = [], {}
fail_rank, fail_step = map(int, os.environ.get("PROBE_FAIL", "-1:-1").split(":"))


def step(netG, netD, optimizerG, optimizerD, real, noise, *args, **kwargs):
    seen.append(real.clone())
    modules["netG"], modules["netD"] = netG, netD
    if rank == fail_rank and len(seen) == fail_step:
        raise RuntimeError(f"probe: simulated failure on rank {rank}")
    return real_step(netG, netD, optimizerG, optimizerD, real, noise, *args, **kwargs)


fastgan.trainer.train_step = step
real_update = fastgan.ema.GeneratorEMA.update


def update(self):
    modules["netG_ema"] = self.model
    real_update(self)


fastgan.ema.GeneratorEMA.update = update
code = main(sys.argv[1:])
if "PROBE_DIR" in os.environ and modules:
    torch.save({"batches": seen, **{k: unwrap(m).state_dict() for k, m in modules.items()}},
               os.path.join(os.environ["PROBE_DIR"], f"rank{rank}.pt"))
# The DDP modules kept here outlive the process group, which fastgan destroyed when it returned: let them go now,
# not in the interpreter's teardown, where a DDP reducer destroyed after its group aborted a rank at exit
# ("terminate called without an active exception", seen twice in full-suite runs). fastgan itself holds none.
modules.clear()
seen.clear()
gc.collect()
sys.exit(code)
