"""`fastgan eval`: how good a trained generator's images are, measured against real images.

    fastgan eval runs/celeba --root ~/celeba        # every epoch's checkpoint: eval.jsonl, eval.png, a table
    fastgan eval runs/celeba/netG_ema.pth --data celeba64.fgd --metrics swd,fid,kid

Metrics: SWD (fastgan.metrics.swd: ProGAN's sliced Wasserstein distance, x 1e3 per pyramid level and their
mean; no download), FID and KID (fastgan.metrics.fid, with pytorch-fid's Inception network: the weights come from
torch.hub's cache or --inception PATH). N real images are drawn (seeded) from the data, decoded exactly as
training decodes them, and as many generated ones from seeded noise; every figure is of uint8 pixels, the images
as saved.

The real side is cached per data set, image size and count (~/.cache/fastgan/eval/): its pixels for SWD and its
Inception features for FID/KID, so a second eval of the same data costs only the generated side.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .. import checkpoint
from ..atomic import atomic_write
from ..config import seed_problem
from ..errors import FastganError
from ..data.files import cache_dir, default_workers
from ..models import Generator
from ..report import to_uint8
from ..sampling import sample

METRICS = ("swd", "fid", "kid")
DEFAULT_METRICS = ("swd",)  # download-free; FID and KID on request (they need the Inception weights)
BATCH = 250  # images per generator or Inception batch: 250 x 3 x 299 x 299 float32 = 270 MB at the Inception
CACHE_VERSION = 1

Progress = Optional[Callable[[str, int, Optional[int]], None]]  # (task, advance, total)


# ---------------------------------------------------------------------------------------------------------
# the two sides

@dataclass
class RealImages:
    pixels: torch.Tensor  # uint8 (N, C, S, S)
    key: str              # the cache's name for this data set, size, count and seed
    description: str      # for the table and eval.jsonl

    def cache(self) -> Path:
        return cache_dir() / "eval" / self.key


def choose(count: int, n: int, seed: int) -> np.ndarray:
    """Which n of count images are compared: a seeded draw without replacement, in index order."""
    if n >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng([seed, 7]).choice(count, n, replace=False))


def real_images(image_size: int, nc: int, n: int, seed: int = 0, root: Optional[str] = None,
                data: Optional[str] = None, workers: Optional[int] = None, progress: Progress = None) -> RealImages:
    """n real images (all of them where the data holds fewer), as uint8 pixels of the training geometry: from a
    prepared file (`data`), or decoded from the folder `root` exactly as the torch loader decodes them."""
    if data is not None:
        from ..data.prepared import content_digest, load_pixels
        pixels, manifest = load_pixels(data, image_size, nc, advice=(  # checks the size and the checksum
            f"give --root, or --data with images of the model's size (fastgan prepare --image-size {image_size} "
            f"--nc {nc} makes one)"))
        picked = choose(len(pixels), n, seed)
        key = digest("data", content_digest(manifest), image_size, nc, len(picked), seed)
        description = f"{len(picked):,} of the {len(pixels):,} images of {Path(data).expanduser()}"
        return RealImages(pixels[torch.from_numpy(picked)].permute(0, 3, 1, 2).contiguous(), key, description)
    from ..data.files import index_images
    from ..data.prepared import decode_with_pil
    folder = Path(root).expanduser()
    index = index_images(folder, workers)
    if not index.good:
        raise FastganError(f"--root {folder}: none of its image files can be decoded")
    picked = choose(len(index.good), n, seed)
    paths = [index.good[i] for i in picked]
    # each file by its place under the folder (the folder is keyed resolved): every spelling of --root finds the
    # same entry; a changed file is another set
    stamp = [(str(Path(p).relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    key = digest("root", str(folder.resolve()), stamp, image_size, nc, seed)
    description = f"{len(paths):,} of the {len(index.good):,} images under {folder}"
    cached = cache_dir() / "eval" / key / "pixels.npy"
    if cached.is_file():
        return RealImages(torch.from_numpy(np.load(cached)), key, description)
    pixels = np.empty((len(paths), image_size, image_size, nc), dtype=np.uint8)
    step = (lambda k: progress("decoding real images", k, len(paths))) if progress else None
    decode_with_pil(paths, pixels, image_size, nc, workers or default_workers(), step)
    real = RealImages(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), key, description)
    save_array(cached, real.pixels.numpy())
    return real


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts]).encode()).hexdigest()[:20]


def save_array(path: Path, array: np.ndarray) -> None:
    """A cache entry, written whole or not at all; an unwritable cache only costs the work next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, durable=False) as f:
            np.save(f, array)
    except OSError:
        pass


