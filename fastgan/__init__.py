"""fastgan: DCGAN face generators trained as fast as the hardware allows; a faithful, readable version of the
PyTorch DCGAN faces tutorial."""
from .config import Config
from .errors import FastganError

__version__ = "0.1.0"


def train(cfg: Config):
    """Train as `cfg` says and return the run folder (see fastgan.loop.train)."""
    from .loop import train as _train
    return _train(cfg)


__all__ = ["Config", "FastganError", "train", "__version__"]
