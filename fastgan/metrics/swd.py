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

Cost, on 16,384 64x64 images: 2.1 M descriptors per level and side, 3 levels x 512 directions = 1,536 sliced
distances of 2 x 2.1 M projections, plus 1.9 TFLOP of projections (torch matmuls). Each sliced distance is the
sum of |sorted real - sorted fake|, computed without sorting most values (gap_sum: the area between the two
empirical distribution functions, exact to float32 rounding). Everything runs on a thread pool as wide as
torch's thread count: the two sets' pyramids, patches and projections side by side, then a task per direction,
each task with its share of torch's threads. Memory: the pyramids (2 x 1.1 GB, each level freed once its patches
are cut), the descriptors (2 x 1.2 GB) and a block of projections (2 x 1 GB), all three reused level to level.
On the 2-core CPU about a minute (bench/RESULTS.md). With a CUDA device the projections and sorts run on the GPU.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FastganError
from .gap_sum import gap_sum

SWD_MIN_RESOLUTION = 16  # the coarsest pyramid level: the original's `while res >= 16`
PATCHES_PER_IMAGE = 128  # 7x7 neighbourhoods drawn per image and level
PATCH_SIZE = 7
DIRECTION_REPEATS = 4
DIRECTIONS_PER_REPEAT = 128
DEFAULT_IMAGES = 16384  # ProGAN's count for CelebA-HQ and LSUN tables

PYRAMID_IMAGES_PER_CHUNK = 32  # the pyramids built 32 images at a time: the blur's temporaries stay small (the
                               # whole set at once took 23% longer and 5.9 GB more, bench/RESULTS.md)
PATCH_IMAGES_PER_CHUNK = 256  # patches gathered 256 images at a time: 5.5 MB of int64 run indices (the whole set's
                              # at once: 0.8 GB more at 16,384 images)
PROJECTIONS_PER_BLOCK = 2 ** 28  # float32 projections held at once per side: 1 GB (all 128 directions up to
                                 # 16,384 images, fewer above)

BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])


def _convolve(images: torch.Tensor, gain: float = 1.0, stride: int = 1) -> torch.Tensor:
    """Each channel of (N, C, H, W) convolved with the 5x5 binomial outer(1 4 6 4 1) / 256 (cv2.pyrDown's) x gain,
    mirror borders (d c b | a b c d), scipy.ndimage's mode='mirror'; stride 2 keeps the outputs at even rows and
    columns, [::2, ::2]."""
    n, c, h, w = images.shape
    kernel = (torch.outer(BINOMIAL, BINOMIAL) * (gain / 256)).view(1, 1, 5, 5)
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect").reshape(n * c, 1, h + 4, w + 4)
    blurred = F.conv2d(padded, kernel, stride=stride)
    return blurred.view(n, c, *blurred.shape[-2:])


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
            what = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                    else type(images).__name__)
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


