"""How long FID takes on this device: the generated side of `fastgan eval --metrics fid` (the real side is cached).

    python bench/fid_speed.py                      # 50,000 64x64 images, the count papers report FID on
    python bench/fid_speed.py --n 2000 --json fid.json

Three timed stages, as eval runs them: the DCGAN generator draws n images (uint8, as saved), pytorch-fid's
Inception network turns them into 2048-d pool3 features (resized to 299 px, batches of fastgan.metrics.evaluate.BATCH),
and the Frechet distance of their statistics against a second set's (three 2048x2048 eigendecompositions, on the
CPU). The network runs with random weights of the real architecture (fastgan.metrics.inception.build_inception): its
speed is the weights', and the bench needs no download. The issue's target: 50,000 images in under a minute on an
H100. On a CPU the network costs about half a second an image (2-core EPYC), so use a small --n there.
Device, versions and commit are printed beside the figures and written with them to --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epoch_gap import commit, cpu_name  # noqa: E402
from fastgan.distributed import resolve_device  # noqa: E402
from fastgan.metrics.evaluate import batches_of, fake_images  # noqa: E402
from fastgan.metrics.fid import feature_statistics, frechet_distance, inception_features  # noqa: E402
from fastgan.metrics.inception import build_inception  # noqa: E402
from fastgan.models import Generator, init_weights  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work):
    synchronize(device)
    start = time.perf_counter()
    result = work()
    synchronize(device)
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="generated images [50000]")
    parser.add_argument("--image-size", type=int, default=64, help="the generator's image size [64]")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda [auto]")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error("--n must be at least 2")
    device = resolve_device(args.device)
    torch.manual_seed(0)
    netG = Generator(100, 64, 3, args.image_size).apply(init_weights).to(device)
    inception = build_inception().eval().to(device)
    with torch.inference_mode():  # warm-up: cuDNN picks its algorithms, lazy CUDA state is made
        inception(torch.rand(8, 3, args.image_size, args.image_size, device=device))
    images, generate_s = timed(device, lambda: fake_images(netG, args.n, 1, device))
    features, inception_s = timed(device, lambda: inception_features(inception, batches_of(images), device))
    other = features[np.random.default_rng(0).permutation(len(features))][: max(2, len(features) // 2)]
    fid, fid_s = timed(torch.device("cpu"), lambda: frechet_distance(*feature_statistics(features),
                                                                     *feature_statistics(other)))
    total = generate_s + inception_s + fid_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    figures = {"device": f"{device.type}: {name}", "n": args.n, "image_size": args.image_size,
               "generate_s": round(generate_s, 2), "inception_s": round(inception_s, 2),
               "inception_images_per_second": round(args.n / inception_s, 1), "frechet_s": round(fid_s, 2),
               "total_s": round(total, 2), "torch": torch.__version__, "numpy": np.__version__,
               "commit": commit(), "date": time.strftime("%Y-%m-%d")}
    print(f"FID of {args.n:,} generated {args.image_size}x{args.image_size} images on {figures['device']}: "
          f"{total:.1f} s (generate {generate_s:.1f} s, Inception features {inception_s:.1f} s = "
          f"{args.n / inception_s:,.0f} images/s, Frechet distance {fid_s:.1f} s); torch {torch.__version__}, "
          f"commit {figures['commit']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
