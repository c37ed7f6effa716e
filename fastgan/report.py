"""What a run shows and leaves behind: the progress bar or log lines, metrics.jsonl, sample grids, the GIF.

Everything here runs once per log interval or sample, never per step, except `Progress.advance`, which only
moves a counter.
"""
from __future__ import annotations

import json
import math
import os
import re
from contextlib import suppress
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Column
from rich.text import Text

from .atomic import FULL, atomic_write, disk_full

console = Console(stderr=True, highlight=False, soft_wrap=True)  # log lines stay whole in files


def write_json(path: Path, payload) -> None:
    with atomic_write(path, "w") as f:
        f.write(json.dumps(payload, indent=2) + "\n")


def image_grid(images: torch.Tensor, nrow: Optional[int] = None) -> Image.Image:
    """A grid of [-1, 1] images as the tutorial draws it (2-pixel padding), on the fixed [-1, 1] scale so
    that grids from different steps compare."""
    from torchvision.utils import make_grid  # (here: `fastgan --help` and --version never import torchvision)
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    array = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images as uint8 pixels, rounded as image_grid rounds them (the PNGs fastgan writes)."""
    return images.detach().float().cpu().add(1).div(2).clamp(0, 1).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def single_image(image: torch.Tensor) -> Image.Image:
    """One [-1, 1] image (C, H, W) as a picture of its own, without a grid's padding."""
    array = to_uint8(image).permute(1, 2, 0).numpy()
    return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)


def save_image_atomic(image: Image.Image, path: Path, **kwargs) -> None:
    with atomic_write(path) as f:
        image.save(f, format=Image.registered_extensions()[path.suffix.lower()], **kwargs)


GRID_NAME = re.compile(r"fake_(ema_)?step(\d+)(?:_epoch(\d+))?$")  # fake_step0000064.png, fake_ema_..._epoch001.png


def grid_step(path: Path) -> Optional[int]:
    """The step a progress grid was drawn at, read off its name; None for another file."""
    match = GRID_NAME.match(path.stem)
    return int(match.group(2)) if match else None


def sample_grids(folder: Path) -> list[Path]:
    """The run's progress grids (the raw G's and --ema's), in the order of their steps."""
    return sorted((p for p in folder.glob("fake_*.png") if grid_step(p) is not None),
                  key=lambda p: (grid_step(p), p.name))
CAPTION_PX = 18  # the strip under each frame that says which grid it is


def frame_caption(grid: Path) -> str:
    """'step 1,234 · end of epoch 3 · EMA', read off a progress grid's file name ('' for another name)."""
    match = GRID_NAME.match(grid.stem)
    if not match:
        return ""
    ema, step, epoch = match.groups()
    return (f"step {int(step):,}" + (f" · end of epoch {int(epoch)}" if epoch else "")
            + (" · EMA" if ema else ""))


def captioned(grid: Path) -> Image.Image:
    """The grid with its caption in a white strip beneath it."""
    image = Image.open(grid).convert("RGB")
    frame = Image.new("RGB", (image.width, image.height + CAPTION_PX), "white")
    frame.paste(image, (0, 0))
    ImageDraw.Draw(frame).text((3, image.height + 2), frame_caption(grid), fill="black", font=caption_font())
    return frame


def caption_font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=CAPTION_PX - 4)  # Pillow 10.1 and newer: a scalable font
    except TypeError:
        return ImageFont.load_default()  # older Pillow: its one bitmap size


def save_animation(frames: Sequence[Path], path: Path, ms_per_frame: int = 400) -> None:
    """An animated GIF of the fixed-noise grids over training (the tutorial's animation, as a file), each frame
    captioned with its step (and epoch) so that a viewer knows where in training it is."""
    if not frames:
        return
    images = [captioned(f).quantize(256) for f in frames]
    first, rest = images[0], images[1:]
    with atomic_write(path) as f:
        first.save(f, format="GIF", save_all=True, append_images=rest, duration=ms_per_frame, loop=0)


def plural(count: int, word: str, many: str = "") -> str:
    """'1 epoch', '2 epochs', '1,234 metrics records'."""
    return f"{count:,} {word if count == 1 else many or word + 's'}"