def _pyramids(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """uint8 (N, C, H, W) -> the Laplacian pyramid of every image, `levels` float32 tensors, finest first; built
    chunk by chunk, once: 16,384 64x64 RGB images hold 1.1 GB (each level's descriptors are as large)."""
    n = len(images)
    pyramid = [torch.empty(n, images.shape[1], images.shape[2] >> k, images.shape[3] >> k) for k in range(levels)]
    for start in range(0, n, PYRAMID_IMAGES_PER_CHUNK):
        chunk = images[start:start + PYRAMID_IMAGES_PER_CHUNK].float()
        for whole, part in zip(pyramid, laplacian_pyramid(chunk, levels)):
            whole[start:start + len(chunk)] = part
    return pyramid


def _descriptors(laplacian: torch.Tensor, xs: np.ndarray, ys: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    """A pyramid level (N, C, S, S) -> its normalised descriptors (N x 128, C x 49), float32, written into `out`
    (every level's have that shape: one buffer serves them all, its pages touched once).

    A neighbourhood is C x 7 runs of 7 consecutive values of the flattened level, one per channel and row: they are
    gathered as rows of an overlapping view of the level (index_select of runs, 7 values per index), five times
    faster than gathering single values by an index each."""
    n, c, size = laplacian.shape[:3]
    half = PATCH_SIZE // 2
    flat = laplacian.reshape(-1)
    runs = flat.as_strided((flat.numel() - PATCH_SIZE + 1, PATCH_SIZE), (1, 1))  # a view: run i is flat[i:i + 7]
    # where each of a neighbourhood's C x 7 runs starts, relative to its centre: channel, then row
    run_starts = (torch.arange(c).view(-1, 1) * size * size + torch.arange(-half, half + 1).view(1, -1) * size
                  - half).view(-1)
    centres = torch.from_numpy(ys * size + xs)  # flat (y, x) of each neighbourhood's centre, (N x 128,)
    descriptors = out.view(n * PATCHES_PER_IMAGE, c, PATCH_SIZE, PATCH_SIZE)
    for start in range(0, n, PATCH_IMAGES_PER_CHUNK):  # in chunks: 5.5 MB of int64 run indices at a time
        count = min(PATCH_IMAGES_PER_CHUNK, n - start)
        rows = slice(start * PATCHES_PER_IMAGE, (start + count) * PATCHES_PER_IMAGE)
        image_index = start + torch.arange(count * PATCHES_PER_IMAGE) // PATCHES_PER_IMAGE
        first = image_index * (c * size * size) + centres[rows]
        torch.index_select(runs, 0, (first.view(-1, 1) + run_starts).view(-1),
                           out=descriptors[rows].view(-1, PATCH_SIZE))
    # per channel over all neighbourhoods and their 7x7 pixels; the population std (numpy's, correction 0)
    std, mean = torch.std_mean(descriptors, dim=(0, 2, 3), correction=0, keepdim=True)
    if not bool((std > 0).all()):
        raise FastganError(f"SWD is undefined for images without any variation at {size} px (a constant set)")
    return descriptors.sub_(mean).div_(std).view(len(descriptors), -1)


def _unit_directions(rng: np.random.Generator, dims: int) -> torch.Tensor:
    """(dims, 128) Gaussian directions, each column of unit length: drawn and scaled in float64, then float32."""
    directions = rng.standard_normal((dims, DIRECTIONS_PER_REPEAT))
    directions /= np.sqrt(np.sum(np.square(directions), axis=0, keepdims=True))
    return torch.from_numpy(directions.astype(np.float32))


@contextmanager
def _threads_restored():
    """Yields torch's thread count, and sets it back on leaving: the pool's tasks set their own (_map), which is
    the whole process's count too while they run."""
    threads = torch.get_num_threads()
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def _map(pool: ThreadPoolExecutor, threads: int, function: Callable, *iterables) -> list:
    """pool.map with torch on `threads` threads in each task. The pool's threads run their tasks side by side, so
    each gets its share of the cores rather than a team of all of them (2 x 2 threads on 2 cores, each spinning
    while it waits for the other). Each task sets the count itself: OpenMP keeps a count per thread, and a pool
    thread goes on with the one it first ran with, whatever the caller sets afterwards."""
    def task(*args):
        torch.set_num_threads(threads)
        return function(*args)
    return list(pool.map(task, *iterables))


def _project(descriptors: torch.Tensor, directions: torch.Tensor, out: torch.Tensor) -> None:
    """out (k, M) = the projections of descriptors (M, D) on directions (D, k), each direction's a contiguous row
    (for gap_sum)."""
    torch.mm(directions.T, descriptors.T, out=out)


def _projection_buffers(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (k, count) float32 buffers, the real and fake projections of a block of k directions: as many of a
    repeat's DIRECTIONS_PER_REPEAT as PROJECTIONS_PER_BLOCK values allow, at least one."""
    block = max(1, min(DIRECTIONS_PER_REPEAT, PROJECTIONS_PER_BLOCK // count))
    return torch.empty(block, count), torch.empty(block, count)


def _sliced_wasserstein(real: torch.Tensor, fake: torch.Tensor, rng: np.random.Generator, pool: ThreadPoolExecutor,
                        progress: Callable[[int], None], device: torch.device = torch.device("cpu"),
                        rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                        threads: Optional[int] = None) -> float:
    """Mean over DIRECTION_REPEATS repeats of the mean |sorted real - sorted fake| projection, over all
    descriptors and directions; real and fake (M, D) are projected on the same directions. The pool projects the
    two sides side by side (half of torch's threads each), then measures each direction's sliced distance
    (gap_sum) as a task, on one torch thread each.
    `rows`: two (k, M) buffers from _projection_buffers (k directions a block), reused from the last level when
    given; `threads`: torch's thread count to share out, by default what it is now. On a GPU (`device`) the
    projections and their sorts run there (torch.sort), the draws staying numpy's on the CPU."""
    if device.type != "cpu":
        return _sliced_wasserstein_on(real.to(device), fake.to(device), rng, progress)
    count = len(real)
    halves = max(1, (threads or torch.get_num_threads()) // 2)
    real_rows, fake_rows = rows if rows is not None else _projection_buffers(count)
    block = len(real_rows)
    means = []
    with _threads_restored():
        for _ in range(DIRECTION_REPEATS):
            directions = _unit_directions(rng, real.shape[1])
            total = 0.0
            for start in range(0, DIRECTIONS_PER_REPEAT, block):
                chosen = directions[:, start:start + block].contiguous()  # (D, k)
                k = chosen.shape[1]
                _map(pool, halves, _project, (real, fake), (chosen, chosen), (real_rows[:k], fake_rows[:k]))
                total += sum(_map(pool, 1, gap_sum, real_rows[:k], fake_rows[:k]))
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
    projections and sorts run on the GPU (the descriptors are cut on the CPU): the same figures to float rounding
    (its speed there not yet measured: bench/gpu_check.py's swd-speed part times it)."""
    _check_images(real, fake)
    device = torch.device(device)
    real, fake = real.cpu(), fake.cpu()
    n, c, h, w = real.shape
    resolutions = swd_resolutions(h)
    progress = progress or (lambda k: None)
    rng = np.random.default_rng(seed)
    half = PATCH_SIZE // 2
    results = {}
    with ThreadPoolExecutor(max_workers=max(torch.get_num_threads(), 1)) as pool, _threads_restored() as threads:
        # the two sets' pyramids and patches side by side, half of torch's threads each: on 2 cores torch's own
        # threads gain little there, two sides at once do
        halves = max(1, threads // 2)
        pyramids = _map(pool, halves, _pyramids, (real, fake), (len(resolutions),) * 2)
        count = n * PATCHES_PER_IMAGE
        descriptors = [torch.empty(count, c * PATCH_SIZE ** 2) for _ in range(2)]  # shared by the levels
        rows = _projection_buffers(count) if device.type == "cpu" else None
        for level, size in enumerate(resolutions):
            draws = [(rng.integers(half, size - half, size=count), rng.integers(half, size - half, size=count))
                     for _ in range(2)]  # real's xs and ys, then fake's: the recipe's order
            _map(pool, halves, lambda side: _descriptors(pyramids[side][level], *draws[side], out=descriptors[side]),
                 range(2))
            for pyramid in pyramids:
                pyramid[level] = None  # cut: the level's memory goes back before its projections are made
            results[f"swd{size}"] = _sliced_wasserstein(*descriptors, rng, pool, progress, device, rows,
                                                        threads) * 1e3
    results["swd"] = float(np.mean(list(results.values())))
    return results
