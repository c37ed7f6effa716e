"""The training options: one typed dataclass, validated at the edge, saved as the run folder's config.json."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .errors import FastganError
from .models import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_image_size

LOADER_CHOICES = ("auto", "dali", "torch")
DALI_DECODER_CHOICES = ("auto", "cpu", "mixed")
AMP_CHOICES = ("off", "auto", "fp16", "bf16")  # "auto": fp16 + GradScaler on CUDA, bf16 on the CPU
DEVICE_CHOICES = ("auto", "cpu", "cuda")
MODEL_FIELDS = ("image_size", "nc", "nz", "ngf", "ndf")  # what a checkpoint's weights depend on
FLAGS = {"ema_kimg": "--ema"}  # fields whose flag is not --field-name
# Seeds go to numpy's SeedSequence (non-negative only) and torch generators (at most 2**64 - 1), and eval seeds
# its generated side with seed + 1: 32 bits are safe everywhere, and every command takes the same range
MAX_SEED = 2**32 - 1
SEED_RANGE = f"an integer from 0 to {MAX_SEED}"


def seed_problem(value) -> Optional[str]:
    """Why `value` cannot be a seed of fastgan train, generate, eval or synth, or None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        return f"must be {SEED_RANGE}, got {value!r}"
    return None


def flag_of(field: str) -> str:
    return FLAGS.get(field, "--" + field.replace("_", "-"))


