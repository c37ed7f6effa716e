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

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FastganError

SWD_MIN_RESOLUTION = 16  # the coarsest pyramid level: the original's `while res >= 16`
PATCHES_PER_IMAGE = 128  # 7x7 neighbourhoods drawn per image and level
PATCH_SIZE = 7
DIRECTION_REPEATS = 4
DIRECTIONS_PER_REPEAT = 128
DEFAULT_IMAGES = 16384  # ProGAN's count for CelebA-HQ and LSUN tables

PYRAMID_IMAGES_PER_CHUNK = 32  # 32 x 3 x 68 x 68 padded floats, 1.8 MB: the blur's passes stay in the caches
                               # (3.8x faster than 256 images a chunk on the 2-core CPU)
PATCH_IMAGES_PER_CHUNK = 256  # patch gathering: 256 x 128 x 3 x 7 int64 run indices, 5.5 MB (small enough to be
                              # reused from the heap: 44 MB chunks were mapped and faulted in afresh each time)
PROJECTION_ROWS = 4096  # descriptors projected at once: a (4096, 128) product, 2 MB, transposed while cached
PROJECTIONS_PER_BLOCK = 2 ** 28  # float32 projections held at once per side: 1 GB (all 128 directions up to
                                 # 16,384 images, fewer above)

def _blur_pass(x: torch.Tensor, dim: int, size: int, stride: int, gain: float) -> torch.Tensor:
    """The 5-tap binomial (1 4 6 4 1) / 16 x gain along `dim` of a tensor padded by 2 there: `size` outputs, every
    `stride`-th kept. Written as (x0 + x4) + 4 (x1 + x3) + 6 x2, five passes over the data instead of nine."""
    def tap(k: int) -> torch.Tensor:
        index = [slice(None)] * x.ndim
        index[dim] = slice(k, k + size, stride)
        return x[tuple(index)]
    out = tap(0) + tap(4)
    return out.add_(tap(1) + tap(3), alpha=4.0).add_(tap(2), alpha=6.0).mul_(gain / 16)


def _convolve(images: torch.Tensor, gain: float = 1.0, stride: int = 1) -> torch.Tensor:
    """Each channel of (N, C, H, W) convolved with the 5x5 binomial outer(1 4 6 4 1) / 256 (cv2.pyrDown's) x gain,
    mirror borders (d c b | a b c d), scipy.ndimage's mode='mirror'; stride 2 keeps the outputs at even rows and
    columns, [::2, ::2].

    Two 1-D passes of shifted slices: a single-channel 5x5 conv2d is several times slower on the CPU."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    across = _blur_pass(padded, -1, w, stride, gain ** 0.5)  # gain 4: 2 per pass, exact in binary
    return _blur_pass(across, -2, h, stride, gain ** 0.5)


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
    std, mean = _channel_std_mean(descriptors)
    if not bool((std > 0).all()):
        raise FastganError(f"SWD is undefined for images without any variation at {size} px (a constant set)")
    return descriptors.sub_(mean).div_(std).view(len(descriptors), -1)


def _channel_std_mean(descriptors: torch.Tensor, rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C, 7, 7) -> the std and mean of each channel over all neighbourhoods and their 7x7 pixels, (1, C, 1, 1)
    float32; the population std (numpy's, correction 0), from the squares about the mean (two passes, not
    E[x^2] - mean^2, which cancels on low-contrast levels). Column sums of row chunks, totalled in float64: 5x
    faster than torch.std_mean over dims (0, 2, 3)."""
    m, c = descriptors.shape[:2]
    flat = descriptors.view(m, -1)
    per_channel = flat.shape[1] // c
    sums = torch.zeros(flat.shape[1], dtype=torch.float64)
    for chunk in flat.split(rows):
        sums += chunk.sum(0)
    mean = sums.view(c, -1).sum(1) / (m * per_channel)
    centre = mean.float().repeat_interleave(per_channel)
    squares = torch.zeros(flat.shape[1], dtype=torch.float64)
    for chunk in flat.split(rows):
        squares += (chunk - centre).square_().sum(0)
    std = (squares.view(c, -1).sum(1) / (m * per_channel)).sqrt()
    return std.float().view(1, c, 1, 1), mean.float().view(1, c, 1, 1)


def _unit_directions(rng: np.random.Generator, dims: int) -> torch.Tensor:
    """(dims, 128) Gaussian directions, each column of unit length: drawn and scaled in float64, then float32."""
    directions = rng.standard_normal((dims, DIRECTIONS_PER_REPEAT))
    directions /= np.sqrt(np.sum(np.square(directions), axis=0, keepdims=True))
    return torch.from_numpy(directions.astype(np.float32))


SORTED_UP_TO = 16384  # gap_sum sorts arrays this short: 0.6 ms against the binning's 0.8 ms on one core
_workspace = threading.local()  # each sorting thread's index and sign buffers, kept between calls