def format_stats(stats: dict) -> str:
    return (f"Loss_D: {stats['loss_d']:.4f}  Loss_G: {stats['loss_g']:.4f}  D(x): {stats['d_x']:.4f}  "
            f"D(G(z)): {stats['d_g_z1']:.4f} / {stats['d_g_z2']:.4f}")


class MetricsLog:
    """metrics.jsonl: one JSON object per log interval, appended and flushed so that a crash loses nothing."""

    def __init__(self, path: Path):
        self.path, self.file = path, open(path, "ab", buffering=0)

    def write(self, record: dict) -> None:
        """Append one record, whole or not at all: a write cut short (a full disk) is cut off again, so that no
        torn record stays in the middle of the file after a resume."""
        line, before = (json.dumps(record) + "\n").encode(), os.fstat(self.file.fileno()).st_size
        try:
            written = 0
            while written < len(line):
                written += self.file.write(line[written:])
        except OSError as e:
            with suppress(OSError):
                os.ftruncate(self.file.fileno(), before)
            if e.errno in FULL:
                raise disk_full(self.path, e) from None
            raise

    def close(self) -> None:
        self.file.close()


class StatsColumn(ProgressColumn):
    """The latest statistics, on one line: cut with an ellipsis where the terminal is narrow, never wrapped."""

    def render(self, task) -> Text:
        return Text(task.fields["stats"], no_wrap=True, overflow="ellipsis")


class RunProgress:
    """A rich progress bar over all the run's iterations (epoch, iteration, images/s, ETA, latest statistics),
    or plain log lines at each log interval: with quiet=True, and where stderr is not a terminal (a log file,
    a pipe), in which a bar cannot redraw and rich would leave its last frame cut to 80 columns."""

    def __init__(self, total_steps: int, done_steps: int, quiet: bool, epochs: int, steps_per_epoch: int):
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.quiet = quiet or not console.is_interactive
        self.last_line = ""
        self.bar: Optional[Progress] = None
        if not self.quiet:
            # a narrow terminal (80 columns) shortens the bar and the statistics, never the count, the speed or the
            # times: rich narrows the columns that may wrap, and these may not
            whole = lambda: Column(no_wrap=True)  # noqa: E731
            self.bar = Progress(
                TextColumn("[bold]{task.fields[epoch]}", table_column=whole()), BarColumn(),
                MofNCompleteColumn(table_column=whole()), TextColumn("{task.fields[speed]}", table_column=whole()),
                TimeElapsedColumn(table_column=whole()), TextColumn("ETA", table_column=whole()),
                TimeRemainingColumn(table_column=whole()), StatsColumn(),
                console=console, transient=False)
            self.task = self.bar.add_task("train", total=total_steps, completed=done_steps,
                                          epoch="", speed="", stats="")

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def epoch(self, epoch: int, epochs: int) -> None:
        if self.bar:
            self.bar.update(self.task, epoch=f"epoch {epoch + 1}/{epochs}")

    def advance(self) -> None:
        if self.bar:
            self.bar.advance(self.task)

    def log(self, record: dict) -> None:
        """A log interval's record: the bar's figures, or a line where there is no bar."""
        self.last_line = (f"[{record['epoch']}/{self.epochs}][{record['iteration']}/{self.steps_per_epoch}]  "
                          f"{format_stats(record)}  {record['images_per_second']:,.0f} img/s")
        if self.bar:
            self.bar.update(self.task, speed=f"{record['images_per_second']:,.0f} img/s",
                            stats=f"D {record['loss_d']:.3f} G {record['loss_g']:.3f} D(x) {record['d_x']:.2f}")
        else:
            console.print(self.last_line)

    def epoch_end(self) -> None:
        """Above the bar, one line per epoch (its last statistics), so the history stays on screen."""
        if self.bar and self.last_line:
            self.bar.console.print(self.last_line)


def gb(nbytes: int) -> str:
    """A size in words: '2.5 GB', '12.6 MB', '30.7 KB' (decimal units, one decimal)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if nbytes >= size / 10:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes / 1e3:.1f} KB"
