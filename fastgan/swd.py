"""Sliced Wasserstein distance (SWD) between two image sets: the recipe of Karras et al. 2018 (ProGAN,
progressive_growing_of_gans/metrics/sliced_wasserstein.py), exactly, with no download and no scipy.

Per resolution of a Laplacian pyramid (the image size down to 16 px: 64x64 gives 64, 32, 16), each image gives
128 random 7x7 neighbourhoods of all its channels; each level's descriptors are normalised per channel over the
whole set, projected onto 4 x 128 random unit directions, and the sorted projections of the real and fake sets
are compared: the mean |sorted real - sorted fake|, x 1e3. One figure per resolution and their mean.

Images enter as uint8 0..255 made float32 (not rescaled to [-1, 1]), as in the original. C is handled generally
(descriptors have C x 49 components); the original asserts C = 3, for which the two agree.

Random draws come from `numpy.random.default_rng(seed)`, in this order, level after level (finest first):
    for side in (real, fake):  xs = rng.integers(3, w - 3, size=n * 128); ys = rng.integers(3, h - 3, size=n * 128)
    for each of 4 repeats:     dirs = rng.standard_normal((c * 49, 128)), each column scaled to unit length, float32
so the real and fake projections of a level share their directions, as the original feeds A and B to one call.
The descriptor of centre (x, y) is image[:, y-3:y+4, x-3:x+4] (rows, then columns); the original reads it
transposed, a fixed permutation of the components that i.i.d. Gaussian directions cannot tell apart.

Cost, on 16,384 64x64 images: 2.1 M descriptors per level and side, 3 levels x 512 directions x 2 sides = 3,072
sorts of 2.1 M float32 plus 1.9 TFLOP of projections. The sorts (numpy's, which release the GIL) run on a thread
pool as wide as torch's intra-op threads; projections are torch matmuls. Levels are done one at a time: the
peak memory is one level's descriptors of both sets (2 x 1.2 GB) plus a block of projections (2 x 270 MB).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import FastganError

SWD_MIN_RESOLUTION = 16  # the coarsest pyramid level: the original's `while res >= 16`
PATCHES_PER_IMAGE = 128  # 7x7 neighbourhoods drawn per image and level
PATCH_SIZE = 7
DIRECTION_REPEATS = 4
DIRECTIONS_PER_REPEAT = 128
DEFAULT_IMAGES = 16384  # ProGAN's count for CelebA-HQ and LSUN tables

IMAGES_PER_CHUNK = 256  # pyramid and patch gathering, per chunk: 256 x 128 x 147 int64 indices = 39 MB
PROJECTIONS_PER_BLOCK = 2 ** 26  # float32 projections held at once per side: 270 MB (32 of 128 directions at
                                 # 16,384 images, all 128 below 4,096 images)

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
GAUSSIAN_FILTER = torch.outer(_BINOMIAL, _BINOMIAL) / 256  # 5x5, sums to 1: cv2.pyrDown's kernel
_TAPS = (_BINOMIAL / 16).tolist()  # GAUSSIAN_FILTER is their outer product: the blur runs as two 5-tap passes


def _convolve(images: torch.Tensor, gain: float = 1.0, stride: int = 1) -> torch.Tensor:
    """Each channel of (N, C, H, W) convolved with GAUSSIAN_FILTER x gain, mirror borders (d c b | a b c d),
    scipy.ndimage's mode='mirror'; stride 2 keeps the outputs at even rows and columns, [::2, ::2].

    Two 1-D passes of shifted slices: a single-channel 5x5 conv2d is several times slower on the CPU."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    taps = [tap * gain ** 0.5 for tap in _TAPS]  # gain 4: 2 per pass, exact in binary
    across = sum(tap * padded[..., k:k + w:stride] for k, tap in enumerate(taps))
    return sum(tap * across[..., k:k + h:stride, :] for k, tap in enumerate(taps))


def pyr_down(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H/2, W/2): blur, then every second row and column (cv2.pyrDown)."""
    return _convolve(images, stride=2)


def pyr_up(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W): the values at even rows and columns, zeros between, blurred with 4x the
    kernel (4: three of four pixels are zeros, so the mean is kept; cv2.pyrUp)."""
    n, c, h, w = images.shape
    spread = images.new_zeros(n, c, 2 * h, 2 * w)
    spread[:, :, ::2, ::2] = images
    return _convolve(spread, gain=4.0)


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """float32 (N, C, H, W) -> `levels` tensors, finest first: each level minus the upsampled next one, the last
    level left whole. H and W must halve exactly levels - 1 times."""
    if images.dtype != torch.float32 or images.ndim != 4:
        raise FastganError(f"laplacian_pyramid takes float32 (N, C, H, W) images, got {images.dtype} "
                           f"{tuple(images.shape)}")
    if levels < 1 or images.shape[-1] % 2 ** (levels - 1) or images.shape[-2] % 2 ** (levels - 1):
        raise FastganError(f"a {levels}-level pyramid needs sides divisible by {2 ** max(levels - 1, 0)}, "
                           f"got {images.shape[-2]}x{images.shape[-1]}")
    pyramid = [images.clone()]  # clone: the levels are changed in place below
    for _ in range(1, levels):
        pyramid.append(pyr_down(pyramid[-1]))
        pyramid[-2] -= pyr_up(pyramid[-1])
    return pyramid