def _buffers(n: int) -> list[torch.Tensor]:
    """Two int32 and two float32 buffers of n values for this thread, made once: fresh 8 MB arrays each call would
    cost their page faults, a third of gap_sum's time."""
    buffers = getattr(_workspace, "buffers", None)
    if buffers is None or len(buffers[0]) < n:
        buffers = _workspace.buffers = (torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32),
                                        torch.empty(n), torch.empty(n))
    return [buffer[:n] for buffer in buffers]


def gap_sum(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, per_bin: int = 16) -> float:
    """sum |sort(a) - sort(b)| of two 1-D float32 arrays (numpy or torch, CPU) of equal length, without sorting
    most of their values (a and b are overwritten).

    For equal counts that sum is the area between the two step functions #a<=t and #b<=t (the 1-D Wasserstein
    distance, times n). Bin the values (about `per_bin` of each array a bin): where the difference
    D(t) = #a<=t - #b<=t keeps one sign across a bin, its area there follows from the bin's counts and the sum of
    its values' places inside it (a dot product with each value's bin sign); only the few bins where D may cross
    zero (where the two sets' quantiles meet: about 1% of the values for two samples of one Gaussian) are sorted
    and integrated point by point. Exact but for rounding: the values are moved to bin units in float32 (a
    relative 1e-7, as the original's own float32 projections). torch ops, which let other threads run: 20 to
    45 ms for 2 x 2.1 M values on one core (more where the two sets' distribution functions cross more often),
    3 to 7x less than two numpy sorts."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    n = len(a)
    if n <= SORTED_UP_TO:  # few values: two numpy sorts cost less than the binning's fixed costs
        return float(np.abs(np.sort(a.numpy()) - np.sort(b.numpy())).sum(dtype=np.float64))
    (a_min, a_max), (b_min, b_max) = torch.aminmax(a), torch.aminmax(b)
    lo, hi = min(float(a_min), float(b_min)), max(float(a_max), float(b_max))
    if hi <= lo:
        return 0.0
    bins = max(2, n // per_bin)
    scale = float(np.float32((bins - 1) / (hi - lo)))  # hi lands in bin bins - 1, rounding apart
    index_a, index_b, sign_a, sign_b = _buffers(n)
    for values, index in ((a, index_a), (b, index_b)):  # bin k holds the values in [k, k + 1)
        values.sub_(lo).mul_(scale)
        index.copy_(values)  # >= 0, so truncation is the floor: the bin
        values.frac_()  # the place inside it, exact
    count_a = torch.bincount(index_a, minlength=bins)
    count_b = torch.bincount(index_b, minlength=len(count_a))  # longer only if rounding put a value past bins - 1
    count_a = F.pad(count_a, (0, len(count_b) - len(count_a)))
    net = count_a - count_b
    left = torch.cumsum(net, 0) - net  # D at each bin's left edge: exact integers
    settled, total = _settle(left, count_a, count_b)
    sign = settled.float()
    torch.index_select(sign, 0, index_a, out=sign_a)
    torch.index_select(sign, 0, index_b, out=sign_b)
    total -= float(torch.dot(sign_a, a)) - float(torch.dot(sign_b, b))
    in_a = torch.from_numpy(np.flatnonzero(sign_a.numpy() == 0))  # the values of mixed bins
    in_b = torch.from_numpy(np.flatnonzero(sign_b.numpy() == 0))
    if len(in_a) + len(in_b):
        mixed = settled == 0
        compact = torch.cumsum(mixed, 0) - 1  # the mixed bins numbered 0, 1, ... in their order
        take = torch.index_select  # not x[index]: advanced indexing is 8x slower here
        bins_ = take(compact, 0, torch.cat([take(index_a, 0, in_a), take(index_b, 0, in_b)]))
        places = torch.cat([take(a, 0, in_a), take(b, 0, in_b)]).double()
        steps = torch.ones(len(places), dtype=torch.float64)
        steps[len(in_a):] = -1.0
        total += _mixed_area(bins_, places, steps, left[mixed])
    return total / scale


def _settle(left: torch.Tensor, count_a: torch.Tensor, count_b: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The bins D keeps one sign across, and their area but for the values' places. Bin k: D is left[k] at its left
    edge and holds count_a[k] values of a (a step of +1 each) and count_b[k] of b (-1 each). Its sign (int64): +1
    where D >= 0 across the bin whatever the order inside it, -1 where D <= 0, 0 where D may change sign there
    (mixed). D's area over a settled bin, integrated on [k, k + 1), is left + net - (sum of a's places in the bin)
    + (sum of b's), signed: returned is the first part, sum of (left + net) x sign; the caller subtracts the
    places' (gap_sum and _mixed_area both)."""
    positive = left - count_b >= 0  # D >= 0 across the bin whatever the order inside it
    negative = ~positive & (left + count_a <= 0)
    sign = positive.long() - negative.long()
    return sign, float(((left + count_a - count_b) * sign).sum())


SUBDIVISIONS = 16  # a mixed bin is cut in 16 and settled again, until few values are left to sort
SORT_AT_MOST = 4096  # values sorted point by point at once; above, bins are subdivided (at most MAX_DEPTH times)
MAX_DEPTH = 3  # 16^3 parts of a bin: ties, which no subdivision separates, are sorted after three rounds


