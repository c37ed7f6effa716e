"""The `fastgan` command: train, generate, eval, prepare, cache, synth. It only builds options; the work is in train(),
generate(), evaluate() and the others."""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import (CORES_LESS_ONE, DECODER_FLAGS, DEVICE_CHOICES, SEED_RANGE, Config, default_shown, flag_of,
                     options, seed_problem)
from .errors import FastganError, TrainingStopped


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (filled by `paragraphs`); each option's default is written into its
    help by hand, in [brackets], because the presets (tutorial, demo, --data file) decide several of them."""


def paragraphs(*texts: str) -> str:
    return "\n\n".join(textwrap.fill(text, 100, break_on_hyphens=False) for text in texts)


class Parser(argparse.ArgumentParser):
    """argparse with bad input reported as one line (and exit 2), not a usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int, wanted: str):
    """An argparse type: an integer >= minimum, else one line saying what was wanted."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value
    return parse


positive_int = int_at_least(1, "a positive integer")


def seed_int(text: str) -> int:
    """An argparse type for --seed: the one range of every command (config.MAX_SEED)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {SEED_RANGE}, got {text!r}") from None
    if seed_problem(value):
        raise argparse.ArgumentTypeError(seed_problem(value))
    return value


GROUPS = {"data": "data", "model": "model", "optimisation": "optimisation", "speed": "speed",
          "torchrun": "torchrun (many GPUs or machines: torchrun --nproc_per_node N -m fastgan train ...)",
          "run": "run"}


def add_declared(parser, command: str, groups: Optional[dict] = None) -> None:
    """`command`'s options as config.py declares them: flag, type, value name, help with its default in
    [brackets]. Every value defaults to None (not given): the preset (tutorial, demo, a --data file's, a resumed
    run's) decides, and Config.validate checks what was given."""
    from .data import loader_threads
    made = {}
    for field in options(command):
        meta = field.metadata
        group = groups and meta["group"] in groups and made.setdefault(
            meta["group"], parser.add_argument_group(groups[meta["group"]]))
        target = group or parser
        shown = default_shown(field)
        if shown == CORES_LESS_ONE:
            shown += f", at least 1: {loader_threads()} here"
        help_text = meta["help"] + (f" [{shown}]" if shown else "")
        if meta["metavar"] is None:  # a switch
            target.add_argument(flag_of(field.name), dest=field.name, action="store_true", default=None,
                                help=help_text)
            continue
        kind = float if "float" in field.type else int if "int" in field.type else str
        target.add_argument(flag_of(field.name), dest=field.name, type=kind, metavar=meta["metavar"], help=help_text,
                            **({"nargs": meta["nargs"], "const": meta["const"]} if meta["nargs"] else {}))


def add_train_parser(sub) -> None:
    defaults, demo = Config(), Config.demo()
    description = paragraphs(
        "Train a DCGAN (the PyTorch DCGAN faces tutorial) on a folder of images. Without --root it trains on "
        "built-in synthetic demo faces with a small preset "
        f"({demo.image_size}x{demo.image_size}, ngf=ndf={demo.ngf}, batch {demo.batch_size}, "
        f"{demo.epochs} epochs, a statistics line every {demo.log_every} and a grid every {demo.sample_every} "
        "iterations) that a 2-core CPU finishes in minutes; with --root the defaults are the tutorial's "
        f"({defaults.image_size}x{defaults.image_size}, ngf=ndf={defaults.ngf}, batch {defaults.batch_size}, "
        f"{defaults.epochs} epochs). --data FILE takes the file's image size and channels, and the demo preset "
        "when the file was made from the demo faces. --resume goes on with the run's own options.",
        "Flags given override the preset. Defaults are in [brackets], as [tutorial; demo] where the demo preset "
        "changes them.")
    p = sub.add_parser(
        "train", formatter_class=HelpFormatter,
        help="train a DCGAN on a folder of images (or the demo faces)", description=description,
        epilog="examples:\n  fastgan train\n  fastgan train --root ~/celeba --amp --compile\n"
               "  fastgan train --out runs/a --resume auto --epochs 10\n"
               "  torchrun --nproc_per_node 8 -m fastgan train --root ~/celeba --amp --compile\n\n"
               "Ctrl-C (or SIGTERM, SIGHUP) stops after the current step and writes a checkpoint; a second Ctrl-C quits at once.")
    add_declared(p, "train", GROUPS)
    p.set_defaults(func=run_train, parser=p)


