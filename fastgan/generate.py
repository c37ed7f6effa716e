"""`fastgan generate`: faces from a trained generator (a fastgan checkpoint, or a pytorch/examples netG*.pth),
as a grid of samples or as rows of latent interpolations (a grid and an animated GIF).

A training checkpoint made with --ema holds two generators: the moving average (netG_ema), which generate uses,
and the raw one (netG), which --no-ema picks."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from . import checkpoint
from .atomic import atomic_write
from .config import seed_problem
from .errors import FastganError
from .distributed import resolve_device
from .sampling import sample
from .models import Generator
from .report import image_grid, save_image_atomic, single_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MS_PER_INTERPOLATION_FRAME = 120  # 8 steps there and back in under 2 s: slow enough to follow one face
GIF_MIN_IMAGE_PX = 128  # the GIF's faces are scaled up (nearest neighbour, whole multiples) to at least this size
# below this sin(w) (w the angle between two latents, in radians) slerp falls back to lerp: see slerp
PARALLEL_SIN = 1e-6


def read_generator(path: str | os.PathLike, device: torch.device = torch.device("cpu"),
                   ema: bool = True) -> tuple[Generator, str]:
    """The generator in `path` (a checkpoint or generator file, or a run folder: its checkpoints/last.pt), its shape
    (nz, ngf, nc, image size) read off the weights, and which generator it is, worded for the final line: "the EMA
    generator", "the raw generator (...)" or "the generator in X", with "of FILE" for a run folder's."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return generator_from_payload(checkpoint.read_file(path), path, device, ema)
    last = checkpoint.last_in(folder)
    if last is None:
        raise FastganError(f"--checkpoint {folder} is a folder without checkpoints/last.pt, not a fastgan run folder; "
                           "give a run folder, a checkpoint (RUN/checkpoints/epoch001.pt) or a generator file "
                           "(RUN/netG.pth)")
    netG, source = generator_from_payload(checkpoint.read_file(last), last, device, ema)
    return netG, f"{source} of {last}"


def generator_from_payload(payload, path: str | os.PathLike, device: torch.device = torch.device("cpu"),
                           ema: bool = True) -> tuple[Generator, str]:
    """read_generator for a file already read (`path` names it in messages)."""
    state = checkpoint.generator_state(payload, path, ema=ema)
    shape = checkpoint.infer_generator_shape(state, path)
    netG = Generator(shape["nz"], shape["ngf"], shape["nc"], shape["image_size"])
    try:
        netG.load_state_dict(state)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()
        raise FastganError(f"{path} does not match a DCGAN generator of {shape}: {detail}") from None
    return netG.to(device), which_generator(payload, path, ema)


def which_generator(payload, path: str | os.PathLike, ema: bool) -> str:
    """The generator checkpoint.generator_state(payload, path, ema=ema) returns, as the final line names it."""
    if not checkpoint.is_fastgan_checkpoint(payload):  # a plain state dict (netG.pth, netG_ema.pth): as it is
        return f"the generator in {Path(path).name}"
    if payload.get("netG_ema") is None:
        return "the raw generator (the checkpoint holds no EMA one)"
    return "the EMA generator" if ema else "the raw generator (--no-ema)"


def load_generator(path: str | os.PathLike, device: torch.device = torch.device("cpu"),
                   ema: bool = True) -> Generator:
    """The generator in `path` (the EMA one where a checkpoint holds one, unless ema=False)."""
    return read_generator(path, device, ema)[0]


def new_image_path(out: str | os.PathLike) -> Path:
    """`out` as a path for a new image: an image extension, and no file there already."""
    out = Path(out).expanduser()
    if out.suffix.lower() not in IMAGE_EXTENSIONS:
        raise FastganError(f"--out {out} needs an image extension such as .png")
    refuse_existing(out)
    return out


def refuse_existing(path: Path) -> None:
    if path.exists():
        raise FastganError(f"--out {path} already exists; choose another name (fastgan overwrites nothing)")


def latents(n: int, nz: int, seed: Optional[int]) -> torch.Tensor:
    """n latents of N(0, 1), [n, nz, 1, 1], from their own generator: one seed, the same latents, on any device."""
    if seed is not None and seed_problem(seed):
        raise FastganError(f"--seed {seed_problem(seed)}")
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    return torch.randn(n, nz, 1, 1, generator=generator)


def generate(checkpoint_path: str | os.PathLike, n: int = 64, seed: Optional[int] = None,
             out: str | os.PathLike = "generated.png", individual: Optional[str | os.PathLike] = None,
             device: str = "auto", ema: bool = True) -> Path:
    """Write a grid of n generated images to `out` (and one PNG per image to `individual`); return `out`."""
    return write_samples(checkpoint_path, n, seed, out, individual, device, ema)[0]


