"""Loss plot of the PyTorch DCGAN tutorial ("Generator and Discriminator Loss During Training"),
drawn with Pillow only so that the package does not need matplotlib."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_write

W, H = 1000, 500                                # the tutorial's figsize=(10, 5) at 100 dpi
LEFT, TOP, RIGHT, BOTTOM = 75, 45, 975, 445     # plot box in output pixels
SS = 2                                          # data lines are drawn 2x and box-reduced: antialiasing
LINE_W = 3                                      # at SS scale, i.e. 1.5 px like matplotlib's 1.5 pt
SERIES = (("G", (0x1F, 0x77, 0xB4)), ("D", (0xFF, 0x7F, 0x0E)))  # matplotlib's C0, C1; G first
MORE_COLORS = ((0x2C, 0xA0, 0x2C), (0xD6, 0x27, 0x28), (0x94, 0x67, 0xBD), (0x8C, 0x56, 0x4B))  # C2..C5
BLACK, GRID, LEGEND_EDGE = (0, 0, 0), (225, 225, 225), (204, 204, 204)


def _font(size):
    try:  # Pillow >= 10.1 with FreeType: a scalable font
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _as_array(a, name):
    if hasattr(a, "detach"):  # torch tensor, maybe on a GPU or requiring grad
        a = a.detach().cpu()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _ticks(lo, hi, target):
    """Round tick values in [lo, hi] with a 1-2-5 step, and their labels."""
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    # integer multiples of step, so no rounding error accumulates
    ks = range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)
    return [(k * step, f"{k * step:.{decimals}f}") for k in ks]


def _text(draw, xy, s, font, anchor="mm", fill=BLACK):
    """Place text by an anchor via its bbox; the bitmap fallback font does not support `anchor=`."""
    l, t, r, b = draw.textbbox((0, 0), s, font=font)
    x = xy[0] - {"l": l, "m": (l + r) / 2, "r": r}[anchor[0]]
    y = xy[1] - {"t": t, "m": (t + b) / 2, "b": b}[anchor[1]]
    draw.text((round(x), round(y)), s, font=font, fill=fill)


def _text_up(img, center, s, font):
    """Text rotated 90 degrees counter-clockwise (the y-axis label)."""
    l, t, r, b = font.getbbox(s)
    mask = Image.new("L", (r + 2, b + 2), 0)
    ImageDraw.Draw(mask).text((0, 0), s, font=font, fill=255)
    mask = mask.rotate(90, expand=True)
    img.paste(BLACK, (center[0] - mask.width // 2, center[1] - mask.height // 2), mask)


MARKER_R = 4  # output pixels: the radius of the dot at each measured point (plot_panels)


def _draw_markers(draw, cols, ys, color):
    """A filled dot at each finite point (at SS scale), so that a few measurements read as points, not a bare line."""
    r = MARKER_R * SS
    for px, py in zip(cols.tolist(), ys.tolist()):
        if math.isfinite(py):
            draw.ellipse((px - r, py - r, px + r, py + r), fill=color)


def _draw_series(draw, cols, ys, color):
    """Polyline through (cols, ys), broken at NaN ys. Dense data is reduced to each pixel
    column's min and max (in the order they occur), so at most ~2 segments per column are
    drawn and noisy losses show as a solid band like matplotlib's, not an aliasing pattern."""
    ok = np.isfinite(ys)
    run = np.cumsum(~ok)[ok]  # id of the unbroken stretch each finite point belongs to
    c, y = cols[ok], ys[ok]
    if c.size == 0:
        return
    new = np.r_[True, (run[1:] != run[:-1]) | (c[1:] != c[:-1])]
    starts = np.flatnonzero(new)
    gid = np.cumsum(new) - 1
    imin = np.lexsort((y, gid))[starts]  # index of each group's min (groups are contiguous)
    imax = np.lexsort((-y, gid))[starts]
    idx = np.stack([np.minimum(imin, imax), np.maximum(imin, imax)], axis=1).ravel()
    grun = np.repeat(run[starts], 2)
    for piece in np.split(idx, np.flatnonzero(grun[1:] != grun[:-1]) + 1):
        pts = list(zip(c[piece].tolist(), y[piece].tolist()))
        if len(set(pts)) == 1:  # an isolated point: a marker, since a line would be invisible
            (px, py), r = pts[0], 3 * SS
            draw.ellipse((px - r, py - r, px + r, py + r), fill=color)
        else:
            draw.line(pts, fill=color, width=LINE_W, joint="curve")


def _y_range(vals):
    lo, hi = float(vals.min()), float(vals.max())
    if lo >= 0:  # losses are >= 0: anchor the axis at 0 like the tutorial's figure
        lo = 0.0
    span = hi - lo or max(abs(hi), 1.0)  # flat data still needs a non-empty range
    return (lo if lo == 0 else lo - 0.05 * span), hi + 0.05 * span


def plot_losses(steps, loss_g, loss_d, path, title: str = "Generator and Discriminator Loss During Training") -> None:
    """Write a PNG line plot of the G and D losses against the iteration numbers `steps` to `path`.
    Accepts Python sequences, numpy arrays or 1-D torch tensors (convert via numpy.asarray)."""
    x = _as_array(steps, "steps")
    g, d = _as_array(loss_g, "loss_g"), _as_array(loss_d, "loss_d")
    if not len(x) == len(g) == len(d):
        raise ValueError(f"lengths differ: steps {len(x)}, loss_g {len(g)}, loss_d {len(d)}")
    _save(draw_lines([("G", x, g), ("D", x, d)], title, "iterations", "Loss"), path)