@torch.no_grad()
def fake_images(netG: torch.nn.Module, n: int, seed: int, device: torch.device, progress: Progress = None
                ) -> torch.Tensor:
    """n generated images, uint8 (n, C, S, S) on the CPU, from seeded noise (the same seed: the same images)."""
    nz = netG.main[0].in_channels
    noise = torch.randn(n, nz, 1, 1, generator=torch.Generator().manual_seed(seed))
    batches = []
    for start in range(0, n, BATCH):
        batches.append(to_uint8(sample(netG, noise[start:start + BATCH].to(device))).cpu())
        if progress:
            progress("generating images", len(batches[-1]), n)
    return torch.cat(batches)


def batches_of(pixels: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, len(pixels), BATCH):
        yield pixels[start:start + BATCH]


# ---------------------------------------------------------------------------------------------------------
# the metrics

class Metrics:
    """Measures generators against one set of real images: SWD from the pixels, FID/KID from the Inception
    features (the real ones computed once, and cached)."""

    def __init__(self, real: RealImages, metrics: Sequence[str], device: torch.device, seed: int = 0,
                 inception: Optional[str] = None, progress: Progress = None):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise FastganError(f"--metrics takes a comma-separated list of {', '.join(METRICS)}, got "
                               f"{','.join(metrics) or 'nothing'}")
        self.real, self.metrics, self.device, self.seed = real, tuple(metrics), device, seed
        self.progress = progress
        self.inception = None
        if "fid" in metrics or "kid" in metrics:
            from .inception import hub_checkpoint, load_inception
            self.inception = load_inception(inception, device)  # one line, exit 2, where the weights are missing
            self._real_features = None
            weights = Path(inception).expanduser().resolve() if inception else hub_checkpoint()
            stat = weights.stat() if weights.is_file() else None
            self.weights_id = digest(str(weights), stat and stat.st_size, stat and stat.st_mtime_ns)

    def real_features(self) -> np.ndarray:
        if self._real_features is None:
            cached = self.real.cache() / f"inception-{self.weights_id}.npy"  # other weights: other features
            if cached.is_file():
                self._real_features = np.load(cached).astype(np.float64)
            else:
                self._real_features = self.features(self.real.pixels, "Inception features of the real images")
                save_array(cached, self._real_features.astype(np.float32))  # the network's own float32: lossless
        return self._real_features

    def features(self, pixels: torch.Tensor, task: str) -> np.ndarray:
        from .fid import inception_features
        step = (lambda k: self.progress(task, k, len(pixels))) if self.progress else None
        return inception_features(self.inception, batches_of(pixels), self.device, step)

    def __call__(self, fake: torch.Tensor) -> dict[str, float]:
        """The metrics of the generated images `fake` (uint8, as many as the real ones)."""
        results: dict[str, float] = {}
        if "swd" in self.metrics:
            from .swd import DIRECTION_REPEATS, sliced_wasserstein_distance, swd_resolutions
            total = len(swd_resolutions(fake.shape[-1])) * DIRECTION_REPEATS
            step = (lambda k: self.progress("SWD", k, total)) if self.progress else None
            results.update(sliced_wasserstein_distance(self.real.pixels, fake, self.seed, step, self.device))
        if self.inception is not None:
            from .fid import feature_statistics, frechet_distance, kernel_inception_distance
            real = self.real_features()
            generated = self.features(fake, "Inception features of the generated images")
            if "fid" in self.metrics:
                results["fid"] = frechet_distance(*feature_statistics(real), *feature_statistics(generated))
            if "kid" in self.metrics:
                results["kid"] = kernel_inception_distance(real, generated, seed=self.seed)
        return results


