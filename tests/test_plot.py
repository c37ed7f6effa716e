import numpy as np
import pytest
from PIL import Image

from fastgan.plot import plot_losses

G_BLUE, D_ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def _gan_losses(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    d = np.abs(0.5 + 0.9 * np.exp(-t / (n / 6)) + 0.15 * rng.standard_normal(n))
    g = np.abs(1 + 2.5 * (1 - np.exp(-t / (n / 8))) + 0.8 * rng.standard_normal(n))
    return t, g, d


def _load(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return im.convert("RGB")


def _has_colour(im, rgb, tol=8):
    px = np.asarray(im).astype(int)
    return bool((np.abs(px - np.array(rgb)).max(axis=-1) <= tol).any())


def test_typical_plot_size_and_colours(tmp_path):
    t, g, d = _gan_losses(2000)
    path = tmp_path / "losses.png"
    plot_losses(t, g, d, path)
    im = _load(path)
    assert im.size == (1000, 500)
    assert _has_colour(im, G_BLUE) and _has_colour(im, D_ORANGE)
    assert not list(tmp_path.glob(".plot-*"))  # no temp file left behind


def test_creates_parent_folder_and_overwrites(tmp_path):
    path = tmp_path / "a" / "b" / "losses.png"
    plot_losses([0, 1], [1.0, 2.0], [0.5, 0.4], str(path))
    plot_losses([0, 1, 2], [1.0, 2.0, 3.0], [0.5, 0.4, 0.3], str(path))
    assert _load(path).size == (1000, 500)


@pytest.mark.parametrize(
    "steps, g, d",
    [
        ([], [], []),  # no data
        ([7], [2.0], [0.7]),  # one point: a marker
        ([0, 1, 2], [np.nan] * 3, [np.nan] * 3),  # all NaN
        ([0, 1, 2, 3], [1.0, np.inf, 2.0, 3.0], [0.5, 0.6, -np.inf, np.nan]),  # some inf/NaN
        ([0, 1], [np.inf, -np.inf], [np.nan, np.inf]),  # nothing finite
        ([5, 5, 5], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),  # flat, one step
    ],
)
def test_degenerate_inputs_give_png(tmp_path, steps, g, d):
    path = tmp_path / "p.png"
    plot_losses(steps, g, d, path)
    assert _load(path).size == (1000, 500)


def test_one_point_is_drawn(tmp_path):
    plot_losses([3], [2.0], [0.5], tmp_path / "p.png")
    im = _load(tmp_path / "p.png")
    assert _has_colour(im, G_BLUE) and _has_colour(im, D_ORANGE)


def test_resumed_uneven_steps(tmp_path):
    steps = np.r_[np.arange(10_000, 10_500, 7), np.arange(10_500, 12_000, 50)]
    g, d = np.linspace(3, 2, len(steps)), np.linspace(1.4, 0.5, len(steps))
    plot_losses(steps, g, d, tmp_path / "p.png")
    assert _has_colour(_load(tmp_path / "p.png"), G_BLUE)


def test_many_points(tmp_path):
    t, g, d = _gan_losses(50_000)
    g[1000:1010] = np.nan  # a divergence in the middle
    plot_losses(t, g, d, tmp_path / "p.png")
    im = _load(tmp_path / "p.png")
    assert _has_colour(im, G_BLUE) and _has_colour(im, D_ORANGE)


def test_mismatched_lengths_raise(tmp_path):
    with pytest.raises(ValueError):
        plot_losses([0, 1, 2], [1.0, 2.0], [0.5, 0.4, 0.3], tmp_path / "p.png")
    with pytest.raises(ValueError):
        plot_losses([0, 1], [1.0, 2.0], [0.5], tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    t = torch.arange(100)
    g = torch.rand(100, requires_grad=True) * 3 + 1  # a loss history that still tracks grad
    d = torch.rand(100) + 0.3
    plot_losses(t, g, d, tmp_path / "p.png")
    im = _load(tmp_path / "p.png")
    assert _has_colour(im, G_BLUE) and _has_colour(im, D_ORANGE)


def test_eval_png_marks_each_measured_point(tmp_path):
    """plot_panels (eval.png) draws a dot at each measurement: three epochs are three visible points, not one bare
    line. A flat series: its line is 1.5 px thick, a dot reaches 4 px above and below it at each epoch only."""
    from fastgan.plot import BOTTOM, LEFT, RIGHT, TOP, plot_panels
    plot_panels([("SWD", [("SWD", [1, 2, 3], [1.0, 1.0, 1.0])])], "epoch", tmp_path / "eval.png")
    im = np.asarray(_load(tmp_path / "eval.png")).astype(int)
    line_y = round(BOTTOM - 1.0 / 1.05 * (BOTTOM - TOP))  # y from 0 to 1.05: the axis anchored at 0, 5% headroom
    blue = lambda x, y: np.abs(im[y, x] - np.array(G_BLUE)).max() <= 40  # noqa: E731
    middle, between = LEFT + (RIGHT - LEFT) // 2, LEFT + (RIGHT - LEFT) // 4  # epochs 2 and 1.5
    assert blue(middle, line_y) and blue(between, line_y)  # the line
    assert blue(middle, line_y - 3) and blue(middle, line_y + 3)  # the dot at epoch 2
    assert not blue(between, line_y - 3) and not blue(between, line_y + 3)  # the line alone at epoch 1.5
