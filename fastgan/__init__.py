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


__all__ = ["Config", "FastganError", "TrainingStopped", "train", "__version__"]