def write_samples(checkpoint_path, n, seed, out, individual, device, ema) -> tuple[Path, str]:
    """generate(), also returning which generator made the images (for the command's final line)."""
    if n < 1:
        raise FastganError(f"--n must be a positive integer, got {n}")
    out = new_image_path(out)
    if individual is not None and Path(individual).expanduser().is_dir():
        taken = [f"{i:05d}.png" for i in range(n) if (Path(individual).expanduser() / f"{i:05d}.png").exists()]
        if taken:
            raise FastganError(f"--individual {individual} already holds {taken[0]}; choose an empty folder")
    torch_device = resolve_device(device)
    netG, source = read_generator(checkpoint_path, torch_device, ema)
    noise = latents(n, netG.main[0].in_channels, seed).to(torch_device)
    images = sample(netG, noise).cpu()
    try:
        save_image_atomic(image_grid(images), out)
        if individual is not None:
            folder = Path(individual).expanduser()
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                save_image_atomic(single_image(image), folder / f"{i:05d}.png")
    except OSError as e:
        raise FastganError(f"cannot write {e.filename or out}: {e.strerror or e}") from None
    return out, source


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from a (t = 0) to b (t = 1) along the great circle through them, of a's shape:
    sin((1-t) w)/sin(w) a + sin(t w)/sin(w) b, w the angle between the flattened vectors. Gaussian latents
    live near a sphere of radius sqrt(nz); lerp's chord cuts inside it (to 0.71 of the radius halfway between
    orthogonal ends) where G saw no latents in training, slerp's arc keeps their norm.

    Where sin(w) < PARALLEL_SIN it is lerp: for w ~ 0 both quotients are 0/0 in rounding, and the arc of such
    parallel vectors is the chord to within w^2/8 (1e-13 relative there, far below float32's resolution);
    for w ~ pi (opposite vectors) no single great circle joins them, and lerp's line is an honest answer."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos_w = torch.dot(a64, b64) / (a64.norm() * b64.norm())
    w = torch.arccos(cos_w.clamp(-1.0, 1.0))  # rounding can push the cosine of parallel vectors past 1
    sin_w = torch.sin(w)
    if sin_w < PARALLEL_SIN:
        mixed = (1 - t) * a64 + t * b64
    else:
        mixed = torch.sin((1 - t) * w) / sin_w * a64 + torch.sin(t * w) / sin_w * b64
    return mixed.reshape(a.shape).to(a.dtype)


def interpolation_latents(ends: torch.Tensor, steps: int) -> torch.Tensor:
    """[rows * steps, nz, 1, 1]: row i walks from ends[i] to ends[i + 1] in `steps` latents, both included."""
    return torch.stack([slerp(start, end, k / (steps - 1))
                        for start, end in zip(ends[:-1], ends[1:]) for k in range(steps)])


def interpolate(checkpoint_path: str | os.PathLike, rows: int = 8, steps: int = 8, seed: Optional[int] = None,
                out: str | os.PathLike = "interpolation.png", device: str = "auto", ema: bool = True) -> Path:
    """Write `rows` slerp interpolations of `steps` images each (row i from latent i to latent i + 1, both
    included) as a grid to `out`, one row per interpolation, and as an animated GIF beside it (`out` with
    .gif) whose frames walk all rows along their interpolation and back, its faces scaled up to at least
    GIF_MIN_IMAGE_PX; return the grid's path. An `out` ending in .gif names the GIF, the grid going beside it
    as .png.

    The rows + 1 latents are those `generate(n=rows + 1, seed=seed)` draws, so each row starts and ends on
    faces of that grid."""
    return write_interpolation(checkpoint_path, rows, steps, seed, out, device, ema)[0]  # the grid


def write_interpolation(checkpoint_path, rows, steps, seed, out, device, ema) -> tuple[Path, str]:
    """interpolate(), returning (the grid, the GIF, which generator made the images) for the command's final
    line."""
    if rows < 1:
        raise FastganError(f"--n (rows of interpolation) must be a positive integer, got {rows}")
    if steps < 2:
        raise FastganError(f"--interpolate needs at least 2 steps (both ends of each row), got {steps}")
    # --out names the grid (and the GIF goes beside it) or, with .gif, the GIF (and the grid beside it, as .png)
    wanted = Path(out).expanduser()
    gif_named = wanted.suffix.lower() == ".gif"
    out = new_image_path(wanted.with_suffix(".png") if gif_named else wanted)
    gif = wanted if gif_named else out.with_suffix(".gif")
    refuse_existing(gif)
    torch_device = resolve_device(device)
    netG, source = read_generator(checkpoint_path, torch_device, ema)
    ends = latents(rows + 1, netG.main[0].in_channels, seed)
    images = sample(netG, interpolation_latents(ends, steps).to(torch_device)).cpu()
    by_step = images.reshape(rows, steps, *images.shape[1:]).transpose(0, 1)  # [steps, rows, C, H, W]
    # there and back: the turning points once each, so the loop neither stalls at an end nor jumps
    walk = list(range(steps)) + list(range(steps - 2, 0, -1))
    try:
        save_image_atomic(image_grid(images, nrow=steps), out)
        scale = max(1, math.ceil(GIF_MIN_IMAGE_PX / images.shape[-1]))
        save_gif([scaled(image_grid(by_step[k]), scale) for k in walk], gif, MS_PER_INTERPOLATION_FRAME)
    except OSError as e:
        raise FastganError(f"cannot write {e.filename or out}: {e.strerror or e}") from None
    return out, gif, source


def scaled(image: Image.Image, factor: int) -> Image.Image:
    """`image` `factor` times larger, each pixel a block (no blur: the generator's pixels as they are)."""
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def save_gif(frames: list[Image.Image], path: Path, ms_per_frame: int) -> None:
    """An animated, looping GIF of `frames`, written as report.save_animation writes one (from images in
    memory rather than files)."""
    paletted = [frame.convert("RGB").quantize(256) for frame in frames]
    with atomic_write(path) as f:
        paletted[0].save(f, format="GIF", save_all=True, append_images=paletted[1:], duration=ms_per_frame,
                         loop=0)