def read_resumed(args: argparse.Namespace) -> dict:
    """--resume's checkpoint, read once: its options are the run's, and train() continues from it."""
    from .resume import find_resume_checkpoint, read_resumable
    return read_resumable(find_resume_checkpoint(Config(resume=args.resume, out=args.out)))


def config_from_args(args: argparse.Namespace, resumed: Optional[dict] = None) -> Config:
    """The preset (demo without --root, the tutorial's otherwise, or the resumed run's), then the flags given."""
    from dataclasses import fields, replace
    given = {f.name: getattr(args, f.name) for f in fields(Config)
             if getattr(args, f.name, None) is not None}
    if args.resume:
        payload = resumed if resumed is not None else read_resumed(args)
        # the run's own options, then the flags given; train() refuses flags that change the model's shape
        base = {**Config.from_dict(payload["config"]).to_dict(), "out": None, "dry_run": False, "quiet": False}
        from .distributed import environment
        if environment() is None:  # a --sync-bn run under torchrun may go on in one process
            base["sync_bn"] = False
        # a run may go on with another loader (the data order is the seed's and the epoch's): the run's own data
        # options that the loader given now does not use are left out, not refused, as the user did not give them
        cfg, default = Config(**{**base, **given}), Config()
        return replace(cfg, **{name: getattr(default, name) for name in cfg.idle_data_options() if name not in given})
    if args.data is not None:  # the file's image size and channels; the demo preset for the demo faces' file
        from .data.demo import is_demo_folder
        from .data.prepared import read_manifest
        manifest, _ = read_manifest(args.data)
        preset = Config.demo if is_demo_folder(manifest["source_root"]) else Config
        return preset(**{"image_size": manifest["image_size"], "nc": manifest["nc"], **given})
    if args.root is None:
        return Config.demo(**given)
    return Config(**given)


