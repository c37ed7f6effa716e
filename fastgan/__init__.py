"""fastgan: DCGAN face generators trained as fast as the hardware allows; a faithful, readable version of the
PyTorch DCGAN faces tutorial."""
import os

# torch's OpenMP threads sleep while they wait for work instead of spinning: where other programs share the cores, the
# spinning threads take the turns of the one they wait for, and a run trained at a tenth of its speed
# (bench/threads.py). OpenMP reads the policy once, as torch loads it, so it is set here, before anything imports
# torch; a waiting policy the user set (OMP_WAIT_POLICY, GOMP_SPINCOUNT, KMP_BLOCKTIME) wins.
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"} & os.environ.keys():
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from .config import Config  # noqa: E402 (imports torch)
from .errors import FastganError, TrainingStopped  # noqa: E402

__version__ = "0.1.0"


def train(cfg: Config):
    """Train as `cfg` says and return the run folder (see fastgan.loop.train). Raises FastganError for input it
    cannot use, and TrainingStopped when SIGINT/SIGTERM stopped the run after writing its checkpoint."""
    from .loop import train as _train
    return _train(cfg)


__all__ = ["Config", "FastganError", "TrainingStopped", "train", "__version__"]