def plot_panels(panels, xlabel: str, path) -> None:
    """Write charts stacked in one PNG: panels is a list of (title, [(label, x, y), ...]), one chart each, the
    y axis of each its own (fastgan eval's metrics over training, each on its scale)."""
    charts = [draw_lines(series, title, xlabel, "", markers=True) for title, series in panels] or \
        [draw_lines([], "", xlabel, "")]
    sheet = Image.new("RGB", (W, H * len(charts)), "white")
    for i, chart in enumerate(charts):
        sheet.paste(chart, (0, H * i))
    _save(sheet, path)


def _save(img: Image.Image, path) -> None:
    with atomic_write(path) as f:  # readers never see a half-written PNG
        img.save(f, format="PNG")


def draw_lines(series, title: str, xlabel: str, ylabel: str, markers: bool = False) -> Image.Image:
    """A matplotlib-like line chart of series [(label, x, y), ...], colours C0, C1, ... in order, a legend in
    the upper right; NaN or inf in y breaks a line, one point is a marker; with `markers`, every point is one
    (few points, each a measurement: matplotlib's marker="o")."""
    prepared = []
    for label, x, y in series:
        x, y = _as_array(x, f"{label} x"), _as_array(y, f"{label} y")
        order = np.argsort(x, kind="stable")  # tolerate logs that were appended out of order
        x = x[order]
        # a point with a non-finite x cannot be placed: treat its value as missing; inf breaks the line like NaN
        y = np.where(np.isfinite(x), y[order], np.nan)
        prepared.append((label, x, np.where(np.isfinite(y), y, np.nan)))
    colors = [color for _, color in SERIES] + list(MORE_COLORS)
    placed = [x[np.isfinite(y)] for _, x, y in prepared]
    values = [y[np.isfinite(y)] for _, _, y in prepared]
    empty = not any(len(v) for v in values)
    if empty:
        (x0, x1), (y0, y1) = (0.0, 1.0), (0.0, 1.0)
    else:
        all_x = np.concatenate(placed)
        x0, x1 = float(all_x.min()), float(all_x.max())
        if x0 == x1:
            x0, x1 = x0 - 1, x1 + 1
        y0, y1 = _y_range(np.concatenate(values))

    def fx(v):
        return LEFT + (np.asarray(v) - x0) / (x1 - x0) * (RIGHT - LEFT)

    def fy(v):
        return BOTTOM - (np.asarray(v) - y0) / (y1 - y0) * (BOTTOM - TOP)

    xt, yt = _ticks(x0, x1, 9), _ticks(y0, y1, 7)
    # grid and data at SS x scale, then box-reduced: exact colours inside lines, smooth edges
    img = Image.new("RGB", (W * SS, H * SS), "white")
    draw = ImageDraw.Draw(img)
    for v, _ in xt:
        px = round(fx(v)) * SS
        draw.rectangle((px, TOP * SS, px + SS - 1, BOTTOM * SS), fill=GRID)
    for v, _ in yt:
        py = round(fy(v)) * SS
        draw.rectangle((LEFT * SS, py, RIGHT * SS, py + SS - 1), fill=GRID)
    if not empty:
        for (_, x, y), color in zip(prepared, colors):
            _draw_series(draw, np.rint(fx(x) * SS).astype(np.int64), fy(y) * SS, color)
            if markers:
                _draw_markers(draw, np.rint(fx(x) * SS).astype(np.int64), fy(y) * SS, color)
    img = img.reduce(SS)

    draw = ImageDraw.Draw(img)
    f_tick, f_label, f_title = _font(13), _font(14), _font(17)
    draw.rectangle((LEFT, TOP, RIGHT, BOTTOM), outline=BLACK)
    for v, s in xt:
        px = round(fx(v))
        draw.line((px, BOTTOM, px, BOTTOM + 4), fill=BLACK)
        _text(draw, (px, BOTTOM + 7), s, f_tick, "mt")
    for v, s in yt:
        py = round(fy(v))
        draw.line((LEFT - 4, py, LEFT, py), fill=BLACK)
        _text(draw, (LEFT - 7, py), s, f_tick, "rm")
    # axis labels just outside the tick labels, as matplotlib places them
    _text(draw, ((LEFT + RIGHT) // 2, BOTTOM + 30), xlabel, f_label, "mt")
    ytw = max((draw.textbbox((0, 0), s, font=f_tick)[2] for _, s in yt), default=0)
    if ylabel:
        _text_up(img, (LEFT - 7 - ytw - 16, (TOP + BOTTOM) // 2), ylabel, f_label)
    _text(draw, ((LEFT + RIGHT) // 2, TOP // 2), title, f_title, "mm")
    if empty:
        _text(draw, ((LEFT + RIGHT) // 2, (TOP + BOTTOM) // 2), "no data", f_title, "mm", (110, 110, 110))
    else:  # legend in the upper right corner, styled like matplotlib's
        names = [(label, color) for (label, _, _), color in zip(prepared, colors)]
        lw = max(draw.textbbox((0, 0), n, font=f_label)[2] for n, _ in names) + 50
        bx, by = RIGHT - 10 - lw, TOP + 10
        draw.rounded_rectangle((bx, by, bx + lw, by + 12 + 22 * len(names)), 4, fill="white", outline=LEGEND_EDGE)
        for i, (name, color) in enumerate(names):
            cy = by + 17 + 22 * i
            draw.line((bx + 8, cy, bx + 36, cy), fill=color, width=2)
            if markers:
                draw.ellipse((bx + 22 - MARKER_R, cy - MARKER_R, bx + 22 + MARKER_R, cy + MARKER_R), fill=color)
            _text(draw, (bx + 44, cy), name, f_label, "lm")
    return img
