"""`fastgan generate`: faces from a trained generator (a fastgan checkpoint, or a pytorch/examples netG*.pth)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint
from .errors import FastganError
from .distributed import resolve_device
from .sampling import sample
from .models import Generator
from .report import image_grid, save_image_atomic


def load_generator(path: str | os.PathLike, device: torch.device = torch.device("cpu")) -> Generator:
    """The generator in `path`, its shape (nz, ngf, nc, image size) read off the weights."""
    payload = checkpoint.read_file(path)
    state = checkpoint.generator_state(payload, path)
    shape = checkpoint.infer_generator_shape(state, path)
    netG = Generator(shape["nz"], shape["ngf"], shape["nc"], shape["image_size"])
    try:
        netG.load_state_dict(state)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()
        raise FastganError(f"{path} does not match a DCGAN generator of {shape}: {detail}") from None
    return netG.to(device)


def generate(checkpoint_path: str | os.PathLike, n: int = 64, seed: Optional[int] = None,
             out: str | os.PathLike = "generated.png", individual: Optional[str | os.PathLike] = None,
             device: str = "auto") -> Path:
    """Write a grid of n generated images to `out` (and one PNG per image to `individual`); return `out`."""
    if n < 1:
        raise FastganError(f"--n must be a positive integer, got {n}")
    out = Path(out).expanduser()
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise FastganError(f"--out {out} needs an image extension such as .png")
    if out.exists():
        raise FastganError(f"--out {out} already exists; choose another name (fastgan overwrites nothing)")
    if individual is not None and Path(individual).expanduser().is_dir():
        taken = [f"{i:05d}.png" for i in range(n) if (Path(individual).expanduser() / f"{i:05d}.png").exists()]
        if taken:
            raise FastganError(f"--individual {individual} already holds {taken[0]}; choose an empty folder")
    torch_device = resolve_device(device)
    netG = load_generator(checkpoint_path, torch_device)
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    noise = torch.randn(n, netG.main[0].in_channels, 1, 1, generator=generator).to(torch_device)
    images = sample(netG, noise).cpu()
    try:
        save_image_atomic(image_grid(images), out)
        if individual is not None:
            folder = Path(individual).expanduser()
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                save_image_atomic(image_grid(image[None], nrow=1).crop((2, 2, image.shape[-1] + 2,
                                                                         image.shape[-2] + 2)),
                                  folder / f"{i:05d}.png")
    except OSError as e:
        raise FastganError(f"cannot write {e.filename or out}: {e.strerror or e}") from None
    return out
