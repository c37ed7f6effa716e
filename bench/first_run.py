"""The headline command's first and second run against the tutorial, whole processes on the same images.

    python bench/first_run.py                   # the 4,096 demo faces and 1,024 photo-sized JPEGs, 64x64, 2 epochs
    python bench/first_run.py --sets demo --epochs 1 --json first_run.json

For each set of JPEGs, each row is one whole process, timed from its start to its exit:
  - the tutorial: its ImageFolder loader (2 workers) and eager fp32 step (fastgan/tutorial.py), --epochs epochs;
  - `fastgan train --root DIR --amp --channels-last` with an empty cache: the first run, which decodes the images
    once into the cache and then trains from it;
  - the same command again: the second run, which finds the cache;
  - the same with `--loader torch`: decoding every epoch, as before the cache.
All at 64x64, batch 128, the tutorial's model (ngf = ndf = 64). Each row gives the whole process's seconds, its
training images/s (fastgan's own closing line; the tutorial's from its loop), the start-up (the whole less the
training: imports, the file check, the decoding once) and the ratio of the whole-process images/s to the
tutorial's. The photo-sized set is 1,024 of the demo faces scaled up 4x (712x872 JPEGs), made once in --work.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loaders as loader_bench  # noqa: E402
from fastgan.data.demo import demo_faces  # noqa: E402
from fastgan.config import Config  # noqa: E402
from fastgan.data.files import default_workers, find_images  # noqa: E402
from fastgan.tutorial import tutorial_loader  # noqa: E402
from throughput import tutorial_stepper  # noqa: E402


def tutorial_run(root: str, epochs: int, batch: int, device: str) -> None:
    """The tutorial's training, whole: its ImageFolder loader (2 workers) and eager fp32 step, as throughput.py's
    tutorial rows build them; its closing line as fastgan's ("trained N images in Xs")."""
    cfg = Config(batch_size=batch, ngf=64, ndf=64)
    step = tutorial_stepper(cfg, torch.device(device))
    loader = tutorial_loader(root, 64, batch, 2)
    images, start = 0, time.perf_counter()
    for _ in range(epochs):
        for data in loader:
            step(data[0])
            images += data[0].shape[0]
    print(f"trained {images} images in {time.perf_counter() - start:.2f}s")


TRAINED = re.compile(r"trained ([\d,]+) images in (?:(\d+)m)?([\d.]+)s")


def photo_sized(work: Path, count: int) -> Path:
    """`count` demo faces scaled up 4x, in the tutorial's layout (root/faces/*.jpg), made once."""
    root = work / f"photos{count}"
    folder = root / "faces"
    if len(list(folder.glob("*.jpg"))) != count:
        folder.mkdir(parents=True, exist_ok=True)
        for path in find_images(demo_faces(count))[:count]:
            image = Image.open(path).convert("RGB")
            image.resize((image.width * 4, image.height * 4), Image.BICUBIC).save(folder / path.name, quality=90)
    return root


def tutorial_layout(work: Path, source: Path) -> Path:
    """The demo faces as root/faces/*.jpg (links), the layout the tutorial's ImageFolder needs."""
    root = work / "demo"
    folder = root / "faces"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for path in find_images(source):
            (folder / path.name).symlink_to(path)
    return root


def timed_process(argv: list, cwd: Path) -> dict:
    """Run argv; its whole seconds and the images and seconds of training its closing line reports."""
    start = time.perf_counter()
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True)
    whole = time.perf_counter() - start
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    said = " ".join((done.stdout + done.stderr).split())
    match = TRAINED.search(said)
    if not match:
        return {"error": "no 'trained N images' line"}
    images = int(match.group(1).replace(",", ""))
    training = int(match.group(2) or 0) * 60 + float(match.group(3))
    return {"whole_s": round(whole, 1), "training_s": round(training, 1), "startup_s": round(whole - training, 1),
            "images": images, "training_images_per_second": round(images / training, 1),
            "whole_images_per_second": round(images / whole, 1),
            "decoded_once": "decoding" in said and "images once into" in said}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sets", nargs="+", choices=("demo", "photos"), default=["demo", "photos"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--photos", type=int, default=1024, help="images in the photo-sized set")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--work", help="folder for the data sets, caches and runs [a new temporary folder]")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--tutorial-run", metavar="ROOT", help=argparse.SUPPRESS)  # one row, in its own process
    args = parser.parse_args()
    if args.tutorial_run:
        tutorial_run(args.tutorial_run, args.epochs, args.batch_size, args.device)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="fastgan-first-run-"))
    work.mkdir(parents=True, exist_ok=True)
    console = Console(width=None if sys.stdout.isatty() else 150)
    info = {"device": args.device if args.device == "cuda" else f"CPU, {default_workers()} cores",
            "commit": loader_bench.commit(), "date": time.strftime("%Y-%m-%d"), "epochs": args.epochs,
            "batch_size": args.batch_size, "image_size": 64}
    console.print(" · ".join(f"{k} {v}" for k, v in info.items()))
    results = {**info, "sets": {}}
    roots = {"demo": lambda: tutorial_layout(work, demo_faces(4096)), "photos": lambda: photo_sized(work, args.photos)}
    for name in args.sets:
        root = roots[name]()
        cache = work / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)  # the first run starts with an empty cache,
        shutil.rmtree(work / f"runs-{name}", ignore_errors=True)  # and each row with a new run folder
        train = [sys.executable, "-m", "fastgan", "train", "--root", root, "--epochs", args.epochs, "--image-size", 64,
                 "--ngf", 64, "--ndf", 64, "--batch-size", args.batch_size, "--amp", "--channels-last", "--quiet",
                 "--device", args.device, "--cache-dir", cache]
        rows = {"tutorial": [sys.executable, __file__, "--tutorial-run", root, "--epochs", args.epochs, "--batch-size",
                             args.batch_size, "--device", args.device],
                "fastgan, first run (decodes once)": [*train, "--out", work / f"runs-{name}" / "first"],
                "fastgan, second run (the cache)": [*train, "--out", work / f"runs-{name}" / "second"],
                "fastgan --loader torch (decodes every epoch)": [*train, "--loader", "torch", "--out",
                                                                 work / f"runs-{name}" / "torch"]}
        figures = {}
        for row, argv in rows.items():
            figures[row] = timed_process(argv, work)
            console.print(f"{name}  {row}: {figures[row]}")
        results["sets"][name] = figures
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print_table(console, name, figures)
    return 0


def print_table(console: Console, name: str, figures: dict) -> None:
    tutorial = figures["tutorial"].get("whole_images_per_second")
    table = Table(title=f"{name}: whole processes, 64x64, the tutorial's model")
    for column in ("", "whole s", "start-up s", "training img/s", "whole img/s", "vs tutorial"):
        table.add_column(column, justify="left" if not column else "right")
    for row, f in figures.items():
        if "error" in f:
            table.add_row(row, f["error"], "", "", "", "")
            continue
        table.add_row(row, f"{f['whole_s']:.1f}", f"{f['startup_s']:.1f}", f"{f['training_images_per_second']:,.1f}",
                      f"{f['whole_images_per_second']:,.1f}",
                      f"{f['whole_images_per_second'] / tutorial:.2f}x" if tutorial else "")
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