def run_train(args: argparse.Namespace) -> int:
    from .loop import train
    resumed = read_resumed(args) if args.resume else None
    train(config_from_args(args, resumed).validate(flags=True), resumed)  # errors name the flags
    return 0


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", formatter_class=HelpFormatter, help="write faces from a trained generator",
                       description=paragraphs(
                           "Write a grid of generated images from a fastgan checkpoint (run/checkpoints/last.pt, "
                           "run/netG.pth), a run folder (its checkpoints/last.pt) or a pytorch/examples "
                           "netG_epoch_N.pth; the model's shape is read off the weights. A checkpoint of a run trained with --ema gives its moving-average generator "
                           "(netG_ema), unless --no-ema.",
                           "With --interpolate STEPS: --n rows, each a spherical interpolation (slerp) from one "
                           "random latent to the next in STEPS images, both ends included, written as a grid and "
                           "as an animated GIF beside it (--out with .gif) that walks all rows there and back. "
                           "Defaults are in [brackets]."))
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="fastgan checkpoint, generator state dict (.pth), or run folder (its checkpoints/last.pt)")
    p.add_argument("--n", type=positive_int, help="number of images; rows with --interpolate [64; 8 rows]")
    p.add_argument("--interpolate", type=int, metavar="STEPS",
                   help="write rows of latent interpolations of STEPS images each (at least 2), and a GIF")
    p.add_argument("--seed", type=seed_int, metavar="N",
                   help=f"noise seed, {SEED_RANGE}; the same seed gives the same images [random]")
    p.add_argument("--out", metavar="FILE",
                   help="grid image to write (.png, .jpg, .webp, .bmp); with --interpolate also .gif, the "
                        "animation (the grid then goes beside it as .png) "
                        "[generated.png; interpolation.png and .gif with --interpolate]")
    p.add_argument("--individual", metavar="DIR", help="also write one PNG per image into DIR")
    p.add_argument("--no-ema", action="store_true",
                   help="use the raw generator (netG) of a checkpoint that also holds an EMA one (netG_ema)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="where to run the generator [auto: cuda if available]")
    p.set_defaults(func=run_generate, parser=p)


def run_generate(args: argparse.Namespace) -> int:
    from .generate import write_interpolation, write_samples
    from .report import console, plural
    if args.interpolate is not None:
        if args.individual is not None:
            raise FastganError("--individual goes with a grid of samples, not with --interpolate")
        rows = args.n or 8
        out, gif, source = write_interpolation(args.checkpoint, rows, args.interpolate, args.seed,
                                               args.out or "interpolation.png", args.device, not args.no_ema)
        console.print(f"fastgan: wrote {plural(rows, 'interpolation')} of {args.interpolate} images from {source} to {out} "
                      f"and {gif}")
        return 0
    n = args.n or 64
    out, source = write_samples(args.checkpoint, n, args.seed, args.out or "generated.png", args.individual,
                                args.device, not args.no_ema)
    # Path drops a trailing slash the user typed; one separator is added back to say "a folder"
    each = f" and one PNG each to {Path(args.individual).expanduser()}{os.sep}" if args.individual else ""
    console.print(f"fastgan: wrote {plural(n, 'image')} from {source} to {out}{each}")
    return 0


def add_synth_parser(sub) -> None:
    p = sub.add_parser("synth", formatter_class=HelpFormatter, help="write synthetic face photos (demo data)",
                       description=paragraphs(
                           "Write N synthetic 178x218 face JPEGs like CelebA's img_align_celeba, drawn "
                           "procedurally and deterministically from --seed (the built-in demo data). Defaults are "
                           "in [brackets]."))
    p.add_argument("dir", help="output folder (new, or without files of the same names)")
    p.add_argument("--n", type=positive_int, default=1000, help="number of images [1000]")
    p.add_argument("--seed", type=seed_int, default=0, metavar="N",
                   help=f"drawing seed, {SEED_RANGE}: the same seed draws the same faces; the demo's is 0 [0]")
    p.add_argument("--workers", type=positive_int, metavar="N", help="drawing processes [one per core]")
    p.set_defaults(func=run_synth, parser=p)


def run_synth(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from .report import console, plural
    from .data.synth import write_faces
    folder = Path(args.dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FastganError(f"{folder} exists and is not a folder")
    existing = [f"{i:06d}.jpg" for i in range(1, args.n + 1) if (folder / f"{i:06d}.jpg").exists()]
    if existing:
        raise FastganError(f"{folder} already holds {existing[0]} (and {len(existing) - 1} more of the names "
                           "to write); choose an empty folder")
    try:  # no bar without a terminal: rich would leave a blank line in the log
        with Progress(console=console, transient=True, disable=not console.is_interactive) as bar:
            task = bar.add_task(f"drawing {args.n:,} faces", total=args.n)
            write_faces(folder, args.n, seed=args.seed, workers=args.workers,
                        progress=lambda k: bar.advance(task, k))
    except OSError as e:
        raise FastganError(f"cannot write to {folder}: {e.strerror or e}") from None
    console.print(f"fastgan: wrote {plural(args.n, 'face')} to {folder}")
    return 0


def add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", formatter_class=HelpFormatter,
                       help="show or remove the decoded images `fastgan train --root` keeps",
                       description=paragraphs(
                           "fastgan train --root (--loader auto or cache) decodes the images once into a cache file "
                           "and trains from it; a changed folder, image size or decoder makes a new file. `list` "
                           "shows them with their sizes, newest use first; `clear` removes the named ones, or all "
                           "of them (a file being written is left alone). Defaults are in [brackets]."))
    p.add_argument("action", choices=("list", "clear"), help="list: show the files; clear: remove them")
    p.add_argument("names", nargs="*", metavar="NAME", help="with clear: the files to remove (as list names them) "
                                                            "[all of them]")
    p.add_argument("--cache-dir", metavar="DIR", help="the cache's folder [~/.cache/fastgan/prepared]")
    p.set_defaults(func=run_cache, parser=p)


def run_cache(args: argparse.Namespace) -> int:
    from .data.cache import cache_files, cache_folder, clear, describe, leftover_bytes
    from .data.demo import abandoned_drawings, remove_abandoned_drawings
    from .data.files import cache_dir
    from .report import gb, plural
    folder = cache_folder(args.cache_dir)
    where = f"{folder}" if folder.is_dir() else f"{folder}, a folder that does not exist"  # a typo, or no cache yet
    # the default cache also holds the demo faces: a drawing killed part-way is a leftover there too
    demo = [] if args.cache_dir else [cache_dir()]
    if args.action == "list":
        if args.names:
            raise FastganError("cache list takes no file names; `fastgan cache clear NAME` removes one")
        rows = cache_files(folder)
        for row in rows:  # the listing is the command's output: stdout, a line each
            print(describe(row))
        count, nbytes = leftover_bytes(folder)
        drawings = [d for c in demo for d in abandoned_drawings(c)]
        nbytes += sum(f.stat().st_size for d in drawings for f in d.rglob("*") if f.is_file())
        left = (f"; and {plural(count + len(drawings), 'leftover')} of killed writes, {gb(nbytes)} (fastgan cache "
                "clear removes them)") if count or drawings else ""
        print(f"{plural(len(rows), 'cache file')}, {gb(sum(r['bytes'] for r in rows))}, in {where}{left}")
        return 0
    removed, left = clear(folder, args.names)
    for cache in demo if not args.names else []:
        left.update(remove_abandoned_drawings(cache))
    leftovers = f" and {plural(len(left), 'leftover')} of killed writes" if left else ""
    print(f"fastgan: removed {plural(len(removed), 'cache file')}{leftovers} "
          f"({gb(sum(removed.values()) + sum(left.values()))} freed) from {where}")
    return 0


def add_prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", formatter_class=HelpFormatter, help="decode a folder of images once, for --data",
                       description=paragraphs(
                           "Decode the images under --root once (resized and centre-cropped as training does, "
                           "undecodable files set aside) into one file of uint8 pixels with a manifest and a "
                           "checksum; `fastgan train --data FILE` then trains from memory. CelebA at 64x64 makes a "
                           "2.5 GB file. Without --root it prepares the built-in demo faces at the demo's size, "
                           "and `fastgan train --data FILE` trains them with the demo preset. Defaults are in "
                           "[brackets]."))
    add_declared(p, "prepare")  # --root, --image-size, --nc: as train declares them
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (.fgd); an existing file is refused")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="decoding processes (PIL) or threads (DALI) [one per core]")
    p.add_argument("--decoder", choices=("auto", *DECODER_FLAGS.values()), default="auto",
                   help="auto: DALI on the GPU when CUDA and DALI are there, PIL on all cores otherwise. PIL gives "
                        "the torch loader's exact pixels; DALI's resize differs by a few levels [auto]")
    p.set_defaults(func=run_prepare, parser=p)


def run_prepare(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from .data import index_data
    from .data.prepared import prepare
    from .report import console
    import torch

    from .pipeline_dali import dali_available, dali_missing, readable_by_dali
    # the demo faces at the demo's size, so that the file trains with the demo preset; no bars (quiet)
    # without a terminal, where rich would leave blank lines
    preset = Config.demo if args.root is None else Config
    given = {f.name: getattr(args, f.name) for f in options("prepare") if getattr(args, f.name) is not None}
    cfg = preset(workers=args.workers, quiet=not console.is_interactive, **given).validate(flags=True)
    choice = args.decoder
    if choice == "auto":
        choice = "dali-gpu" if torch.cuda.is_available() and dali_available() else "pil"
    if choice.startswith("dali") and not dali_available():
        raise dali_missing(f"--decoder {choice}")
    if choice == "dali-gpu" and not torch.cuda.is_available():
        raise FastganError("--decoder dali-gpu needs a CUDA GPU; use dali-cpu or pil")
    decoder = {flag: decoder for decoder, flag in DECODER_FLAGS.items()}[choice]
    index = index_data(cfg)
    if decoder != "pil":
        index = readable_by_dali(index)
    with Progress(console=console, transient=True, disable=cfg.quiet) as bar:
        task = bar.add_task(f"decoding {len(index.good):,} images ({choice})", total=len(index.good))
        try:
            out = prepare(index, args.out, cfg.image_size, cfg.nc, args.workers, lambda k: bar.advance(task, k),
                          decoder)
        except OSError as e:
            raise FastganError(f"cannot write {args.out}: {e.strerror or e}") from None
    console.print(f"fastgan: {index.summary()}; decoded with {choice}, wrote {len(index.good):,} "
                  f"{cfg.image_size}x{cfg.image_size} images to {out} ({out.stat().st_size / 1e6:,.1f} MB)")
    return 0


def add_eval_parser(sub) -> None:
    from .metrics.evaluate import DEFAULT_METRICS, METRICS
    from .metrics.swd import DEFAULT_IMAGES
    p = sub.add_parser(
        "eval", formatter_class=HelpFormatter, help="measure a trained generator against real images (SWD, FID, KID)",
        description=paragraphs(
            "Measure generated images against real ones. PATH is a run folder (each epoch's checkpoint is measured, "
            "or those of --epochs; the records are appended to PATH/eval.jsonl and PATH/eval.png plots each metric "
            "over training) or one checkpoint or generator file (a table only). The real images are --root's or "
            "--data's, decoded as training decodes them, else the run's own data. A checkpoint of an --ema run is "
            "measured through its moving average unless --no-ema.",
            "SWD is ProGAN's sliced Wasserstein distance (x 1e3, per Laplacian pyramid level and their mean), "
            "needing no download. FID and KID use pytorch-fid's Inception weights (pt_inception-2015-12-05): "
            "downloaded once into torch.hub's cache where there is internet, or read from --inception PATH. The "
            "real images' pixels and features are cached (~/.cache/fastgan/eval), so a second eval of the same "
            "data costs only the generated side. Defaults are in [brackets]."),
        epilog="examples:\n  fastgan eval runs/demo\n  fastgan eval runs/celeba --root ~/celeba --metrics swd,fid,kid\n"
               "  fastgan eval runs/celeba/checkpoints/epoch005.pt --data celeba64.fgd --metrics fid "
               "--inception pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("path", metavar="PATH", help="run folder, or a checkpoint or generator file")
    p.add_argument("--root", metavar="DIR", help="real images: an image folder [the run's own data]")
    p.add_argument("--data", metavar="FILE", help="real images: a prepared file (fastgan prepare)")
    p.add_argument("--n", type=int_at_least(2, "at least 2"), default=DEFAULT_IMAGES, metavar="N",
                   help=f"real and generated images compared (all the real ones where there are fewer) "
                        f"[{DEFAULT_IMAGES}]")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), metavar="LIST",
                   help=f"comma-separated, of {', '.join(METRICS)} [{','.join(DEFAULT_METRICS)}]")
    p.add_argument("--epochs", metavar="LIST", help="with a run folder: the epochs to measure, e.g. 1,5,10 [all]")
    p.add_argument("--inception", metavar="PATH", help="the FID Inception weights file [torch.hub's cache]")
    p.add_argument("--no-ema", action="store_true",
                   help="measure the raw generator of checkpoints that also hold an EMA one")
    p.add_argument("--seed", type=seed_int, default=0, metavar="N",
                   help=f"seed of the real images drawn, the noise and SWD's random draws, {SEED_RANGE} [0]")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="where the generator and Inception run [auto: cuda if available]")
    p.add_argument("--workers", type=positive_int, metavar="N", help="decoding processes [one per core]")
    p.set_defaults(func=run_eval, parser=p)


