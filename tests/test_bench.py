"""The bench suite keeps working: a tiny run of each script (no figures are asserted: speed is for bench/)."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_throughput_runs_and_writes_every_table(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--quick", "--ngf", "4", "--batch-size",
                             "8", "--images", "64", "--steps", "1", "--repeats", "1", "--no-compile", "--json",
                             str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert {"device", "torch", "commit", "loaders", "steps", "end_to_end", "end_to_end_ratio"} <= set(figures)
    assert figures["steps"][0]["row"].startswith("tutorial step") and figures["steps"][0]["images_per_second"] > 0
    assert any(r["row"].startswith("prepared file") and r["images_per_second"] > 0 for r in figures["loaders"])
    assert all(r["images_per_second"] > 0 for r in figures["end_to_end"])
    skipped = [r for r in figures["steps"] if r["images_per_second"] is None]
    assert all(r["note"].startswith("skipped: ") for r in skipped)


def test_distributed_bench_runs_both_ways(tmp_path):
    out = tmp_path / "ddp.json"
    # --device cpu: on a GPU machine the script names none, and its 2 processes would need a GPU each
    result = subprocess.run([sys.executable, str(BENCH / "distributed.py"), "--epochs", "2", "--json", str(out), "--",
                             "--device", "cpu", "--demo-images", "64", "--image-size", "16", "--ngf", "4", "--ndf", "4",
                             "--batch-size", "8", "--log-every", "2"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["nproc"] == 2 and figures["batch_size"] == 8
    assert figures["single_images_per_second"] > 0 and figures["ddp_images_per_second_per_rank"] > 0