@dataclass
class Config:
    # data
    root: Optional[str] = None        # folder of images (root/*.jpg or root/sub/*.jpg); None: the demo faces
    demo_images: int = 4096           # size of the built-in demo set, used only when root is None
    data: Optional[str] = None        # a prepared .fgd file (fastgan prepare): decoded once, held in memory
    mirror: bool = False              # with data: flip a random half of each epoch's images horizontally
    workers: Optional[int] = None     # DataLoader worker processes; None: this process's share of the cores less one
    loader: str = "auto"              # auto | dali | torch; auto: DALI on CUDA when it is installed, else torch
    dali_decoder: str = "auto"        # auto | cpu | mixed (GPU); auto: mixed on CUDA, cpu otherwise
    dali_threads: Optional[int] = None  # DALI's CPU threads; None: as workers
    hw_decoder_load: float = 0.65     # share of JPEGs sent to the GPU's hardware decoder (DALI's default)
    # model: the tutorial's defaults
    image_size: int = 64              # power of two from 16 to 256
    nc: int = 3                       # image channels: 3 (RGB) or 1 (grayscale)
    nz: int = 100                     # length of the latent vector z
    ngf: int = 64                     # generator width
    ndf: int = 64                     # discriminator width
    # optimisation: the tutorial's defaults
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-4
    beta1: float = 0.5                # Adam beta1; beta2 stays 0.999 as in the DCGAN paper
    seed: int = 999
    ema_kimg: Optional[float] = None  # --ema: G's moving average, half-life in thousands of images; None: off
    # speed: each of these is checked against eager fp32 in the tests
    device: str = "auto"              # auto: cuda when available, else cpu
    amp: str = "off"                  # off | auto | fp16 | bf16
    channels_last: bool = False
    compile: bool = False             # torch.compile both networks
    cuda_graphs: bool = False         # capture the whole D+G step in one CUDA graph (CUDA only)
    # torchrun
    sync_bn: bool = False             # sync BatchNorm (fastgan.syncbn): statistics over the global batch
    # reporting
    out: Optional[str] = None         # run folder; None: runs/<timestamp>
    log_every: int = 50               # iterations between statistics reads (each one is a host sync)
    sample_every: int = 500           # iterations between fixed-noise grids (also one at each epoch end)
    quiet: bool = False               # log lines only, no progress bar
    tensorboard: bool = False         # also TensorBoard events in run/tensorboard/ (the tensorboard extra)
    ckpt_every: int = 0               # iterations between mid-epoch checkpoints (last.pt); 0: epoch ends only
    eval_every: int = 0               # epochs between quality measurements (fastgan.evaluate) in metrics.jsonl; 0: none
    eval_images: int = 16384          # real and generated images each measurement compares (SWD's ProGAN count)
    inception: Optional[str] = None   # FID's Inception weights file for --eval-every; None: torch.hub's cache, if there
    resume: Optional[str] = None      # checkpoint path, or "auto" for the run folder's latest
    dry_run: bool = False             # a couple of steps on a tiny batch, nothing written

    @classmethod
    def demo(cls, **overrides: Any) -> "Config":
        """The built-in demo: small faces and narrow networks so that a 2-core CPU trains it in minutes."""
        preset = dict(image_size=32, ngf=32, ndf=32, batch_size=64, epochs=10, log_every=16, sample_every=64)
        return cls(**{**preset, **overrides})

    def validate(self, flags: bool = False) -> "Config":
        """Raise FastganError with one clear line for the first bad option; return self.

        The line names the option as the user wrote it: its flag (--lr) for the command line (flags=True),
        the field and its flag (lr (--lr)) for the Python API."""
        def name(field: str) -> str:
            return flag_of(field) if flags else f"{field} ({flag_of(field)})"
        try:
            check_image_size(self.image_size)
        except (TypeError, ValueError):
            raise FastganError(f"{name('image_size')} must be a power of two from {MIN_IMAGE_SIZE} to "
                               f"{MAX_IMAGE_SIZE} (16, 32, 64, 128, 256), got {self.image_size!r}") from None
        positive = ("nz", "ngf", "ndf", "epochs", "batch_size", "log_every", "sample_every", "demo_images",
                    "eval_images")
        for field in positive:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FastganError(f"{name(field)} must be a positive integer, got {value!r}")
        if seed_problem(self.seed):
            raise FastganError(f"{name('seed')} {seed_problem(self.seed)}")
        if self.nc not in (1, 3):
            raise FastganError(f"{name('nc')} must be 1 (grayscale) or 3 (RGB), got {self.nc!r}")
        if isinstance(self.ckpt_every, bool) or not isinstance(self.ckpt_every, int) or self.ckpt_every < 0:
            raise FastganError(f"{name('ckpt_every')} must be 0 (epoch ends only) or a positive integer, "
                               f"got {self.ckpt_every!r}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise FastganError(f"{name('eval_every')} must be 0 (no measurements) or a positive number of epochs, "
                               f"got {self.eval_every!r}")
        if self.eval_every > self.epochs:
            raise FastganError(f"{name('eval_every')} {self.eval_every} measures at epoch {self.eval_every} and every "
                               f"{self.eval_every} epochs after, but the run ends at epoch {self.epochs}: nothing would "
                               f"be measured; lower {name('eval_every')} or raise {name('epochs')}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise FastganError(f"{name('workers')} must be 0 or more, got {self.workers!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise FastganError(f"{name('lr')} must be in (0, 1), got {self.lr!r}")
        if not (isinstance(self.beta1, (int, float)) and 0 <= self.beta1 < 1):
            raise FastganError(f"{name('beta1')} must be in [0, 1), got {self.beta1!r}")
        ema_kimg = self.ema_kimg
        if ema_kimg is not None and (isinstance(ema_kimg, bool) or not isinstance(ema_kimg, (int, float))
                                     or not 0 < ema_kimg < float("inf")):
            raise FastganError(f"{name('ema_kimg')} must be a positive number of thousands of images, "
                               f"got {self.ema_kimg!r}")
        if self.data is not None and self.root is not None:
            raise FastganError(f"give {name('root')} (image files) or {name('data')} (a prepared file), not both")
        if self.mirror and self.data is None:
            raise FastganError(f"{name('mirror')} works with {name('data')} (a prepared file) only")
        if self.loader not in LOADER_CHOICES:
            raise FastganError(f"{name('loader')} must be one of {', '.join(LOADER_CHOICES)}, got {self.loader!r}")
        if self.dali_decoder not in DALI_DECODER_CHOICES:
            raise FastganError(f"{name('dali_decoder')} must be one of {', '.join(DALI_DECODER_CHOICES)}, "
                               f"got {self.dali_decoder!r}")
        if self.dali_threads is not None and (isinstance(self.dali_threads, bool)
                                              or not isinstance(self.dali_threads, int) or self.dali_threads < 1):
            raise FastganError(f"{name('dali_threads')} must be a positive integer, got {self.dali_threads!r}")
        if not (isinstance(self.hw_decoder_load, (int, float)) and 0 <= self.hw_decoder_load <= 1):
            raise FastganError(f"{name('hw_decoder_load')} must be in [0, 1], got {self.hw_decoder_load!r}")
        if self.amp not in AMP_CHOICES:
            raise FastganError(f"{name('amp')} must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.device not in DEVICE_CHOICES:
            raise FastganError(f"{name('device')} must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Build from a saved config, ignoring keys this version does not know (older or newer files)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