def run_eval(args: argparse.Namespace) -> int:
    from rich.progress import Progress
    from rich.table import Table

    from .metrics.evaluate import evaluate, taken_at
    from .report import console, plural
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        epochs = [int(e) for e in args.epochs.split(",")] if args.epochs else None
    except ValueError:
        raise FastganError(f"--epochs takes a comma-separated list of epoch numbers, got {args.epochs!r}") from None
    with Progress(console=console, transient=True, disable=not console.is_interactive) as bar:
        tasks: dict[str, list] = {}  # task name -> [bar's task id, work done]

        def progress(task: str, advance: int, total) -> None:
            if task not in tasks:
                tasks[task] = [bar.add_task(task, total=total), 0]
            bar.advance(tasks[task][0], advance)
            tasks[task][1] += advance
            if total is not None and tasks[task][1] >= total:  # done: the next checkpoint's starts anew
                bar.remove_task(tasks.pop(task)[0])
        records = evaluate(args.path, args.root, args.data, args.n, metrics, epochs, args.inception, args.seed,
                           args.device, not args.no_ema, args.workers, progress)
    names = [k for k in records[0] if k.startswith("swd") or k in ("fid", "kid")]
    table = Table(title=f"fastgan eval: {records[0]['real']}, {records[0]['n']:,} generated")
    for column in ["checkpoint", "epoch", "generator", *names, "seconds"]:
        table.add_column(column, justify="left" if column in ("checkpoint", "generator") else "right")
    for r in records:
        table.add_row(Path(r["checkpoint"]).name, taken_at(r), r["generator"],
                      *[f"{r[k]:.4f}" if k == "kid" else f"{r[k]:.2f}" for k in names], f"{r['seconds']:.0f}")
    console.print(table)
    folder = Path(args.path).expanduser()
    if folder.is_dir():
        console.print(f"fastgan: appended {plural(len(records), 'record')} to {folder / 'eval.jsonl'}; plot in "
                      f"{folder / 'eval.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = Parser(prog="fastgan", description="Train DCGAN face generators fast: "
                                     "`fastgan train` (on the demo faces without --root), then `fastgan generate`.")
    parser.add_argument("--version", action="version", version=f"fastgan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (add_train_parser, add_generate_parser, add_eval_parser, add_prepare_parser, add_cache_parser,
                add_synth_parser):
        add(sub)
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # every command, in --help and in the error without one
    return parser