def swd_resolutions(image_size: int) -> list[int]:
    """The pyramid's resolutions for square images of `image_size` px: 64 -> [64, 32, 16]."""
    resolutions = []
    while image_size >= SWD_MIN_RESOLUTION:
        resolutions.append(image_size)
        image_size //= 2
    return resolutions


def _check_images(real: torch.Tensor, fake: torch.Tensor) -> None:
    for name, images in (("real", real), ("fake", fake)):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise FastganError(f"SWD takes uint8 (N, C, H, W) images of 0..255; the {name} images are {what}")
    if real.shape != fake.shape:
        raise FastganError(f"SWD compares equal sets: real {tuple(real.shape)} against fake {tuple(fake.shape)}")
    n, _, h, w = real.shape
    if n == 0:
        raise FastganError("SWD needs at least one image of each set")
    if h != w or h < SWD_MIN_RESOLUTION:
        raise FastganError(f"SWD needs square images of at least {SWD_MIN_RESOLUTION}x{SWD_MIN_RESOLUTION} px, "
                           f"got {h}x{w}")
    levels = len(swd_resolutions(h))
    if h % 2 ** (levels - 1):
        raise FastganError(f"SWD's pyramid halves {h} px down to {swd_resolutions(h)[-1]} px: the size must be "
                           f"divisible by {2 ** (levels - 1)}")


def _patch_offsets(channels: int, height: int, width: int) -> torch.Tensor:
    """(C, 7, 7) offsets into one flattened (C, H, W) image of a neighbourhood around its centre."""
    half = PATCH_SIZE // 2
    steps = torch.arange(-half, half + 1)
    return (torch.arange(channels).view(-1, 1, 1) * height * width + steps.view(1, -1, 1) * width
            + steps.view(1, 1, -1))


def _descriptors(images: torch.Tensor, level: int, levels: int, xs: np.ndarray, ys: np.ndarray) -> torch.Tensor:
    """uint8 images -> the level's normalised descriptors (N x 128, C x 49), float32.

    The pyramid is rebuilt chunk by chunk for each level (only down to the next level: `level + 2`) rather than
    held for all levels at once: it costs a few seconds and keeps one level's descriptors the largest thing held."""
    n, c = images.shape[:2]
    size = images.shape[-1] >> level
    offsets = _patch_offsets(c, size, size)
    centres = torch.from_numpy(ys * size + xs)  # flat (y, x) of each neighbourhood's centre, (N x 128,)
    descriptors = torch.empty(n * PATCHES_PER_IMAGE, c, PATCH_SIZE, PATCH_SIZE)
    for start in range(0, n, IMAGES_PER_CHUNK):
        chunk = images[start:start + IMAGES_PER_CHUNK].float()
        laplacian = laplacian_pyramid(chunk, min(level + 2, levels))[level]
        rows = slice(start * PATCHES_PER_IMAGE, (start + len(chunk)) * PATCHES_PER_IMAGE)
        image_index = torch.arange(len(chunk) * PATCHES_PER_IMAGE) // PATCHES_PER_IMAGE
        flat = image_index * (c * size * size) + centres[rows]
        descriptors[rows] = laplacian.reshape(-1)[flat.view(-1, 1, 1, 1) + offsets]
    # per channel over all neighbourhoods and their 7x7 pixels; correction=0: numpy's population std
    std, mean = torch.std_mean(descriptors, dim=(0, 2, 3), correction=0, keepdim=True)
    if not bool((std > 0).all()):
        raise FastganError(f"SWD is undefined for images without any variation at {size} px (a constant set)")
    return descriptors.sub_(mean).div_(std).view(len(descriptors), -1)


def _unit_directions(rng: np.random.Generator, dims: int) -> torch.Tensor:
    """(dims, 128) Gaussian directions, each column of unit length: drawn and scaled in float64, then float32."""
    directions = rng.standard_normal((dims, DIRECTIONS_PER_REPEAT))
    directions /= np.sqrt(np.sum(np.square(directions), axis=0, keepdims=True))
    return torch.from_numpy(directions.astype(np.float32))


def _row_distance(real_rows: np.ndarray, fake_rows: np.ndarray, row: int) -> float:
    """Sum of |sorted real - sorted fake| of one direction's projections, in place; numpy sorts float32 with
    SIMD and, like the subtraction and the sum, without the GIL, so rows run in parallel on a thread pool."""
    real, fake = real_rows[row], fake_rows[row]
    real.sort()
    fake.sort()
    np.subtract(real, fake, out=real)
    return float(np.abs(real, out=real).sum(dtype=np.float64))


