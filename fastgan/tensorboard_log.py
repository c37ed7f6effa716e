"""--tensorboard: the metrics records and the sample grids as TensorBoard events in the run folder
(run/tensorboard/), beside metrics.jsonl, as StyleGAN2-ADA writes its stats beside its JSON lines.

Written through torch.utils.tensorboard.SummaryWriter, which needs the tensorboard package (the `tensorboard`
extra). Like MetricsLog it runs once per log interval or sample, never per step.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from .errors import FastganError
from .report import grid_step, sample_grids

INSTALL_HINT = 'pip install "fastgan[tensorboard]"'
FOLDER = "tensorboard"  # inside the run folder: `tensorboard --logdir runs` shows every run
# metrics.jsonl's key -> TensorBoard's tag; the part before "/" is the section TensorBoard groups it under
TAGS = {
    "loss_d": "Loss/D",
    "loss_g": "Loss/G",
    "d_x": "D_output/real",                   # D(x)
    "d_g_z1": "D_output/fake_before_D_step",  # D(G(z)) before D's update
    "d_g_z2": "D_output/fake_after_D_step",   # D(G(z)) after it, as G sees it
    "swd": "Quality/SWD", "fid": "Quality/FID", "kid": "Quality/KID",  # --eval-every's records
    "images_per_second": "Speed/images_per_second",
    "images_per_second_per_rank": "Speed/images_per_second_per_rank",
    "loss_scale": "AMP/loss_scale",
}
SAMPLES_TAG = "Samples/fixed_noise"
REAL_TAG = "Samples/real"


def summary_writer_class():
    """torch's SummaryWriter, or one line naming the extra. Called before the run folder is made, so a missing
    package costs nothing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # also what torch raises for a tensorboard older than 1.15
        raise FastganError(f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL_HINT}"
                           ) from None
    return SummaryWriter


class TensorBoardLog:
    """One SummaryWriter per run (and per resume, each its own events file in the same folder)."""

    def __init__(self, run: Path):
        # A resumed run trains again the steps after its checkpoint. TensorBoard hides the earlier events from
        # purge_step on, which is kept in step with metrics.jsonl: just after its last record.
        last = last_record_step(run / "metrics.jsonl")
        new = not (run / FOLDER).exists()
        self.writer = summary_writer_class()(str(run / FOLDER), purge_step=None if last is None else last + 1)
        if new:
            self.image(Image.open(run / "samples" / "real.png"), 0, REAL_TAG)
        if last is not None:
            # grids the first attempt kept (up to its checkpoint) but made after its last record: the purge hid them
            for path in sample_grids(run / "samples"):
                if grid_step(path) > last:
                    self.sample(Image.open(path), path)

    def write(self, record: dict) -> None:
        """One metrics.jsonl record: each of its statistics at the record's step."""
        for key, value in record.items():
            if key in TAGS:
                self.writer.add_scalar(TAGS[key], value, record["step"])
        self.writer.flush()  # once per log interval, as metrics.jsonl: a crash loses no record

    def sample(self, grid: Image.Image, path: Path) -> None:
        """A fixed-noise grid, at the step its file is named after (samples/fake_[ema_]step<N>...png)."""
        self.image(grid, grid_step(path))
        self.writer.flush()

    def image(self, grid: Image.Image, step: int, tag: str = SAMPLES_TAG) -> None:
        self.writer.add_image(tag, np.asarray(grid.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def last_record_step(path: Path) -> Optional[int]:
    """The step of metrics.jsonl's last record; None without one (a new run)."""
    last = None
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            last = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            pass  # not a record of ours (state.trim_metrics leaves such lines in place too)
    return last
