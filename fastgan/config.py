"""The training options: one typed dataclass, each field declared once (its default, flag, help, rule and argument
group), from which `fastgan train`'s parser (cli.py), the validation (Config.validate) and the options
table of docs/options.md (options_table) are all built. The run folder keeps the options as config.json.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import FastganError
from .models import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_image_size

LOADER_CHOICES = ("auto", "cache", "dali", "torch")
DALI_DECODER_CHOICES = ("auto", "cpu", "mixed")
# the share of JPEGs for the hardware JPEG decoder (--hw-decoder-load), wherever DALI decodes on the GPU
HW_DECODER_LOAD = 0.65
# each decoder as fastgan prepare --decoder and a cache file's name say it
DECODER_FLAGS = {"pil": "pil", "cpu": "dali-cpu", "mixed": "dali-gpu"}
DATA_MEMORY_CHOICES = ("auto", "device", "host", "disk")
AMP_CHOICES = ("off", "auto", "fp16", "bf16")  # "auto": fp16 + GradScaler on CUDA; bf16 or fp32 on the CPU (cpu.py)
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DALI_FIELDS = ("dali_decoder", "dali_threads", "hw_decoder_load")  # how DALI decodes: --loader dali, cache or auto
MODEL_FIELDS = ("image_size", "nc", "nz", "ngf", "ndf")  # what a checkpoint's weights depend on
# Seeds go to numpy's SeedSequence (non-negative only) and torch generators (at most 2**64 - 1), and eval seeds
# its generated side with seed + 1: 32 bits are safe everywhere, and every command takes the same range
MAX_SEED = 2**32 - 1
SEED_RANGE = f"an integer from 0 to {MAX_SEED}"

# ---- rules: each returns why a value is refused (the words after "--flag"), or None ----------------------------

Rule = Callable[[Any], Optional[str]]


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def at_least(minimum: int, wanted: str) -> Rule:
    return lambda v: None if is_int(v) and v >= minimum else f"must be {wanted}, got {v!r}"


def between(low: float, high: float, low_open: bool, high_open: bool) -> Rule:
    shown = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def rule(v):
        inside = (isinstance(v, (int, float)) and not isinstance(v, bool) and (low < v if low_open else low <= v)
                  and (v < high if high_open else v <= high))
        return None if inside else f"must be in {shown}, got {v!r}"
    return rule


def one_of(choices: tuple[str, ...]) -> Rule:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


def seed_problem(value) -> Optional[str]:
    """Why `value` cannot be a seed of fastgan train, generate, eval or synth, or None."""
    if not is_int(value) or not 0 <= value <= MAX_SEED:
        return f"must be {SEED_RANGE}, got {value!r}"
    return None


def image_size_problem(value) -> Optional[str]:
    try:
        check_image_size(value)
        return None
    except (TypeError, ValueError):
        return (f"must be a power of two from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (16, 32, 64, 128, 256), "
                f"got {value!r}")


def positive_kimg(value) -> Optional[str]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"):
        return None
    return f"must be a positive number of thousands of images, got {value!r}"


POSITIVE = at_least(1, "a positive integer")

# ---- the declaration --------------------------------------------------------------------------------------------


def option(default, help: str, group: str, *, rule: Optional[Rule] = None, metavar: Optional[str] = None,
           flag: Optional[str] = None, shown: Optional[str] = None, nargs: Optional[str] = None, const=None,
           commands: tuple[str, ...] = ("train",)):
    """A Config field and its command-line option, declared once.

    help: what it does (docs/options.md's table and --help); group: its --help section; rule: its check (None: a
    plain choice, a path or a switch); metavar: how --help writes its value (None: a switch); flag: where it is not
    --field-name; shown: its default in words where the value alone would mislead (None: the value, and the demo
    preset's where that differs); nargs/const: a flag that may stand alone (--ema, --amp)."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, group=group, rule=rule, metavar=metavar, flag=flag, shown=shown, nargs=nargs, const=const,
        commands=commands))


CORES_LESS_ONE = "each process's share of the cores less one"