def _mixed_area(bins: torch.Tensor, places: torch.Tensor, steps: torch.Tensor, left: torch.Tensor,
                depth: int = 0) -> float:
    """The area of |D| over the bins that hold these values, in bin units: bin k (int64, 0 .. len(left) - 1)
    spans [k, k + 1), D is left[k] at its left edge and changes by each value's step (+1 for a, -1 for b; float64)
    at its place (float64, [0, 1)) inside its bin. Each bin is cut in SUBDIVISIONS equal parts, the parts where D
    keeps one sign settled from their counts and places as gap_sum settles its bins, and the rest subdivided
    again, or sorted when few values or MAX_DEPTH rounds remain: two samples of one distribution leave 5% of their
    values in mixed bins, which one sort of them all took longer than the rest of gap_sum."""
    if len(bins) <= SORT_AT_MOST or depth == MAX_DEPTH:
        return _sorted_area(bins, places, steps, left)
    parts = SUBDIVISIONS
    places = places * parts  # exact: parts is a power of 2
    part = bins * parts + places.long()
    places.frac_()
    side = (steps < 0).long()  # counts of both sides from one bincount: part p's a-count at 2p, b-count at 2p + 1
    counts = torch.bincount(part * 2 + side, minlength=len(left) * parts * 2).view(-1, 2)
    count_a, count_b = counts[:, 0], counts[:, 1]
    net = count_a - count_b
    before = (torch.cumsum(net, 0) - net).view(-1, parts)
    part_left = (left.view(-1, 1) + before - before[:, :1]).view(-1)  # D at each part's left edge
    settled, total = _settle(part_left, count_a, count_b)
    value_sign = torch.index_select(settled.double(), 0, part)
    total -= float(torch.dot(value_sign, places * steps))  # a's places count -, b's +: -(step x place)
    keep = torch.from_numpy(np.flatnonzero(value_sign.numpy() == 0))
    if len(keep):
        mixed = settled == 0
        compact = torch.cumsum(mixed, 0) - 1
        take = torch.index_select
        total += _mixed_area(take(compact, 0, take(part, 0, keep)), take(places, 0, keep), take(steps, 0, keep),
                             part_left[mixed], depth + 1)
    return total / parts  # in the parts' units above: a part is 1 / parts of a bin


def _sorted_area(bins: torch.Tensor, places: torch.Tensor, steps: torch.Tensor, left: torch.Tensor) -> float:
    """_mixed_area point by point: |D| integrated between the bins' sorted values."""
    values, order = torch.sort(bins + places, stable=True)  # bin units, exactly (float64); the bins follow the
    steps, k = steps[order].long(), bins[order]             # values' order: the bin index is monotone

    change = k[1:] != k[:-1]
    edge = torch.ones(1, dtype=torch.bool)
    first, last = torch.cat([edge, change]), torch.cat([change, edge])
    running = torch.cumsum(steps, 0)
    starts = torch.nonzero(first).view(-1)
    before_bin = torch.repeat_interleave(running[starts] - steps[starts],
                                         torch.diff(starts, append=torch.tensor([len(k)])))
    after = left[k] + running - before_bin  # D just after each value
    # the next value, or the bin's right edge
    following = torch.where(last, k + 1.0, torch.cat([values[1:], values.new_zeros(1)]))
    total = float((after * (following - values)).abs().sum())
    # from each bin's left edge to its first value
    return total + float((left[k[first]] * (values[first] - k[first])).abs().sum())


def _warm_allocator() -> None:
    """Allocate and free one 16 MB block, so that the temporaries below come from the heap, not fresh pages.

    glibc's malloc maps blocks above a threshold (128 KB at first) afresh each time, and gives heap memory back
    above another; freeing a mapped block raises both to its size and twice that (up to 32 MB): after this the
    pyramids' and gap_sum's temporaries (a few MB a chunk) are reused instead of faulted in page by page: 1.7 M of
    2.2 M page faults and 1 to 2 s of the pyramids on the 2-core CPU. Elsewhere than glibc, a block freed."""
    block = torch.empty(4 << 20)  # float32: 16 MB, mapped (never touched) and freed
    del block


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
    """out (k, M) = the projections of descriptors (M, D) on directions (D, k), each direction's contiguous (a row,
    for gap_sum). In chunks of PROJECTION_ROWS descriptors, each transposed into `out` while cached: MKL runs
    (R, D) @ (D, k) 1.35x faster than (k, D) @ (D, M) here, and the same products (bit for bit)."""
    chunk = torch.empty(PROJECTION_ROWS, directions.shape[1])
    for start in range(0, len(descriptors), PROJECTION_ROWS):
        rows = descriptors[start:start + PROJECTION_ROWS]
        product = torch.mm(rows, directions, out=chunk[:len(rows)])
        out[:, start:start + len(rows)].copy_(product.T)


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
    two sides side by side (half of torch's threads each: one side's chunk transposes overlap the other's
    matmuls), then measures each direction's sliced distance (gap_sum) as a task, on one torch thread each.
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
    _warm_allocator()
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
