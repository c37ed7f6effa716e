"""Every speed mode trains the same GAN: the demo trained from the same seed in each mode the device offers, each
run's SWD against the real images beside the noise band of three seeds of the reference mode.

    python bench/quality.py --out runs/quality --json quality.json          # every mode, the demo preset
    python bench/quality.py --modes reference,bf16 --epochs 3 --out runs/q3  # fewer modes, shorter runs

The reference is the tutorial's algorithm as fastgan runs it plainly: fp32, eager, the torch loader. It trains at
seeds 999 (the default), 1 and 2; their SWDs span the band [min, max]. Every other mode trains once, at seed 999:
channels_last, bf16 autocast, torch.compile, prepared data (--data: the torch loader's exact pixels, decoded
once), --ema (the EMA generator is measured, every other row measures the raw G; its raw G is measured too, and
should match the reference's at seed 999, since the average must not change training), DALI (CPU decode on the CPU,
GPU decode on CUDA) where it is installed, and on CUDA fp16 with the GradScaler and CUDA graphs (on prepared
data, the fastest path). A mode the device cannot run is a row that says why, never a silent fallback.

Each final-epoch generator is measured by fastgan.metrics.evaluate: SWD x 1e3 (mean and per pyramid level) of as many
generated images (seeded noise, the same for every row) as there are demo images (4,096), against all of them
decoded as the torch loader decodes them. Rows differ only by how they were trained.

How to read the band: three seeds are a small sample of the seed-to-seed spread, and the true spread is wider
than the one they span. A mode outside the band is a flag to investigate (train it at more seeds), not proof of a
bug; a mode inside it is consistent with training the same GAN, not proof that it does. Modes that keep the
arithmetic (prepared data: the same pixels) may land on the reference's seed-999 figure exactly.

Cost at the demo preset on the 2-core AMD EPYC CPU: each run trains 10 epochs of 4,096 images, then SWD takes
about a minute. Idle, the demo trains at about 440 images/s (1.5 minutes a run, 9 CPU runs in about 25 minutes);
shared with other jobs (2026-11-27) the reference trained at 67-69 images/s, 10 minutes a run, 1.7 hours for all.
The test runs it at 16x16, width 8, one epoch of 64 images. Device, versions and commit are printed beside the
numbers and written with them to --json, after every run (a stopped bench keeps the rows it has).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchvision
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastgan  # noqa: E402
from fastgan.config import Config, flag_of  # noqa: E402
from fastgan.data.demo import demo_faces  # noqa: E402
from fastgan.distributed import resolve_device  # noqa: E402
from fastgan.errors import FastganError  # noqa: E402
from fastgan.metrics.evaluate import evaluate  # noqa: E402
from fastgan.data.files import default_workers, index_images  # noqa: E402
from fastgan.pipeline_dali import dali_available, dali_version  # noqa: E402
from fastgan.data.prepared import prepare  # noqa: E402
from epoch_gap import commit, cpu_name  # noqa: E402

REFERENCE_SEEDS = (999, 1, 2)  # 999 first: the seed every other mode trains at (Config's default)
EMA_KIMG = 10.0                # what --ema alone means on the command line
EVAL_SEED = 0                  # fastgan eval's default: the same generated noise and SWD draws for every row
# the options a mode changes, as each run's config.json records them (so the JSON proves each mode was applied)
RECORDED_SETTINGS = ("seed", "device", "amp", "channels_last", "compile", "cuda_graphs", "loader", "dali_decoder",
                     "data", "ema_kimg")
PREPARED = "demo.fgd"          # the prepared file, made in --out; a mode's options name it, the run gets its path


@dataclass
class Mode:
    name: str
    overrides: dict = field(default_factory=dict)  # Config fields on top of the reference's
    needs: Optional[str] = None                    # why this device cannot run it, or None

    def flags(self) -> str:
        """The mode's `fastgan train` flags on top of the reference's."""
        words = []
        for key, value in self.overrides.items():
            if key == "loader" and value == "auto":
                continue  # --data takes no --loader; the reference's explicit torch loader is lifted for it
            shown = Path(value).name if key == "data" else value
            words.append(flag_of(key) if value is True else f"{flag_of(key)} {shown}")
        return " ".join(words) or "(none: fp32, eager, torch loader)"


def modes_for(device: torch.device) -> list[Mode]:
    """Every mode, in table order, each with the reason this device cannot run it (None where it can)."""
    cuda = device.type == "cuda"
    no_gpu = None if cuda else "skipped: no CUDA GPU"
    dali = None if dali_available() else "skipped: DALI not installed (pip install -e \".[dali]\")"
    prepared = {"data": PREPARED, "loader": "auto"}
    return [
        Mode("reference"),
        Mode("channels_last", {"channels_last": True}),
        Mode("bf16", {"amp": "bf16"},
             "skipped: this GPU has no bfloat16" if cuda and not torch.cuda.is_bf16_supported() else None),
        Mode("compile", {"compile": True}),
        Mode("prepared", prepared),
        Mode("ema", {"ema_kimg": EMA_KIMG}),
        Mode("dali", {"loader": "dali"}, dali),
        Mode("fp16", {"amp": "fp16"},
             None if cuda else "skipped: fp16 with the GradScaler is a CUDA mode (the CPU's fp16 kernels are slow)"),
        Mode("cuda_graphs", {**prepared, "cuda_graphs": True}, no_gpu),
    ]


def chosen_modes(asked: Optional[str], device: torch.device) -> list[Mode]:
    """The modes --modes names (all by default), in table order; the reference always runs: it makes the band."""
    every = modes_for(device)
    if not asked:
        return every
    names = [n.strip() for n in asked.split(",") if n.strip()]
    unknown = [n for n in names if n not in {m.name for m in every}]
    if unknown:
        raise FastganError(f"--modes: unknown mode {unknown[0]!r}; the modes are "
                           f"{', '.join(m.name for m in every)}")
    return [m for m in every if m.name == "reference" or m.name in names]


def fresh_out_folder(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise FastganError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise FastganError(f"--out {out} already holds files; choose a new folder (the bench overwrites nothing)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def settings_of(run: Path) -> dict:
    """What the run says it was trained with: its config.json's speed and seed options."""
    config = json.loads((run / "config.json").read_text())
    return {k: config.get(k) for k in RECORDED_SETTINGS}