@dataclass
class Config:
    # data
    root: Optional[str] = option(
        None, "image folder: DIR/*.jpg or the tutorial's DIR/subfolder/*.jpg", "data", metavar="DIR",
        shown="the built-in demo faces", commands=("train", "prepare"))
    demo_images: int = option(4096, "size of the built-in demo set (used without --root)", "data", rule=POSITIVE,
                              metavar="N")
    data: Optional[str] = option(
        None, "a prepared file (fastgan prepare): images decoded once, read where --data-memory says; its image size "
        "and channels are the file's, and a file of the demo faces trains with the demo preset", "data", metavar="FILE")
    mirror: bool = option(False, "with --data: flip a random half of each epoch's images horizontally, another "
                                 "half each epoch", "data")
    data_memory: str = option("auto", "with --data or the cache, where the pixels live: device (GPU memory; RAM on "
                                      "the CPU), host (RAM, batches copied ahead to the GPU; on the CPU the same as "
                                      "device), disk (the file memory-mapped, read a few batches ahead); auto: device, "
                                      "else host, else disk, the first that fits in half of the free memory", "data",
                              rule=one_of(DATA_MEMORY_CHOICES),
                              metavar="{auto,device,host,disk}")
    workers: Optional[int] = option(
        None, "torch loader: DataLoader worker processes, 0 to decode in the training process; the cache's "
        "decoding with PIL: its processes (all cores by default)", "data",
        rule=at_least(0, "0 or more"), metavar="N", shown=CORES_LESS_ONE)
    loader: str = option("auto", "cache: decode the images once into a cache file (DALI on the GPU when installed, "
                                 "else PIL on all cores) and train from it; torch or dali: decode every epoch "
                                 "(pip install \"fastgan[dali]\"); auto: cache where its disk has room, else dali on "
                                 "CUDA when installed, else torch", "data", rule=one_of(LOADER_CHOICES),
                         metavar="{auto,cache,dali,torch}")
    cache_dir: Optional[str] = option(None, "where --loader cache keeps its files (fastgan cache list|clear)", "data",
                                      metavar="DIR", shown="~/.cache/fastgan/prepared")
    dali_decoder: str = option("auto", "DALI's JPEG decoding (--loader dali, and the cache's decoding when given): "
                                       "mixed on the GPU, cpu on the CPU; auto: mixed on CUDA, where the cache "
                                       "decodes with DALI too when it is installed (PIL otherwise)", "data",
                               rule=one_of(DALI_DECODER_CHOICES), metavar="{auto,cpu,mixed}")
    dali_threads: Optional[int] = option(None, "DALI's CPU threads (--loader dali; the cache's decoding with DALI: "
                                               "all cores by default)", "data", rule=POSITIVE, metavar="N",
                                         shown=CORES_LESS_ONE)
    hw_decoder_load: float = option(HW_DECODER_LOAD, "share of JPEGs for the GPU's hardware JPEG decoder (A100, "
                                                     "H100), 0..1", "data", rule=between(0, 1, False, False),
                                    metavar="SHARE")
    # model: the tutorial's defaults
    image_size: int = option(64, "image size, a power of two from 16 to 256 (stride-2 blocks are added or removed; "
                                 "widths grow as in the tutorial, up to 8 x ngf)", "model",
                             rule=image_size_problem, metavar="PX", commands=("train", "prepare"))
    nc: int = option(3, "image channels: 1 (grayscale) or 3 (RGB)", "model",
                     rule=lambda v: None if v in (1, 3) and is_int(v) else
                     f"must be 1 (grayscale) or 3 (RGB), got {v!r}", metavar="{1,3}", commands=("train", "prepare"))
    nz: int = option(100, "length of the latent vector z", "model", rule=POSITIVE, metavar="N")
    ngf: int = option(64, "generator width", "model", rule=POSITIVE, metavar="N")
    ndf: int = option(64, "discriminator width", "model", rule=POSITIVE, metavar="N")
    # optimisation: the tutorial's defaults
    epochs: int = option(5, "passes over the data", "optimisation", rule=POSITIVE, metavar="N")
    batch_size: int = option(128, "images per step (the last incomplete batch of each epoch is dropped); under "
                                  "torchrun the total over all processes", "optimisation", rule=POSITIVE, metavar="N")
    lr: float = option(2e-4, "Adam learning rate", "optimisation", rule=between(0, 1, True, True), metavar="LR")
    beta1: float = option(0.5, "Adam beta1 (beta2 stays 0.999, as in the DCGAN paper)", "optimisation",
                          rule=between(0, 1, False, True), metavar="B")
    seed: int = option(999, f"seed of the weights, the fixed noise and the data order, {SEED_RANGE}: the same seed "
                            "trains the same weights", "optimisation", rule=seed_problem, metavar="N")
    ema_kimg: Optional[float] = option(
        None, "keep an exponential moving average of G's weights (StyleGAN2-ADA's G_ema) with a half-life of KIMG "
        "thousand images, ramped up over the first images; samples, netG_ema.pth, eval and generate then use it "
        "(--ema alone: 10)", "optimisation", rule=positive_kimg, metavar="KIMG", flag="--ema", shown="off",
        nargs="?", const=10.0)
    # speed: each of these is checked against eager fp32 in the tests
    device: str = option("auto", "where to train; auto: CUDA when torch sees a GPU", "speed",
                         rule=one_of(DEVICE_CHOICES), metavar="{auto,cpu,cuda}")
    amp: str = option("off", "mixed precision; --amp alone: the fastest the device really has: fp16 with a GradScaler "
                             "on CUDA; on the CPU bf16 where it has bf16 instructions (AVX512-BF16, AMX), else fp32, "
                             "as emulated bf16 is 2 to 10 times slower (the run says so); bf16 needs no scaler",
                      "speed", rule=one_of(AMP_CHOICES), metavar="{off,auto,fp16,bf16}", nargs="?", const="auto")
    threads: Optional[int] = option(
        None, "torch's CPU threads in each training process; they sleep while they wait for each other "
        "(OMP_WAIT_POLICY=PASSIVE unless set), so other programs on the cores slow a run down instead of stalling "
        "it (bench/threads.py); the weights depend on the count", "speed", rule=POSITIVE, metavar="N",
        shown="OMP_NUM_THREADS where set, else one per core")
    channels_last: bool = option(False, "channels_last memory for the networks and batches", "speed")
    compile: bool = option(False, "torch.compile both networks (CPU too; the first iterations compile)", "speed")
    cuda_graphs: bool = option(
        False, "capture the whole D+G step (the noise, both forwards, backwards and Adam steps, BatchNorm's "
        "statistics, with fp16 the GradScaler; with --data the batch's gather too) in one CUDA graph and replay it; "
        "CUDA only", "speed")
    # torchrun
    sync_bn: bool = option(False, "under torchrun: BatchNorm statistics over the whole global batch (fastgan's "
                                  "sync BatchNorm, CUDA and CPU, no host sync)", "torchrun")
    # the run
    out: Optional[str] = option(None, "run folder; new or empty, unless resuming or it holds a run that ended "
                                      "before its first checkpoint", "run", metavar="DIR", shown="runs/<timestamp>")
    resume: Optional[str] = option(None, "continue from a checkpoint exactly where it stopped; auto: --out's "
                                         "checkpoints/last.pt", "run", metavar="PATH|auto")
    ckpt_every: int = option(0, "also write checkpoints/last.pt every N iterations; 0: at epoch ends only", "run",
                             rule=at_least(0, "0 (epoch ends only) or a positive integer"), metavar="N")
    log_every: int = option(50, "iterations per statistics record and line; statistics stay on the device in "
                                "between (each read is a host sync)", "run", rule=POSITIVE, metavar="N")
    sample_every: int = option(500, "iterations per fixed-noise grid, besides each epoch's end", "run",
                               rule=POSITIVE, metavar="N")
    eval_every: int = option(0, "every N epochs, measure the generator (the average with --ema) against the data "
                                "as fastgan eval does, into metrics.jsonl: SWD, and FID/KID where their Inception "
                                "weights are at hand (never downloaded mid-run); 0: never", "run",
                             rule=at_least(0, "0 (no measurements) or a positive number of epochs"), metavar="N")
    eval_images: int = option(16384, "real and generated images each --eval-every measurement compares (all the "
                                     "data's where it holds fewer)", "run", rule=POSITIVE, metavar="N")
    inception: Optional[str] = option(None, "FID's Inception weights file for --eval-every", "run", metavar="PATH",
                                      shown="torch.hub's cache")
    quiet: bool = option(False, "log lines instead of the progress bar (the default when stderr is not a "
                                "terminal)", "run")
    tensorboard: bool = option(False, "also write the metrics and sample grids as TensorBoard events in the run "
                                      "folder's tensorboard/ (pip install \"fastgan[tensorboard]\")", "run")
    dry_run: bool = option(False, "print the run's plan (the resolved options, device, precision, loader, "
                                  "parameter counts) as JSON on stdout, run 2 steps on a tiny batch, write nothing",
                           "run")

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
        for field in dataclasses.fields(self):
            rule, value = field.metadata["rule"], getattr(self, field.name)
            problem = rule(value) if rule is not None and (value is not None or field.default is not None) else None
            if problem:
                raise FastganError(f"{name(field.name)} {problem}")
        # the rules between options
        if self.eval_every > self.epochs:
            raise FastganError(f"{name('eval_every')} {self.eval_every} measures at epoch {self.eval_every} and every "
                               f"{self.eval_every} epochs after, but the run ends at epoch {self.epochs}: nothing would "
                               f"be measured; lower {name('eval_every')} or raise {name('epochs')}")
        if self.data is not None and self.root is not None:
            raise FastganError(f"give {name('root')} (image files) or {name('data')} (a prepared file), not both")
        if self.mirror and self.data is None:
            raise FastganError(f"{name('mirror')} works with {name('data')} (a prepared file) only")
        idle = self.idle_data_options()
        if "data_memory" in idle:
            raise FastganError(f"{name('data_memory')} works with {name('data')} (a prepared file) or the cache "
                               f"({name('loader')} auto or cache), not {name('loader')} {self.loader}")
        if idle:
            reason = (f"{name('data')} is decoded already" if self.data is not None
                      else f"{name('loader')} torch decodes with PIL")
            raise FastganError(f"{name(idle[0])} sets how DALI decodes, but {reason}: leave it out")
        return self

    def idle_data_options(self) -> list[str]:
        """The options of where the pixels live and how DALI decodes that are set (not at their defaults) where this
        run's data does not use them: --data-memory with --loader dali or torch, DALI's with --data or --loader
        torch. validate refuses them; a resume leaves out those the checkpoint's run gave (cli.config_from_args)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        idle = []
        if self.data is None and self.loader in ("dali", "torch"):
            idle.append("data_memory")
        if self.data is not None or self.loader == "torch":
            idle.extend(DALI_FIELDS)
        return [field for field in idle if getattr(self, field) != defaults[field]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Build from a saved config, ignoring keys this version does not know (older or newer files)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def flag_of(field: str) -> str:
    return Config.__dataclass_fields__[field].metadata["flag"] or "--" + field.replace("_", "-")


def options(command: str = "train") -> list[dataclasses.Field]:
    """The declared options `command` takes, in their declaration's order."""
    return [f for f in dataclasses.fields(Config) if command in f.metadata["commands"]]


def default_shown(field: dataclasses.Field) -> str:
    """The default as --help and docs/options.md write it: 'the value; demo the preset's' where the demo differs."""
    meta = field.metadata
    if meta["shown"] is not None:
        return meta["shown"]
    if field.type == "bool" or isinstance(field.default, bool):
        return "off"
    value, demo = field.default, getattr(Config.demo(), field.name)
    if value is None:
        return ""
    return f"{value:g}" if isinstance(value, float) else f"{value}" + (f"; demo {demo}" if demo != value else "")


def options_table() -> str:
    """docs/options.md's table of `fastgan train`'s options, from their declarations."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for field in options("train"):
        meta = field.metadata
        metavar = meta["metavar"]
        flag = flag_of(field.name) + (f" [{metavar}]" if metavar and meta["nargs"] == "?" else
                                      f" {metavar}" if metavar else "")
        cell = lambda text: text.replace("|", "\\|")  # noqa: E731
        rows.append(f"| `{cell(flag)}` | {cell(default_shown(field))} | {cell(meta['help'])} |")
    return "\n".join(rows)
