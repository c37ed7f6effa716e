"""How far one prepared file's pixels are from another's: gpu_check's prepare-dali part compares DALI's decoding
with PIL's this way.

    python bench/prepared_diff.py REFERENCE.fgd OTHER.fgd --image-size 64
    # one line: DIFF {"decoder": OTHER's decoder, "count": ..., "mean": ..., "p999": ..., "max": ...}

The differences are in levels of 0-255, over every pixel and channel: their mean, their 99.9th percentile and
their maximum. Runs from a plain copy of the repository, like the benches: no fastgan install needed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastgan.data.prepared import load_pixels, read_manifest  # noqa: E402


def pixel_diff(reference: str, other: str, image_size: int) -> dict:
    a, _ = load_pixels(reference, image_size, 3)
    b, _ = load_pixels(other, image_size, 3)
    d = (a.int() - b.int()).abs().float()
    return {"decoder": read_manifest(other)[0]["decoder"], "count": len(b), "mean": round(d.mean().item(), 3),
            "p999": d.flatten().kthvalue(max(1, int(d.numel() * 0.999))).values.item(), "max": d.max().item()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", help="a prepared file (.fgd)")
    parser.add_argument("other", help="a prepared file of the same images at the same size")
    parser.add_argument("--image-size", type=int, required=True, help="the files' image size")
    args = parser.parse_args()
    print("DIFF " + json.dumps(pixel_diff(args.reference, args.other, args.image_size)))