def train_and_measure(cfg: Config, faces: Path, n: int, ema: bool) -> dict:
    """Train cfg, then measure its final epoch's generator (the EMA one when `ema`) against n demo faces."""
    started = time.perf_counter()
    run = fastgan.train(cfg)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    figures = {}
    # an EMA run's raw G too: --ema must not change training, so it should match the reference's at its seed
    for generator in ("ema", "raw") if ema else ("raw",):
        record, = evaluate(run, root=str(faces), n=n, metrics=("swd",), epochs=[cfg.epochs], device=cfg.device,
                           seed=EVAL_SEED, ema=generator == "ema")
        if figures:
            figures["raw_swd"] = round(record["swd"], 4)
        else:
            figures.update({k: round(v, 4) for k, v in record.items() if k.startswith("swd")},
                           generator=record["generator"])
    return {**figures, "settings": settings_of(run), "run": str(run), "train_s": round(train_s, 1),
            "eval_s": round(time.perf_counter() - started, 1)}


def band_of(rows: list[dict]) -> dict:
    """The noise band: min, max and mean of each SWD figure over the reference's seeds."""
    keys = [k for k in rows[0] if k.startswith("swd")]
    band = {"seeds": [r["settings"]["seed"] for r in rows]}
    for k in keys:
        values = [r[k] for r in rows]
        band[k] = {"min": min(values), "max": max(values), "mean": round(float(np.mean(values)), 4)}
    return band


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo = Config.demo()
    parser.add_argument("--epochs", type=int, default=demo.epochs, help="epochs per run (the demo's)")
    parser.add_argument("--demo-images", type=int, default=demo.demo_images,
                        help="demo faces to train on; SWD compares as many generated images with all of them")
    parser.add_argument("--modes", help="comma list of modes besides the reference (which always runs) "
                                        "[all: " + ", ".join(m.name for m in modes_for(torch.device("cpu"))) + "]")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when there is one")
    parser.add_argument("--image-size", type=int, default=demo.image_size, help="image side in px (the demo's)")
    parser.add_argument("--width", type=int, default=demo.ngf, help="ngf = ndf (the demo's)")
    parser.add_argument("--batch-size", type=int, default=demo.batch_size, help="(the demo's)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader worker processes (fastgan train's --workers) [its default: the cores less one]")
    parser.add_argument("--out", help="a new folder for every run folder and the prepared file "
                                      "[runs/quality-<date>-<time>]")
    parser.add_argument("--json", help="write every figure here (after each run)")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
        modes = chosen_modes(args.modes, device)
        base = Config.demo(epochs=args.epochs, demo_images=args.demo_images, image_size=args.image_size,
                           ngf=args.width, ndf=args.width, batch_size=args.batch_size, workers=args.workers,
                           device=device.type,
                           loader="torch", quiet=True).validate(flags=True)
        out = fresh_out_folder(Path(args.out or f"runs/quality-{time.strftime('%Y%m%d-%H%M%S')}").expanduser())
    except FastganError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2

    gpu = device.type == "cuda"
    console = Console(width=None if sys.stdout.isatty() else 160)  # a log file gets whole rows
    info = {"device": torch.cuda.get_device_name(device) if gpu else f"CPU ({cpu_name()}), {default_workers()} cores",
            "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
            "dali": dali_version(), "python": platform.python_version(), "commit": commit(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "epochs": base.epochs, "demo_images": base.demo_images,
            "image_size": base.image_size, "width": base.ngf, "batch_size": base.batch_size,
            "eval": f"SWD x 1e3 of the final epoch's G, {base.demo_images:,} generated vs {base.demo_images:,} real, "
                    f"eval seed {EVAL_SEED}", "out": str(out.resolve())}
    console.print(" · ".join(f"{k} {v}" for k, v in info.items()))

    faces = demo_faces(base.demo_images, quiet=True)
    prepared_file = None
    if any(m.overrides.get("data") == PREPARED and m.needs is None for m in modes):
        prepared_file = prepare(index_images(faces), out / PREPARED, base.image_size, base.nc)

    rows: list[dict] = []
    results = {**info, "band": None, "rows": rows, "outside": None}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")

    def run_row(mode: Mode, seed: int) -> dict:
        row = {"mode": mode.name, "seed": seed, "flags": mode.flags()}
        if mode.needs:
            row["note"] = mode.needs
        else:
            overrides = {k: str(prepared_file) if k == "data" else v for k, v in mode.overrides.items()}
            name = f"{mode.name}-seed{seed}"
            cfg = dataclasses.replace(base, seed=seed, out=str(out / name), **overrides)
            try:
                row.update(train_and_measure(cfg, faces, base.demo_images, ema=cfg.ema_kimg is not None))
            except Exception as e:  # noqa: BLE001 (a mode that fails is a row that says how; the others still run)
                row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rows.append(row)
        save()
        figure = f"SWD {row['swd']:.2f}, trained in {row['train_s']:.0f} s" if "swd" in row else row["note"]
        console.print(f"{mode.name} (seed {seed}): {figure}")
        return row

    reference = [run_row(modes[0], seed) for seed in REFERENCE_SEEDS]
    measured = [r for r in reference if "swd" in r]
    band = band_of(measured) if len(measured) == len(REFERENCE_SEEDS) else None
    results["band"] = band
    for row in reference:
        row["inside"] = None  # the band's own rows
    for mode in modes[1:]:
        row = run_row(mode, REFERENCE_SEEDS[0])
        row["inside"] = band["swd"]["min"] <= row["swd"] <= band["swd"]["max"] if band and "swd" in row else None
    outside = [r["mode"] for r in rows if r["inside"] is False]
    results["outside"] = outside
    save()

    levels = [k for k in rows[0] if k.startswith("swd") and k != "swd"] if "swd" in rows[0] else []
    table = Table(title=f"SWD x 1e3 of the final generator ({base.epochs} epochs, {base.image_size}x{base.image_size}, "
                        f"width {base.ngf}, {base.demo_images:,} demo faces); lower is better")
    for column in ("mode", "seed", "flags", "generator", "SWD", *levels, "band", "train s"):
        table.add_column(column, justify="left" if column in ("mode", "flags", "generator", "band") else "right")
    for r in rows:
        if "swd" not in r:
            table.add_row(r["mode"], str(r["seed"]), r["flags"], "", r["note"], *[""] * len(levels), "", "")
            continue
        verdict = "(makes it)" if r["inside"] is None else ("inside" if r["inside"] else "OUTSIDE")
        generator = r["generator"] + (f" (raw G {r['raw_swd']:.2f})" if "raw_swd" in r else "")
        table.add_row(r["mode"], str(r["seed"]), r["flags"], generator, f"{r['swd']:.2f}",
                      *[f"{r[k]:.2f}" for k in levels], verdict, f"{r['train_s']:.0f}")
    if band:
        table.add_row(f"band ({len(REFERENCE_SEEDS)} seeds)", "", "min-max (mean)", "",
                      *[f"{band[k]['min']:.2f}-{band[k]['max']:.2f} ({band[k]['mean']:.2f})" for k in ["swd", *levels]],
                      "", "")
    console.print(table)
    if band is None:
        console.print("no band: a reference seed did not run")
    elif outside:
        console.print(f"OUTSIDE the band of {len(REFERENCE_SEEDS)} reference seeds: {', '.join(outside)} "
                      "(a flag to investigate with more seeds, not proof of a bug)")
    else:
        console.print(f"every mode that ran is inside the band of {len(REFERENCE_SEEDS)} reference seeds")
    console.print(" · ".join(f"{k} {v}" for k, v in info.items()))
    failed = [r["mode"] for r in rows if r.get("note", "").startswith("failed:")]
    if failed:
        console.print(f"failed: {', '.join(failed)} (see the rows)")
    return 1 if failed or band is None else 0


if __name__ == "__main__":
    sys.exit(main())
