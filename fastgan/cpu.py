"""What the CPU offers a run: whether it computes bf16 with its own instructions (--amp), and how many threads
torch's step uses (--threads).

bf16: without AVX512-BF16 or AMX, oneDNN emulates bf16 convolutions, and bf16 autocast runs slower than fp32
(bench/RESULTS.md: 2x slower with AVX-512, 10x with AVX2 only), so --amp (auto) trains in fp32 there.

Threads: torch's OpenMP threads meet at the end of every parallel region, thousands per step. Where other programs
take cores, a thread the scheduler has set aside holds up the others until its next turn, so a thread per core
trains several times slower than one thread (bench/threads.py). fastgan's own threads sleep while they wait
(OMP_WAIT_POLICY=PASSIVE, set in fastgan/__init__.py before torch loads OpenMP), and --threads sets their number.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that compute on bf16 (/proc/cpuinfo's names)
# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA): the names of the ISAs that hold bf16 instructions; below them oneDNN
# emulates bf16 even on a CPU that has them
ONEDNN_BF16_ISA_WORDS = ("BF16", "AMX", "FP16", "AVX10")


def cpu_flags() -> Optional[set[str]]:
    """The CPU's feature flags as /proc/cpuinfo lists them, or None where there is no such file (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()}


def onednn_isa_cap() -> Optional[str]:
    """ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA) where it keeps oneDNN, which runs the CPU's
    convolutions, below the ISAs with bf16 instructions, or None."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return None if cap in ("ALL", "DEFAULT") or any(word in cap for word in ONEDNN_BF16_ISA_WORDS) else cap


def why_bf16_is_emulated() -> Optional[str]:
    """Why this CPU would emulate bf16 convolutions, or None where it runs them on bf16 instructions (AVX512-BF16
    or AMX). The flags come from /proc/cpuinfo; elsewhere from torch's probe of an x86 CPU (none on other CPUs,
    where fastgan has not measured bf16)."""
    flags = cpu_flags()
    if flags is None:
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        has_instructions = bool(probe and probe())
    else:
        has_instructions = any(flag in flags for flag in BF16_FLAGS)
    if not has_instructions:
        return f"this CPU has no bf16 instructions ({', '.join(BF16_FLAGS)})"
    cap = onednn_isa_cap()
    return f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN from this CPU's bf16 instructions" if cap else None


def use_threads(asked: Optional[int]) -> int:
    """Give torch's step `asked` threads (--threads), or where None keep torch's own count (OMP_NUM_THREADS where
    set, as torchrun sets it, else one per core); return the count the run uses."""
    if asked is not None:
        torch.set_num_threads(asked)
    return torch.get_num_threads()