# ---------------------------------------------------------------------------------------------------------
# what is evaluated: a run folder's epochs, or one file

@dataclass
class Target:
    path: Path
    epoch: Optional[int]      # the epoch it was taken in: its end, or (iteration > 0) inside it
    step: Optional[int]
    payload: dict
    iteration: int = 0        # batches of that epoch done; 0 at its end
    epochs: Optional[float] = None  # epochs trained, a fraction inside an epoch: eval.png's x


def taken_at(record: dict) -> str:
    """Where a record's checkpoint was taken, for the table: '3' (the end of epoch 3), '1, batch 2' (inside epoch
    1), '' (a plain generator file)."""
    if record["epoch"] is None:
        return ""
    return f"{record['epoch']}" + (f", batch {record['iteration']}" if record.get("iteration") else "")


def steps_per_epoch(payload: dict) -> Optional[int]:
    """A checkpoint's batches per epoch: its data's size over the global batch (None where it does not say)."""
    images, batch = payload.get("images"), payload.get("config", {}).get("batch_size")
    return images // batch if images and batch else None


def targets(path: Path, epochs: Optional[Sequence[int]]) -> tuple[Optional[Path], list[Target]]:
    """(run folder or None, the checkpoints to evaluate): a run folder's epoch checkpoints (those of `epochs`,
    or all; its last.pt where no epoch has ended yet), or the one file given."""
    path = path.expanduser()
    if not path.exists():
        raise FastganError(f"{path} does not exist")
    if path.is_dir():
        files = sorted((path / "checkpoints").glob("epoch[0-9][0-9][0-9].pt"))
        last = path / "checkpoints" / "last.pt"
        if not files and last.is_file():  # stopped inside its first epoch: its one checkpoint
            if epochs:
                raise FastganError(f"{path} has no checkpoint of epoch {epochs[0]}: no epoch has ended yet; "
                                   "leave --epochs out to measure its checkpoints/last.pt")
            return path, [target_of(last)]
        if not files:
            raise FastganError(f"{path} holds no checkpoints (checkpoints/epochNNN.pt, checkpoints/last.pt): is it "
                               "a fastgan run folder?")
        by_epoch = {int(f.stem[5:]): f for f in files}
        if epochs:
            missing = [e for e in epochs if e not in by_epoch]
            if missing:
                raise FastganError(f"{path} has no checkpoint of epoch {missing[0]} (it has epochs "
                                   f"{', '.join(map(str, sorted(by_epoch)))})")
            by_epoch = {e: by_epoch[e] for e in sorted(set(epochs))}
        chosen = [(e, f) for e, f in sorted(by_epoch.items())]
        return path, [target_of(f) for _, f in chosen]
    if epochs:
        raise FastganError("--epochs picks checkpoints of a run folder; give the folder, not a file")
    return None, [target_of(path)]


def target_of(path: Path) -> Target:
    """The file at `path`, labelled by where its checkpoint was taken: a checkpoint's "epoch" counts the epochs
    done, so one taken inside an epoch (iteration > 0) was taken in the next."""
    payload = checkpoint.read_file(path)
    if not checkpoint.is_fastgan_checkpoint(payload):
        return Target(path, None, None, payload)
    done, iteration = payload["epoch"], payload.get("iteration", 0)
    steps = steps_per_epoch(payload)
    epochs = done + iteration / steps if iteration and steps else float(done)
    return Target(path, done + 1 if iteration else done, payload["step"], payload, iteration, epochs)