def report_error(command: str, message: str) -> None:
    """Every FastganError a command ends with, as one line on stderr. (The tests check here that the advice of
    each message names flags of `command` itself: tests/conftest.py.)"""
    say(f"fastgan: error: {message}")


def say(line: str) -> None:
    """The line a command ends with, on stderr. Under torchrun it also goes into torchelastic's error file, so
    that torchrun's summary of the failed processes names it (instead of a link to its documentation)."""
    print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # torchrun reads {"message": str, "timestamp": int}: a plain message, shown as it is
        try:
            Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
        except OSError:
            pass  # the line is on stderr anyway


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:  # said by the subcommand's parser, so that the message points to its --help
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # --help (0) or a one-line argparse error (2), already printed
        return e.code
    from .distributed import environment, is_lost_peer
    try:
        where = environment()
    except FastganError:
        where = None  # train() reports the bad variables
    # under torchrun every rank may speak: say which
    label = f"(rank {where[0]} of {where[1]}) " if where else ""
    try:
        from .install import require_torchvision
        require_torchvision()  # every command reads or writes images through it; --help and --version do not
        return args.func(args)
    except TrainingStopped as e:  # a stop the user asked for, with its checkpoint written: not an error
        say(f"fastgan: {label}{e}")
        return e.exit_code
    except FastganError as e:
        report_error(args.command, f"{label}{e}")
        return 2
    except KeyboardInterrupt:
        say(f"fastgan: {label}interrupted")
        return 130
    except Exception as e:
        if where and is_lost_peer(e):  # another rank failed or was killed: its own message says why
            say(f"fastgan: error: {label}lost contact with another rank, which failed or was stopped (see its "
                f"message; {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})")
            return 1
        if where:
            say(f"fastgan: error: {label}failed: {type(e).__name__}: {e}")
        raise


if __name__ == "__main__":
    sys.exit(main())