def _sliced_wasserstein(real: torch.Tensor, fake: torch.Tensor, rng: np.random.Generator, pool: ThreadPoolExecutor,
                        progress: Callable[[int], None], device: torch.device = torch.device("cpu")) -> float:
    """Mean over DIRECTION_REPEATS repeats of the mean |sorted real - sorted fake| projection, over all
    descriptors and directions; real and fake (M, D) are projected on the same directions. On a GPU (`device`)
    the projections and their sorts run there (torch.sort), the draws staying numpy's on the CPU."""
    if device.type != "cpu":
        return _sliced_wasserstein_on(real.to(device), fake.to(device), rng, progress)
    count = len(real)
    # few large matmuls: each parallel torch op costs a thread wake-up, which a loaded machine makes dear
    block = max(1, min(DIRECTIONS_PER_REPEAT, PROJECTIONS_PER_BLOCK // count))
    means = []
    for _ in range(DIRECTION_REPEATS):
        directions = _unit_directions(rng, real.shape[1])
        total = 0.0
        for start in range(0, DIRECTIONS_PER_REPEAT, block):
            chosen = directions[:, start:start + block].T  # (k, D)
            # (k, M): each direction's projections contiguous, for numpy's in-place row sorts
            real_rows, fake_rows = torch.mm(chosen, real.T).numpy(), torch.mm(chosen, fake.T).numpy()
            total += sum(pool.map(_row_distance, repeat(real_rows), repeat(fake_rows), range(len(chosen))))
        means.append(total / (count * DIRECTIONS_PER_REPEAT))
        progress(1)
    return float(np.mean(means))


def _sliced_wasserstein_on(real: torch.Tensor, fake: torch.Tensor, rng: np.random.Generator,
                           progress: Callable[[int], None]) -> float:
    """_sliced_wasserstein with real and fake on a GPU: the same draws, the same sums (in float64)."""
    count = len(real)
    block = max(1, min(DIRECTIONS_PER_REPEAT, PROJECTIONS_PER_BLOCK // count))
    means = []
    for _ in range(DIRECTION_REPEATS):
        directions = _unit_directions(rng, real.shape[1]).to(real.device)
        total = torch.zeros((), dtype=torch.float64, device=real.device)
        for start in range(0, DIRECTIONS_PER_REPEAT, block):
            chosen = directions[:, start:start + block].T
            real_rows = torch.mm(chosen, real.T).sort(dim=1).values
            fake_rows = torch.mm(chosen, fake.T).sort(dim=1).values
            total += real_rows.sub_(fake_rows).abs_().sum(dtype=torch.float64)
        means.append(float(total) / (count * DIRECTIONS_PER_REPEAT))  # note: a sync per repeat, for progress
        progress(1)
    return float(np.mean(means))


def sliced_wasserstein_distance(real: torch.Tensor, fake: torch.Tensor, seed: int = 0,
                                progress: Optional[Callable[[int], None]] = None,
                                device: str | torch.device = "cpu") -> dict[str, float]:
    """SWD x 1e3 of two uint8 (N, C, H, W) CPU image sets of equal shape: {"swd64": ..., "swd32": ...,
    "swd16": ..., "swd": their mean} for 64x64 images (keys named by the resolutions present).

    `seed` seeds numpy's default_rng, which draws every neighbourhood and direction (the module docstring gives
    the order). progress(1) is called after each repeat of each level: len(swd_resolutions(H)) x
    DIRECTION_REPEATS calls in all (12 for 64x64), about equal amounts of work. With a CUDA `device` the
    projections and sorts run on the GPU (the descriptors are cut on the CPU): the same figures to float rounding,
    in seconds instead of minutes."""
    _check_images(real, fake)
    device = torch.device(device)
    real, fake = real.cpu(), fake.cpu()
    n, c, h, w = real.shape
    resolutions = swd_resolutions(h)
    progress = progress or (lambda k: None)
    rng = np.random.default_rng(seed)
    half = PATCH_SIZE // 2
    results = {}
    with ThreadPoolExecutor(max_workers=max(torch.get_num_threads(), 1)) as pool:
        for level, size in enumerate(resolutions):
            descriptors = []
            for images in (real, fake):
                xs = rng.integers(half, size - half, size=n * PATCHES_PER_IMAGE)
                ys = rng.integers(half, size - half, size=n * PATCHES_PER_IMAGE)
                descriptors.append(_descriptors(images, level, len(resolutions), xs, ys))
            results[f"swd{size}"] = _sliced_wasserstein(*descriptors, rng, pool, progress, device) * 1e3
    results["swd"] = float(np.mean(list(results.values())))
    return results
