"""fastgan.metrics.swd against plain NumPy: the 5x5 binomial pyramid written as 25 explicit taps, and the whole SWD recipe
of ProGAN's metrics/sliced_wasserstein.py re-implemented here with the same random draws. Small sets (16 to 64
images of 32x32: levels 32 and 16), so that the file runs in seconds on a 2-core CPU."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastgan.errors import FastganError
from fastgan.metrics.swd import (DIRECTION_REPEATS, laplacian_pyramid, pyr_down, pyr_up, sliced_wasserstein_distance,
                         swd_resolutions)

BINOMIAL = np.array([1, 4, 6, 4, 1], np.float64)


def mirror(index: int, size: int) -> int:
    """scipy.ndimage mode='mirror': d c b | a b c d | c b a."""
    if index < 0:
        return -index
    if index >= size:
        return 2 * (size - 1) - index
    return index


def convolve_binomial(x: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Each (N, C, H, W) channel convolved with outer(BINOMIAL, BINOMIAL) / 256 * gain, mirror borders, one tap at
    a time; float64, so that it is the exact answer float32 code is compared with."""
    n, c, h, w = x.shape
    out = np.zeros(x.shape, np.float64)
    for dy in range(-2, 3):
        rows = [mirror(y + dy, h) for y in range(h)]
        for dx in range(-2, 3):
            cols = [mirror(x_ + dx, w) for x_ in range(w)]
            weight = BINOMIAL[dy + 2] * BINOMIAL[dx + 2] / 256 * gain
            out += weight * x[:, :, rows][:, :, :, cols]
    return out


def reference_pyr_down(x: np.ndarray) -> np.ndarray:
    return convolve_binomial(x)[:, :, ::2, ::2]


