"""What gpu_check's env part reports: Python, torch, CUDA, cuDNN, the GPUs and their driver, DALI.

    python bench/gpu_env.py       # one line: ENVIRONMENT {"python": ..., "torch": ..., "gpus": 1, ...}

Run as a command of its own (gpu_check runs it in the env part), so that importing torch, CUDA's first call or
nvidia-smi cannot hang or crash the check itself. Needs torch only: no fastgan, and DALI where it imports.
"""
from __future__ import annotations

import json
import platform
import subprocess

import torch


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
            "gpus": torch.cuda.device_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["bf16"] = torch.cuda.is_bf16_supported()
    info["driver"] = driver_version()
    try:
        import nvidia.dali
        info["dali"] = nvidia.dali.__version__
    except Exception as e:  # noqa: BLE001 (not installed, or its libraries do not load): the DALI parts' "skipped"
        # line says why
        info["dali"] = None
        info["dali_absent_because"] = f"{type(e).__name__}: {e}"
    return info


def driver_version() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it, or None without nvidia-smi or a driver."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None


if __name__ == "__main__":
    print("ENVIRONMENT " + json.dumps(environment()))
