"""The bench suite keeps working: tiny runs of each script (no figures are asserted: speed is for bench/), and
the measuring harness reads each loader as training does."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import loaders as loader_bench  # noqa: E402
import throughput  # noqa: E402
from fastgan.pipeline_dali import dali_available  # noqa: E402

# the end-to-end rows a user runs; the CUDA ones say "skipped: no CUDA GPU" on the CPU
CUDA_ROWS = [f"prepared + {what} ({precision})" for precision in ("fp16", "bf16")
             for what in ("CUDA graphs", "compile + CUDA graphs")] + [
    "prepared + compile (bf16)", "prepared + compile + CUDA graphs (bf16), each batch copied into the graph"]
CPU_ROWS = ["prepared, eager fp32", "prepared + channels_last", "prepared + channels_last + bf16"]


class CountingLoader:
    """A loader of `steps` one-image batches that records how it is used."""

    def __init__(self, steps: int):
        self.steps, self.epochs, self.batches = steps, [], 0

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            self.batches += 1
            yield torch.zeros(1)


def test_loader_measure_reads_one_loader_epoch_after_epoch():
    made = []

    def make():
        made.append(CountingLoader(steps=5))
        return made[-1]
    figures = loader_bench.measure(make, batch_size=1, repeats=2, device=torch.device("cpu"), batches=7)
    assert len(made) == 1, "start-up is paid once: every timing reads the same loader object"
    loader = made[0]
    # the first batch, the warm-up's 8 and 2 timings of 7: 23 batches of epochs 0..4 (5 batches each, the last
    # left unfinished); then the epoch-boundary figure reads 3 whole epochs from the start
    assert loader.epochs == [0, 1, 2, 3, 4] + [0, 1, 2]
    assert loader.batches == 1 + loader_bench.WARMUP_BATCHES + 2 * 7 + 3 * 5
    assert figures["startup_s"] >= 0 and figures["images_per_second"] > 0  # (start-up: under a ms here)
    assert figures["epoch_gap"]["gap_ms"] >= 0 and len(figures["epoch_gap"]["gaps_ms"]) == 2  # 3 epochs, 2 boundaries


def test_timed_reads_batches_from_one_stream():
    loader = CountingLoader(steps=3)
    steps_taken = []
    figures = throughput.timed(lambda batch: steps_taken.append(batch) or torch.ones(5),
                               loader_bench.epochs(loader), steps=4, warmup=2, repeats=3, batch=1,
                               device=torch.device("cpu"))
    assert len(steps_taken) == loader.batches == 2 + 3 * 4
    assert loader.epochs == [0, 1, 2, 3, 4]  # 14 batches of 3 per epoch: one loader, 5 epochs
    assert figures["images_per_second"] > 0 and figures["warmup_s"] >= 0


def test_throughput_runs_and_writes_every_table(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--quick", "--ngf", "4", "--batch-size",
                             "8", "--images", "64", "--steps", "1", "--repeats", "1", "--no-compile", "--device",
                             "cpu", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert {"device", "torch", "commit", "loaders", "steps", "end_to_end", "end_to_end_ratio", "best_end_to_end",
            "targets"} <= set(figures)
    for section in ("loaders", "steps", "end_to_end"):  # every row: a figure, or a note that says why not
        for r in figures[section]:
            assert (r["images_per_second"] or 0) > 0 or r["note"].startswith("skipped: "), r
    ran = [r for r in figures["loaders"] if r["images_per_second"]]
    assert all(r["startup_s"] > 0 for r in ran)
    assert any(r["row"].startswith("prepared file") for r in ran)
    assert figures["steps"][0]["row"].startswith("tutorial step") and figures["steps"][0]["images_per_second"] > 0

    rows = {r["row"]: r for r in figures["end_to_end"]}
    tutorial = figures["end_to_end"][0]
    assert tutorial["row"].startswith("tutorial") and tutorial["ratio"] == 1
    for r in figures["end_to_end"][1:]:
        if r["images_per_second"]:  # each against the tutorial of the same run
            # ratio and rate are rounded (3 and 1 decimals): 0.0005 absolute, which a slow row's ratio (a small
            # number, under load) can turn into more than 1% relative
            assert r["ratio"] == pytest.approx(r["images_per_second"] / tutorial["images_per_second"], rel=1e-2,
                                               abs=6e-4)
    assert all(rows[name]["images_per_second"] > 0 for name in CPU_ROWS)
    assert all(rows[name]["note"] == "skipped: no CUDA GPU" for name in CUDA_ROWS)
    assert rows["prepared + channels_last + compile (fp32)"]["note"] == "skipped: --no-compile"
    dali = [r for r in figures["end_to_end"] if r["row"].startswith("DALI CPU decode + the best step")]
    assert len(dali) == 1 and (dali[0]["images_per_second"] > 0 if dali_available() else
                               dali[0]["note"] == "skipped: DALI not installed")
    best = rows[figures["best_end_to_end"]]
    assert best["images_per_second"] == max(r["images_per_second"] or 0 for r in figures["end_to_end"][1:])
    assert figures["end_to_end_ratio"] == best["ratio"]
    assert figures["targets"]["met"] is None  # judged on a GPU only
    assert "GPU targets" in result.stdout and "best end to end:" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU that this machine has")
def test_throughput_without_a_gpu_says_so_in_one_line():
    result = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--device", "cuda"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("bench: --device cuda asked for") and len(result.stderr.splitlines()) == 1


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


def test_quality_bench_sets_each_mode_beside_the_band_of_three_reference_seeds(tmp_path):
    out, figures_file = tmp_path / "quality", tmp_path / "quality.json"
    # the smallest runs that still train: a 16x16 model of width 8, one epoch of 64 images in 2 steps, no loader
    # worker processes (their start costs more than the training here)
    command = [sys.executable, str(BENCH / "quality.py"), "--epochs", "1", "--demo-images", "64", "--batch-size", "32",
               "--image-size", "16", "--width", "8", "--workers", "0", "--modes", "channels_last,ema,fp16",
               "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command + ["--json", str(figures_file)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(figures_file.read_text())
    assert {"device", "torch", "commit", "date", "band", "rows", "outside"} <= set(figures)
    rows = figures["rows"]
    assert [(r["mode"], r["seed"]) for r in rows] == [("reference", 999), ("reference", 1), ("reference", 2),
                                                      ("channels_last", 999), ("ema", 999), ("fp16", 999)]
    trained, fp16 = rows[:5], rows[5]
    # each run was trained as its row says: the options its own config.json records
    plain = {"device": "cpu", "amp": "off", "channels_last": False, "compile": False, "cuda_graphs": False,
             "loader": "torch", "dali_decoder": "auto", "data": None, "ema_kimg": None}
    mode_options = {"channels_last": {"channels_last": True}, "ema": {"ema_kimg": 10.0}}
    for r in trained:
        assert r["settings"] == {**plain, "seed": r["seed"], **mode_options.get(r["mode"], {})}, r["mode"]
        assert Path(r["run"]).parent == out and r["swd"] > 0 and r["train_s"] > 0
        assert r["generator"] == ("ema" if r["mode"] == "ema" else "raw")
    assert fp16["note"].startswith("skipped: ") and "swd" not in fp16 and fp16["inside"] is None

    # the band: the three reference seeds (different seeds, different GANs), and each mode judged against it
    reference = [r["swd"] for r in rows[:3]]
    band = figures["band"]
    assert band["seeds"] == [999, 1, 2] and len(set(reference)) == 3
    assert band["swd"]["min"] == min(reference) and band["swd"]["max"] == max(reference)
    assert band["swd"]["mean"] == pytest.approx(sum(reference) / 3, abs=1e-4)  # the figures are rounded to 1e-4
    assert all(r["inside"] is None for r in rows[:3])
    for r in trained[3:]:
        assert r["inside"] == (min(reference) <= r["swd"] <= max(reference)), r["mode"]
    assert figures["outside"] == [r["mode"] for r in rows if r["inside"] is False]
    # --ema only reads G's weights, so its raw G is the reference's at seed 999 (the CPU trains bit for bit alike)
    assert rows[4]["raw_swd"] == rows[0]["swd"]
    # (after 2 steps the EMA's images equal G's, so which generator each figure came from is read from the run)
    records = (Path(rows[4]["run"]) / "eval.jsonl").read_text().splitlines()
    assert [json.loads(line)["generator"] for line in records] == ["ema", "raw"]
    for cell in ("band (3 seeds)", "channels_last", "--ema 10.0", "skipped: "):
        assert cell in result.stdout, cell
    assert "inside the band" in result.stdout or "OUTSIDE the band" in result.stdout

    again = subprocess.run(command, capture_output=True, text=True, timeout=120)  # never over an earlier bench
    assert again.returncode == 2 and len(again.stderr.splitlines()) == 1
    assert again.stderr.startswith(f"bench: --out {out} already holds files")


def test_first_run_times_the_tutorial_and_fastgans_first_and_second_run(tmp_path):
    """bench/first_run.py at a tiny size: four whole processes, each with its figures; only the first fastgan run
    decodes into the cache, and a second bench in the same --work starts again from an empty cache."""
    argv = [sys.executable, str(BENCH / "first_run.py"), "--sets", "photos", "--photos", "64", "--epochs", "1",
            "--batch-size", "32", "--work", str(tmp_path / "work"), "--json", str(tmp_path / "first.json")]
    for _ in range(2):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        rows = json.loads((tmp_path / "first.json").read_text())["sets"]["photos"]
        assert list(rows) == ["tutorial", "fastgan, first run (decodes once)", "fastgan, second run (the cache)",
                              "fastgan --loader torch (decodes every epoch)"]
        assert all(r["images"] == 64 and r["whole_s"] > r["training_s"] > 0 for r in rows.values()), rows
        assert [r["decoded_once"] for r in rows.values()] == [False, True, False, False]


def bench_for_rows(tmp_path) -> throughput.Bench:
    """A Bench on the CPU with no images: for run_rows alone."""
    args = throughput.argparse.Namespace(json=str(tmp_path / "rows.json"), dali_only=False)
    return throughput.Bench(args, torch.device("cpu"), 1, 2, 1, 1, 1, None, 1e9, {}, throughput.Console(quiet=True),
                            throughput.Config())


def test_a_row_that_fails_is_recorded_with_its_error_and_the_rows_after_it_run(tmp_path, monkeypatch):
    """One broken loader or step (a DALI that fails to build, a compile that breaks) must not end the bench: the
    rows after it still run, and the row records why it has no figure; the JSON is saved after each row."""
    monkeypatch.setattr(throughput, "tutorial_stepper", lambda cfg, device: lambda batch: torch.ones(5))
    monkeypatch.setattr(throughput, "fastgan_step", lambda cfg, device, data, in_graph=True: lambda b: torch.ones(5))

    def make_batches(cfg):
        if cfg is not None and cfg.loader == "dali":
            raise RuntimeError("nvJPEG failed to initialise\nsecond line")
        return itertools.repeat(torch.zeros(1)), None
    bench = bench_for_rows(tmp_path)
    rows = [("tutorial", None), ("broken", throughput.Config(loader="dali")), ("after", throughput.Config()),
            ("skipped", "skipped: no CUDA GPU")]
    bench.run_rows("end_to_end", rows, make_batches)
    got = {r["row"]: r for r in bench.results["end_to_end"]}
    assert list(got) == ["tutorial", "broken", "after", "skipped"]
    assert got["broken"]["images_per_second"] is None
    assert got["broken"]["note"] == "failed: RuntimeError: nvJPEG failed to initialise"
    assert got["after"]["images_per_second"] > 0 and got["after"]["ratio"] > 0
    assert json.loads((tmp_path / "rows.json").read_text())["end_to_end"][-1]["row"] == "skipped"
    assert throughput.judge_targets(bench) == 1  # a failed row fails the bench, its figures saved


def test_each_compiled_row_starts_from_a_fresh_compile_state_and_a_recompile_limit_fails_it(tmp_path, monkeypatch,
                                                                                                       request):
    """torch.compile keeps up to 8 versions of a forward: the rows before a compiled row would fill them, and
    the row would then run eager under its compiled name. Each compiled row resets the compile state, and a
    limit hit anyway is an error of that row, not a warning."""
    import torch._dynamo
    # torch's own patch: pytest's monkeypatch deletes a config key on undo (torch's config module has no
    # instance attribute to restore), which broke every later compile in the same process
    limits = torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True)  # as settings() sets
    limits.__enter__()
    request.addfinalizer(lambda: limits.__exit__(None, None, None))
    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager")  # dynamo's guards without inductor's minutes

    def step_of(cfg, device, data, in_graph=True):
        return lambda batch: compiled(batch).sum().reshape(1)

    monkeypatch.setattr(throughput, "tutorial_stepper", lambda cfg, device: lambda batch: torch.ones(1))
    monkeypatch.setattr(throughput, "fastgan_step", step_of)
    dtypes = iter([torch.float32, torch.float64, torch.bfloat16, torch.float16])  # one version each

    def make_batches(cfg):
        return itertools.repeat(torch.zeros(3, dtype=next(dtypes)) if cfg is not None else torch.zeros(1)), None
    bench = bench_for_rows(tmp_path)
    compiled_cfg = throughput.Config(compile=True)
    bench.run_rows("end_to_end", [("tutorial", None), *[(f"compiled {i}", compiled_cfg) for i in range(3)]],
                   make_batches)
    assert all(r["images_per_second"] for r in bench.results["end_to_end"]), bench.results
    torch._dynamo.reset()
    dtypes = iter([torch.float32, torch.float64, torch.bfloat16, torch.float16])
    plain = throughput.Config()  # no reset between rows: the third version hits the limit of 2, and fails
    bench = bench_for_rows(tmp_path)
    bench.run_rows("end_to_end", [("tutorial", None), *[(f"eager {i}", plain) for i in range(3)]], make_batches)
    notes = [r.get("note") for r in bench.results["end_to_end"]]
    assert notes[:3] == [None, None, None] and notes[3].startswith("failed: "), notes
    torch._dynamo.reset()


@pytest.mark.parametrize("sizes", [dict(nz=16, ngf=8, ndf=8, image_size=32),
                                   dict(nz=100, ngf=8, ndf=16, image_size=64)])
def test_the_flop_count_of_a_step_is_what_torch_counts_in_fastgans_step(sizes):
    """bench/flops.py counts a step from the model's convolutions and Algorithm 1's passes; torch's own counter,
    run over fastgan's real step, must find the same FLOPs (convolutions forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode
    from flops import step_flop_per_image
    from fastgan.config import Config
    from fastgan.step import train_step
    from fastgan.trainer import build_models, build_optimizers, resolve_precision
    cfg, cpu, batch = Config(**sizes, batch_size=4), torch.device("cpu"), 4
    netG, netD = build_models(cfg, cpu)
    optG, optD = build_optimizers(cfg, netG, netD)
    precision = resolve_precision("off", cpu)
    real = torch.rand(batch, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        train_step(netG, netD, optG, optD, real, torch.randn(batch, cfg.nz, 1, 1), precision.autocast,
                   precision.scaler)
    assert counter.get_total_flops() / batch == step_flop_per_image(cfg.nz, cfg.ngf, cfg.ndf, 3, cfg.image_size)
    assert step_flop_per_image() == pytest.approx(2.275e9, rel=1e-3)  # the tutorial's model: 2.27 GFLOP an image
