"""What the installed packages must agree on: torchvision is built against one torch release (and one build of it,
CPU or a CUDA version), and a torchvision from another index than torch's fails on import, deep inside its own
modules (`operator torchvision::nms does not exist`). Every command but --help and --version needs torchvision,
so the command line imports it once, first, and turns that failure into one line with the install that fixes it.
"""
from __future__ import annotations

import re
from importlib import metadata

from .errors import FastganError

TORCH_INDEX = "https://download.pytorch.org/whl"  # PyTorch's own wheel index: /cpu, /cu126, ... per build


def require_torchvision() -> None:
    """Import torchvision, or raise one FastganError naming torch's and torchvision's versions and the pip command
    that installs the torchvision built for this torch."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # RuntimeError (an operator missing), ImportError (undefined symbol), OSError (a library)
        raise FastganError(torchvision_mismatch(e)) from None


def matching_torchvision(torch_version: str) -> str:
    """The torchvision release made with a torch release: torch 2.N goes with torchvision 0.(N+15) ('0.24.*' for
    2.9.1); '' where the version does not read as 2.N."""
    match = re.match(r"2\.(\d+)\.", torch_version)
    return f"0.{int(match.group(1)) + 15}.*" if match else ""


def torchvision_mismatch(error: BaseException) -> str:
    """The one line for a torchvision that does not import with this torch."""
    import torch
    torch_version = torch.__version__
    build = torch_version.partition("+")[2]  # "cpu", "cu126": the index it came from ("" for PyPI's)
    wanted = matching_torchvision(torch_version)
    install = ("pip install --force-reinstall --no-deps " + (f'"torchvision=={wanted}"' if wanted else "torchvision")
               + (f" --index-url {TORCH_INDEX}/{build}" if build else ""))
    try:
        vision = f"torchvision {metadata.version('torchvision')}"
    except metadata.PackageNotFoundError:
        return f"torchvision is not installed (torch {torch_version} is); install the one built for it: {install}"
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return (f"{vision} does not load with torch {torch_version} ({reason}): the two come from different builds; "
            f"install the torchvision built for this torch: {install}")