def build_generator(target: Target, ema: bool, device: torch.device) -> tuple[Generator, str]:
    from ..generate import generator_from_payload
    return generator_from_payload(target.payload, target.path, device, ema)


def run_data(targets_: list[Target], root: Optional[str], data: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """The real images: --root or --data as given, else the training run's own data (its checkpoint's
    config: the folder, the prepared file, or the demo faces)."""
    if root is not None or data is not None:
        if root is not None and data is not None:
            raise FastganError("give --root (image files) or --data (a prepared file), not both")
        return root, data
    config = next((t.payload["config"] for t in targets_ if checkpoint.is_fastgan_checkpoint(t.payload)), None)
    if config is None:
        config = run_config_beside(targets_[0].path)
    if config is None:
        raise FastganError(f"{targets_[0].path} is a plain generator file outside a run folder: say which real "
                           "images to compare with, --root DIR or --data FILE")
    return data_of(config)


def run_config_beside(path: Path) -> Optional[dict]:
    """The options of the run folder a plain generator file sits in (run/netG.pth, run/netG_ema.pth), or None."""
    config_file = path.expanduser().resolve().parent / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "image_size" in config else None


def data_of(config: dict) -> tuple[Optional[str], Optional[str]]:
    """(root, data) of a run's options: its prepared file, its folder, or the demo faces (drawn if need be)."""
    if config.get("data"):
        return None, config["data"]
    if config.get("root"):
        return config["root"], None
    from ..data.demo import demo_faces
    return str(demo_faces(config.get("demo_images", 4096), quiet=True)), None


def inception_at_hand(path: Optional[str]) -> bool:
    """Whether FID's Inception weights can be had without a download: a path given, or torch.hub's copy."""
    from .inception import hub_checkpoint
    return path is not None or hub_checkpoint().is_file()


class DuringTraining:
    """--eval-every: the run's generator measured against its own data at epoch ends; the real side (pixels,
    Inception features) is read once, on the first call. SWD always, FID and KID where the weights are at hand
    (never downloaded in the middle of a run)."""

    def __init__(self, config: dict, n: int, device: torch.device, inception: Optional[str] = None, seed: int = 0):
        self.config, self.n, self.device, self.inception, self.seed = config, n, device, inception, seed
        self.metrics = ("swd", "fid", "kid") if inception_at_hand(inception) else ("swd",)
        self.measure: Optional[Metrics] = None

    def __call__(self, netG: torch.nn.Module) -> dict[str, float]:
        if self.measure is None:
            root, data = data_of(self.config)
            real = real_images(self.config["image_size"], self.config["nc"], self.n, self.seed, root, data,
                               self.config.get("workers"))
            self.measure = Metrics(real, self.metrics, self.device, self.seed, self.inception)
        started = time.perf_counter()
        fake = fake_images(netG, len(self.measure.real.pixels), self.seed + 1, self.device)
        return {**self.measure(fake), "eval_images": len(fake), "eval_seconds": round(time.perf_counter() - started, 1)}


def evaluate(path: str | os.PathLike, root: Optional[str] = None, data: Optional[str] = None,
             n: int = 16384, metrics: Sequence[str] = DEFAULT_METRICS, epochs: Optional[Sequence[int]] = None,
             inception: Optional[str] = None, seed: int = 0, device: str = "auto", ema: bool = True,
             workers: Optional[int] = None, progress: Progress = None) -> list[dict]:
    """Measure the generator(s) at `path` (a run folder: each epoch's checkpoint, or those of `epochs`; or one
    checkpoint or generator file); return one record per checkpoint. A run folder gets the records appended to
    its eval.jsonl and eval.png redrawn from all of them."""
    from ..distributed import resolve_device
    if n < 2:
        raise FastganError(f"--n must be at least 2, got {n}")
    if seed_problem(seed):
        raise FastganError(f"--seed {seed_problem(seed)}")
    run, chosen = targets(Path(path), epochs)
    torch_device = resolve_device(device)
    root, data = run_data(chosen, root, data)
    first, _ = build_generator(chosen[0], ema, torch.device("cpu"))
    image_size, nc = first_image_shape(first)
    real = real_images(image_size, nc, n, seed, root, data, workers, progress)
    measure = Metrics(real, metrics, torch_device, seed, inception, progress)
    records = []
    for target in chosen:
        started = time.perf_counter()
        netG, _ = build_generator(target, ema, torch_device)
        which = generator_kind(target, ema)
        if first_image_shape(netG) != (image_size, nc):
            raise FastganError(f"{target.path} makes {first_image_shape(netG)} images, the first checkpoint "
                               f"{(image_size, nc)}: evaluate them separately")
        fake = fake_images(netG, len(real.pixels), seed + 1, torch_device, progress)
        record = {"checkpoint": str(target.path), "epoch": target.epoch, "iteration": target.iteration,
                  "epochs": target.epochs, "step": target.step, "generator": which,
                  "n": len(real.pixels), "real": real.description, "seed": seed, **measure(fake),
                  "seconds": round(time.perf_counter() - started, 1),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        records.append(record)
        if run is not None:
            append_record(run / "eval.jsonl", record)
    if run is not None:
        plot_eval(run)
    return records


def generator_kind(target: Target, ema: bool) -> str:
    """"ema" or "raw" for a checkpoint (as checkpoint.generator_state picks), the file's name for a plain one."""
    if not checkpoint.is_fastgan_checkpoint(target.payload):
        return target.path.name
    return "ema" if ema and target.payload.get("netG_ema") is not None else "raw"


def first_image_shape(netG: Generator) -> tuple[int, int]:
    """(image size, channels) of a DCGAN generator: 4 px doubled by each transposed convolution after the first."""
    convs = [m for m in netG.main if isinstance(m, torch.nn.ConvTranspose2d)]
    return 4 * 2 ** (len(convs) - 1), convs[-1].out_channels


def append_record(path: Path, record: dict) -> None:
    """One line per evaluation, appended: earlier evaluations stay (the plot uses each epoch's latest)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a line cut short by a crash: the others still count
    return records


def eval_panels(records: list[dict]) -> list[tuple[str, list]]:
    """A panel per metric, a line per generator (raw, EMA) and per number of images compared: figures of other
    --n are other measurements (SWD's noise and bias change with n), so they are drawn apart and labelled. x: the
    epochs trained ("epochs", a fraction for a checkpoint taken inside an epoch; "epoch" in older records)."""
    latest: dict[tuple[float, str, int], dict] = {}
    for record in records:
        if record.get("epoch") is not None:
            x = record.get("epochs", record["epoch"])
            latest[(x, record.get("generator"), record.get("n"))] = record
    panels = []
    for metric, title in (("swd", "SWD x 1e3 (lower is better)"), ("fid", "FID (lower is better)"),
                          ("kid", "KID (lower is better)")):
        series = []
        for kind, n in sorted({(k, n) for _, k, n in latest}, key=lambda kn: (kn[0] != "raw", kn[1] or 0)):
            points = sorted((e, r[metric]) for (e, k, m), r in latest.items() if (k, m) == (kind, n) and metric in r)
            if points:
                label = (f"{metric.upper()}{' (EMA)' if kind == 'ema' else ''}"
                         + (f", {n:,} images" if n is not None else ""))
                series.append((label, [p[0] for p in points], [p[1] for p in points]))
        if series:
            panels.append((title, series))
    return panels


def plot_eval(run: Path) -> Optional[Path]:
    """eval.png: each metric over training (x: epochs), from each epoch's latest record in eval.jsonl."""
    from ..plot import plot_panels
    panels = eval_panels(read_records(run / "eval.jsonl"))
    if not panels:
        return None
    path = run / "eval.png"
    plot_panels(panels, "epoch", path)
    return path
