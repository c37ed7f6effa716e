"""fastgan: DCGAN face generators trained as fast as the hardware allows; a faithful, readable version of the
PyTorch DCGAN faces tutorial."""
from .config import Config
from .errors import FastganError, TrainingStopped

__version__ = "0.1.0"


def train(cfg: Config):
    """Train as `cfg` says and return the run folder (see fastgan.loop.train). Raises FastganError for input it
    cannot use, and TrainingStopped when SIGINT/SIGTERM stopped the run after writing its checkpoint."""
    from .loop import train as _train
    return _train(cfg)


def evaluate(path, **options) -> list:
    """Measure a run folder's epochs or one checkpoint against real images (see fastgan.evaluate.evaluate):
    SWD by default, metrics=("swd", "fid", "kid") for all; returns one record (a dict) per checkpoint."""
    from .evaluate import evaluate as _evaluate
    return _evaluate(path, **options)


def generate(checkpoint, n: int = 64, **options):
    """Write a grid of n generated images (see fastgan.generate.generate); return its path."""
    from .generate import generate as _generate
    return _generate(checkpoint, n, **options)


def interpolate(checkpoint, rows: int = 8, steps: int = 8, **options):
    """Write rows of latent interpolations as a grid and a GIF (see fastgan.generate.interpolate)."""
    from .generate import interpolate as _interpolate
    return _interpolate(checkpoint, rows, steps, **options)


__all__ = ["Config", "FastganError", "TrainingStopped", "train", "evaluate", "generate", "interpolate",
           "__version__"]