def reference_pyr_up(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    spread = np.zeros((n, c, 2 * h, 2 * w), x.dtype)
    spread[:, :, ::2, ::2] = x
    return convolve_binomial(spread, gain=4.0)


def reference_pyramid(images: np.ndarray, levels: int) -> list[np.ndarray]:
    pyramid = [np.float64(images)]
    for _ in range(1, levels):
        pyramid.append(reference_pyr_down(pyramid[-1]))
        pyramid[-2] -= reference_pyr_up(pyramid[-1])
    return pyramid


def reference_swd(real: np.ndarray, fake: np.ndarray, seed: int) -> dict[str, float]:
    """ProGAN's recipe, written as the original is (descriptors, finalize, sliced_wasserstein), drawing from
    default_rng(seed) in the order fastgan.metrics.swd documents."""
    rng = np.random.default_rng(seed)
    n, c, h, w = real.shape
    resolutions = []
    size = h
    while size >= 16:
        resolutions.append(size)
        size //= 2
    pyramids = [reference_pyramid(real, len(resolutions)), reference_pyramid(fake, len(resolutions))]
    results = {}
    for level, size in enumerate(resolutions):
        finalized = []
        for pyramid in pyramids:
            xs = rng.integers(3, size - 3, size=n * 128)
            ys = rng.integers(3, size - 3, size=n * 128)
            images = np.float32(pyramid[level])
            desc = np.stack([images[i // 128, :, y - 3:y + 4, x - 3:x + 4]
                             for i, (x, y) in enumerate(zip(xs, ys))])  # (N x 128, C, 7, 7)
            desc -= np.mean(desc, axis=(0, 2, 3), keepdims=True)
            desc /= np.std(desc, axis=(0, 2, 3), keepdims=True)
            finalized.append(desc.reshape(len(desc), -1))
        a, b = finalized
        repeats = []
        for _ in range(4):
            dirs = rng.standard_normal((a.shape[1], 128))
            dirs /= np.sqrt(np.sum(np.square(dirs), axis=0, keepdims=True))
            dirs = dirs.astype(np.float32)
            proj_a, proj_b = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
            repeats.append(np.mean(np.abs(proj_a - proj_b)))
        results[f"swd{size}"] = float(np.mean(repeats)) * 1e3
    results["swd"] = float(np.mean(list(results.values())))
    return results


def smooth_faces(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """uint8 (n, 3, size, size) images with structure at every scale: a coarse 4x4 random field bilinearly
    enlarged (shading), a mid 8x8 one, and per-pixel noise (texture, which a blur takes away). The texture
    dominates so that a few dozen images already sample the distribution well at every level."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False)
    mid = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=size, mode="bilinear", align_corners=False)
    fine = torch.randn(n, 3, size, size, generator=g)
    return (128 + 10 * coarse + 15 * mid + 30 * fine).round().clamp(0, 255).to(torch.uint8)


def blurred(images: torch.Tensor) -> torch.Tensor:
    """A 3x3 box blur, mirror borders: what an out-of-focus generator would give."""
    padded = F.pad(images.float(), (1, 1, 1, 1), mode="reflect")
    return F.avg_pool2d(padded, 3, stride=1).round().to(torch.uint8)


def test_pyr_down_is_the_mirrored_binomial_blur_at_even_pixels():
    x = np.random.default_rng(1).uniform(0, 255, (2, 3, 16, 12)).astype(np.float32)
    ours = pyr_down(torch.from_numpy(x)).numpy()
    # float32 sums of 25 products of values <= 255: rounding is ~1e-5 relative, far below 1e-3
    np.testing.assert_allclose(ours, reference_pyr_down(np.float64(x)), rtol=0, atol=1e-3)


def test_pyr_up_is_the_zero_spread_blur_times_4():
    x = np.random.default_rng(2).uniform(-255, 255, (2, 3, 8, 6)).astype(np.float32)
    ours = pyr_up(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, reference_pyr_up(np.float64(x)), rtol=0, atol=1e-3)


def test_laplacian_pyramid_matches_direct_convolution_and_rebuilds_the_image():
    images = np.random.default_rng(3).integers(0, 256, (2, 3, 32, 32)).astype(np.float32)
    ours = laplacian_pyramid(torch.from_numpy(images), 3)
    assert [tuple(level.shape) for level in ours] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
    for level, expected in zip(ours, reference_pyramid(images, 3)):
        np.testing.assert_allclose(level.numpy(), expected, rtol=0, atol=1e-3)
    # a Laplacian pyramid loses nothing: coarsest level, upsampled and added level by level, is the image again
    rebuilt = ours[2]
    for finer in (ours[1], ours[0]):
        rebuilt = finer + pyr_up(rebuilt)
    np.testing.assert_allclose(rebuilt.numpy(), images, rtol=0, atol=1e-3)


@pytest.mark.parametrize("sliced_distance", ["sorted", "binned"])
def test_swd_equals_a_plain_numpy_implementation_of_the_recipe(monkeypatch, sliced_distance):
    """Both of gap_sum's ways: these sets' 2,048 projections a side are sorted, as any up to SORTED_UP_TO are; with
    that limit at 0 they go through the binning, as 16,384 images' 2.1 M do."""
    if sliced_distance == "binned":
        monkeypatch.setattr("fastgan.metrics.gap_sum.SORTED_UP_TO", 0)
    real, fake = smooth_faces(16, seed=0), blurred(smooth_faces(16, seed=1))
    ours = sliced_wasserstein_distance(real, fake, seed=7)
    expected = reference_swd(real.numpy(), fake.numpy(), seed=7)
    assert ours.keys() == expected.keys() == {"swd32", "swd16", "swd"}
    # float32 throughout, like the original: different summation orders (torch vs numpy reductions and matmuls)
    # move a mean of 2 M float32 terms by ~1e-6 relative; 1e-4 leaves room and still sees any recipe change
    for key in expected:
        assert ours[key] == pytest.approx(expected[key], rel=1e-4), key


def test_seed_draws_the_neighbourhoods_and_directions():
    real, fake = smooth_faces(16, seed=0), smooth_faces(16, seed=1)
    assert sliced_wasserstein_distance(real, fake, seed=3) == sliced_wasserstein_distance(real, fake, seed=3)
    assert sliced_wasserstein_distance(real, fake, seed=3) != sliced_wasserstein_distance(real, fake, seed=4)


def test_identical_sets_differ_only_by_the_neighbourhood_draws():
    # real and fake draw their own neighbourhoods (as the original does), so identical sets are not 0 but the
    # sampling noise of M = N x 128 descriptors, whose Wasserstein distance falls like 1 / sqrt(M): 4x the
    # images, half the value (measured 0.49 to 0.52 over three seeds; the band leaves room for other draws)
    small = sliced_wasserstein_distance(smooth_faces(16, seed=0), smooth_faces(16, seed=0))["swd"]
    large = sliced_wasserstein_distance(smooth_faces(64, seed=0), smooth_faces(64, seed=0))["swd"]
    assert 0.4 < large / small < 0.6, (small, large)


def test_blur_is_farther_than_another_sample_and_the_finest_level_sees_it_most():
    real, other = smooth_faces(64, seed=0), smooth_faces(64, seed=1)
    same_distribution = sliced_wasserstein_distance(real, other)
    blur = sliced_wasserstein_distance(real, blurred(other))
    # measured over three seeds: swd 1.6x to 1.7x, swd32 2.6x, increases 33 to 34 (32 px) against 5 to 6 (16 px);
    # the bounds sit well inside those, since another seed moves each figure by a few units at 64 images
    assert blur["swd"] > 1.4 * same_distribution["swd"], (blur, same_distribution)
    assert blur["swd32"] > 2 * same_distribution["swd32"], (blur, same_distribution)
    increase = {key: blur[key] - same_distribution[key] for key in ("swd32", "swd16")}
    assert increase["swd32"] > 2 * increase["swd16"], increase


def test_progress_is_called_once_per_level_and_repeat():
    calls = []
    sliced_wasserstein_distance(smooth_faces(2, 0), smooth_faces(2, 1), progress=calls.append)
    assert calls == [1] * len(swd_resolutions(32)) * DIRECTION_REPEATS


def test_one_channel_images_give_49_component_descriptors():
    gray = sliced_wasserstein_distance(smooth_faces(8, 0)[:, :1], smooth_faces(8, 1)[:, :1], seed=5)
    expected = reference_swd(smooth_faces(8, 0)[:, :1].numpy(), smooth_faces(8, 1)[:, :1].numpy(), seed=5)
    assert gray == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("real, fake, words", [
    (torch.zeros(4, 3, 32, 32), torch.zeros(4, 3, 32, 32, dtype=torch.uint8), "uint8"),
    (torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(5, 3, 32, 32, dtype=torch.uint8), "equal sets"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "at least 16x16"),
    (torch.zeros(4, 3, 32, 16, dtype=torch.uint8), torch.zeros(4, 3, 32, 16, dtype=torch.uint8), "square"),
    (torch.zeros(4, 3, 33, 33, dtype=torch.uint8), torch.zeros(4, 3, 33, 33, dtype=torch.uint8), "divisible"),
    (torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, 3, 32, 32, dtype=torch.uint8), "at least one"),
    (torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, 3, 32, 32, dtype=torch.uint8), "constant"),
])
def test_bad_inputs_are_refused_in_one_line(real, fake, words):
    with pytest.raises(FastganError, match=words) as refused:
        sliced_wasserstein_distance(real, fake)
    assert "\n" not in str(refused.value)


def test_the_torch_path_of_a_gpu_gives_the_numpy_paths_figure():
    """The GPU's path (torch.mm and torch.sort on the device) run here on CPU tensors: the same draws and sums as
    the numpy path's, so float32 rounding apart (the same sorted values, summed in another order) the same."""
    from concurrent.futures import ThreadPoolExecutor

    from fastgan.metrics.swd import _sliced_wasserstein, _sliced_wasserstein_on
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(3000, 147, generator=g), torch.randn(3000, 147, generator=g) * 1.1
    with ThreadPoolExecutor(1) as pool:
        numpy_path = _sliced_wasserstein(real, fake, np.random.default_rng(5), pool, lambda k: None)
    torch_path = _sliced_wasserstein_on(real, fake, np.random.default_rng(5), lambda k: None)
    assert torch_path == pytest.approx(numpy_path, rel=1e-6)
    other_draws = _sliced_wasserstein_on(real, fake, np.random.default_rng(6), lambda k: None)
    assert abs(other_draws - numpy_path) > 1e-4 * numpy_path  # other directions give another figure


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_swd_on_the_gpu_equals_the_cpu():
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    fake = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    on_cpu = sliced_wasserstein_distance(real, fake, seed=2)
    on_gpu = sliced_wasserstein_distance(real, fake, seed=2, device="cuda")
    for key, value in on_cpu.items():  # cuBLAS and MKL round the projections differently: float32, ~1e-6
        assert on_gpu[key] == pytest.approx(value, rel=1e-4), key


@pytest.mark.parametrize("case", ["one Gaussian", "shifted", "tiny", "ties", "identical", "one value", "spread"])
def test_gap_sum_is_the_sum_of_sorted_differences(case):
    """gap_sum integrates the area between the step functions instead of sorting: it must give the sorted
    differences' sum to float32 rounding (the values are moved to bin units in float32: ~1e-7 relative)."""
    from fastgan.metrics.gap_sum import gap_sum
    rng = np.random.default_rng(3)
    n = 5 if case == "tiny" else 200_000  # tiny: sorted (SORTED_UP_TO); the rest binned
    a = rng.standard_normal(n).astype(np.float32)
    b = {"one Gaussian": rng.standard_normal(n), "shifted": rng.standard_normal(n) * 1.2 + 0.3,
         "tiny": rng.standard_normal(n), "ties": None, "identical": a.copy(), "one value": None,
         "spread": rng.standard_cauchy(n)}[case]
    if case == "ties":  # many equal values on both sides, and bins holding nothing but ties
        a, b = rng.integers(0, 5, n).astype(np.float32), rng.integers(0, 6, n)
    if case == "one value":
        a, b = np.full(n, 2.5, np.float32), np.full(n, 2.5)
    b = np.asarray(b, np.float32)
    expected = float(np.abs(np.sort(a).astype(np.float64) - np.sort(b)).sum())
    got = gap_sum(a.copy(), b.copy())
    assert got == pytest.approx(expected, rel=2e-6, abs=1e-6 * n)
    assert got == pytest.approx(gap_sum(b.copy(), a.copy()), rel=1e-9, abs=1e-9)  # symmetric


@pytest.mark.parametrize("sort_at_most, per_bin", [(8, 16), (4096, 400)])
def test_gap_sum_subdivides_mixed_bins_exactly(monkeypatch, sort_at_most, per_bin):
    """Bins where D may cross zero are cut in 16 parts and settled again, down to MAX_DEPTH rounds: with almost
    nothing left to the final sort (8 values), or with wide bins that leave most values mixed (400 a bin), every
    round must still give the sorted differences' sum."""
    import fastgan.metrics.gap_sum as gap_sum
    monkeypatch.setattr(gap_sum, "SORT_AT_MOST", sort_at_most)
    sorted_sizes = []
    sorted_area = gap_sum._sorted_area
    monkeypatch.setattr(gap_sum, "_sorted_area", lambda *args: sorted_sizes.append(len(args[0])) or sorted_area(*args))
    rng = np.random.default_rng(4)
    n = 100_000
    for b_scale, b_shift in ((1.0, 0.0), (1.05, 0.02)):
        a = rng.standard_normal(n).astype(np.float32)
        b = (rng.standard_normal(n) * b_scale + b_shift).astype(np.float32)
        expected = float(np.abs(np.sort(a).astype(np.float64) - np.sort(b)).sum())
        sorted_sizes.clear()
        assert gap_sum.gap_sum(a.copy(), b.copy(), per_bin=per_bin) == pytest.approx(expected, rel=2e-6)
        # the subdivision did the work: what reached the sort is a small part of the 2 x 100,000 values
        assert sum(sorted_sizes) < 0.05 * 2 * n, sorted_sizes


def test_chunks_and_blocks_do_not_change_the_figure(monkeypatch):
    """The pyramid, the patch gathering and the directions all go in chunks or blocks sized for 16,384 images;
    cut small and uneven (3 images, 5 images, blocks of 40 of 128 directions), the
    figures must be the same but for float32 summation order."""
    import fastgan.metrics.swd as swd
    real, fake = smooth_faces(16, seed=0), blurred(smooth_faces(16, seed=1))
    whole = sliced_wasserstein_distance(real, fake, seed=2)
    monkeypatch.setattr(swd, "PYRAMID_IMAGES_PER_CHUNK", 3)
    monkeypatch.setattr(swd, "PATCH_IMAGES_PER_CHUNK", 5)
    monkeypatch.setattr(swd, "PROJECTIONS_PER_BLOCK", 40 * 16 * swd.PATCHES_PER_IMAGE)
    pieces = sliced_wasserstein_distance(real, fake, seed=2)
    for key, value in whole.items():
        assert pieces[key] == pytest.approx(value, rel=1e-6), key


def test_descriptors_are_numpys_neighbourhoods_normalised_per_channel_even_at_low_contrast():
    """Each descriptor is its image's 7x7 neighbourhood of every channel (rows, then columns), centred and divided
    by its channel's mean and population std over all neighbourhoods and pixels: the same as float64 numpy, on a
    level whose channels differ in spread (0.5 to 30) and whose mean is 400x the smallest spread, where a std from
    E[x^2] - mean^2 in float32, or one statistic for all channels, would be far off."""
    from fastgan.metrics.swd import PATCHES_PER_IMAGE, _descriptors
    rng = np.random.default_rng(5)
    n, size = 6, 16
    level = (rng.standard_normal((n, 3, size, size)) * [[[[0.5]], [[2.0]], [[30.0]]]] + 200).astype(np.float32)
    xs, ys = rng.integers(3, size - 3, n * PATCHES_PER_IMAGE), rng.integers(3, size - 3, n * PATCHES_PER_IMAGE)
    out = torch.empty(n * PATCHES_PER_IMAGE, 3 * 49)
    ours = _descriptors(torch.from_numpy(level), xs, ys, out=out).numpy()
    image = np.arange(n * PATCHES_PER_IMAGE) // PATCHES_PER_IMAGE
    patches = np.stack([level[i, :, y - 3:y + 4, x - 3:x + 4] for i, x, y in zip(image, xs, ys)]).astype(np.float64)
    mean, std = patches.mean(axis=(0, 2, 3), keepdims=True), patches.std(axis=(0, 2, 3), keepdims=True)
    expected = ((patches - mean) / std).reshape(len(patches), -1)
    # float32 values of ~200 carry ~1e-5 absolute rounding; divided by the smallest std (0.5) that is ~3e-5
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("threads", [2, 4])
def test_each_task_gets_its_share_of_torch_threads_and_the_count_comes_back(monkeypatch, threads):
    """The two sides' pyramids, patches and projections run side by side with half of torch's threads each, the
    sliced distances (gap_sum, one task per direction) with one each, so that the pool's threads do not each start
    a team of all the threads; torch's count is what it was afterwards, also when a task fails. Pool threads keep
    the count they first ran with, so each task must set its own: seen from inside the tasks; torch's and MKL's
    counts seen by the caller afterwards."""
    import fastgan.metrics.swd as swd
    seen = {"pyramids": set(), "projections": set(), "distances": set()}

    def spy(name, function):
        def spied(*args, **kwargs):
            seen[name].add(torch.get_num_threads())
            return function(*args, **kwargs)
        return spied
    monkeypatch.setattr(swd, "_pyramids", spy("pyramids", swd._pyramids))
    monkeypatch.setattr(swd, "_project", spy("projections", swd._project))
    monkeypatch.setattr(swd, "gap_sum", spy("distances", swd.gap_sum))
    def counts() -> tuple[int, int]:  # torch's, and MKL's where torch has MKL (its own otherwise)
        mkl = re.search(r"mkl_get_max_threads\(\) : (\d+)", torch.__config__.parallel_info())
        return torch.get_num_threads(), int(mkl.group(1)) if mkl else torch.get_num_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # 4 on a 2-core machine too: only the counts are looked at
    try:
        sliced_wasserstein_distance(smooth_faces(2, 0), smooth_faces(2, 1))
        assert seen == {"pyramids": {threads // 2}, "projections": {threads // 2}, "distances": {1}}
        assert counts() == (threads, threads)

        def failing(a, b):
            raise RuntimeError("planted")
        monkeypatch.setattr(swd, "gap_sum", failing)
        with pytest.raises(RuntimeError, match="planted"):
            sliced_wasserstein_distance(smooth_faces(2, 0), smooth_faces(2, 1))
        assert counts() == (threads, threads)
    finally:
        torch.set_num_threads(before)


def test_the_thread_count_is_set_back_after_the_pools_tasks_even_on_an_error():
    """A task's torch.set_num_threads can be the process's count afterwards (where the calling thread has not run
    a parallel op of its own yet); SWD sets it back on leaving, also when a task fails."""
    from fastgan.metrics.swd import _threads_restored
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with pytest.raises(RuntimeError, match="planted"):
            with _threads_restored() as threads:
                assert threads == 3
                torch.set_num_threads(1)  # what a task does, here in the calling thread itself
                raise RuntimeError("planted")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
