"""Promises of the cache, the run folder, prepared files, resume, the tiers, the EMA under CUDA graphs, eval's draws
and the options' edges that no test checked: each value against an independent computation (a killed writer's own
files, the files' dates, the lock's holder, a formula from the docs, a dispatch spy), and GPU-only choices with the
device faked, so that they are checked on every commit."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastgan.trainer
from fastgan import runfolder
from fastgan.cli import main
from fastgan.config import MAX_SEED, MODEL_FIELDS, Config
from fastgan.data import cache
from fastgan.data import streamed
from fastgan.errors import FastganError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "8", "--workers", "0",
        "--quiet", "--log-every", "2", "--sample-every", "2", "--device", "cpu"]


def train(*args) -> int:
    return main(["train", *TINY, *map(str, args)])


def load(path):
    return torch.load(path, weights_only=True)


# ---- the decode-once cache -------------------------------------------------------------------------------------

def test_cache_clear_removes_what_a_killed_writer_left_once_no_process_holds_its_lock(image_folder, tmp_path):
    """A run killed while it writes a cache file leaves its temporary file (gigabytes for CelebA) and its lock;
    `fastgan cache clear` removes both once no process holds the lock. The writer here is fastgan's own, killed
    with SIGKILL in the middle of writing."""
    folder = tmp_path / "cache"
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from fastgan.data.cache import cached
        from fastgan.data.files import index_images
        def progress(total):
            def advanced(n):
                print("WRITING", flush=True)
                time.sleep(120)  # killed here, the temporary file half written
            return advanced
        cached(index_images(Path(sys.argv[1])), Path(sys.argv[2]), 16, 3, "pil", 1, lambda line: None, progress)
    """), str(image_folder), str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert writer.stdout.readline().strip() == "WRITING"
        left = sorted(p.name for p in folder.iterdir())
        assert len(left) == 2 and left[0].startswith(".") and left[0].endswith(".tmp") and left[1].endswith(".lock")
        assert main(["cache", "clear", "--cache-dir", str(folder)]) == 0  # the writer lives: its files stay
        assert sorted(p.name for p in folder.iterdir()) == left
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert main(["cache", "clear", "--cache-dir", str(folder)]) == 0
    assert list(folder.iterdir()) == []


def test_cache_list_shows_the_most_recently_used_file_first(image_folder, tmp_path, capsys):
    folder = tmp_path / "cache"
    for size in ("16", "32"):
        assert train("--root", image_folder, "--out", tmp_path / size, "--cache-dir", folder, "--epochs", 1,
                     "--image-size", size) == 0
    files = {json.loads((tmp_path / s / "config.json").read_text())["image_size"]: None for s in ("16", "32")}
    by_size = {}
    for path in folder.glob("*.fgd"):
        manifest, _ = cache.read_manifest(path, cache.naming(path))
        by_size[manifest["image_size"]] = path
    assert sorted(by_size) == sorted(files)
    now = time.time()
    os.utime(by_size[16], (now - 200, now - 200))  # 16 made first, 32 used later ...
    os.utime(by_size[32], (now - 100, now - 100))
    capsys.readouterr()
    assert train("--root", image_folder, "--out", tmp_path / "again", "--cache-dir", folder, "--epochs", 1) == 0
    assert by_size[16].stat().st_mtime > by_size[32].stat().st_mtime  # ... then 16 used again, by a run
    capsys.readouterr()
    assert main(["cache", "list", "--cache-dir", str(folder)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.endswith(")") or ".fgd" in ln]
    assert [ln.split()[0] for ln in lines[:2]] == [by_size[16].name, by_size[32].name]


# ---- prepared files ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["bytes after the pixels", "the last pixels cut off"])
@pytest.mark.parametrize("tier", ["device", "disk"])
def test_a_prepared_file_of_the_wrong_length_is_refused_before_training(image_folder, tmp_path, capsys, damage,
                                                                         tier):
    """Two files concatenated or a bad copy: a file longer than its manifest says is refused as a short one is,
    in one line, before any run folder is made, whichever tier would read it."""
    good = tmp_path / "faces.fgd"
    assert main(["prepare", "--root", str(image_folder), "--image-size", "16", "--out", str(good)]) == 0
    data = good.read_bytes()
    bad = tmp_path / "bad.fgd"
    bad.write_bytes(data + data[-64:] if damage.startswith("bytes") else data[:-64])
    capsys.readouterr()
    assert train("--data", bad, "--out", tmp_path / "run", "--data-memory", tier, "--epochs", 1) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(bad) in err
    assert not (tmp_path / "run").exists()
    assert train("--data", good, "--out", tmp_path / "fine", "--data-memory", tier, "--epochs", 1) == 0


# ---- the run folder ---------------------------------------------------------------------------------------------

def test_the_run_lock_holds_this_process_id_while_it_trains(image_folder, tmp_path, monkeypatch):
    """What "in use by process N" names: fastgan's own lock file holds the training process's id."""
    run, seen = tmp_path / "run", []
    from fastgan import loop
    real_read = loop.IntervalStats.read

    def read(self, *args, **kwargs):
        seen.append((runfolder.in_use(run), (run / runfolder.LOCK_NAME).read_text()))
        return real_read(self, *args, **kwargs)
    monkeypatch.setattr(loop.IntervalStats, "read", read)
    assert train("--root", image_folder, "--out", run, "--epochs", 1) == 0
    assert seen and set(seen) == {(str(os.getpid()), str(os.getpid()))}


def test_an_unfinished_run_is_set_aside_past_the_highest_number_taken_also_after_a_gap(image_folder, tmp_path,
                                                                                       capsys):
    run = tmp_path / "run"
    (run / "unfinished-2").mkdir(parents=True)  # unfinished-1 was deleted; unfinished-2 stays
    (run / "unfinished-2" / "config.json").write_text("{\"kept\": true}")
    (run / "config.json").write_text(json.dumps({"from": "a run that died before its first checkpoint"}))
    assert train("--root", image_folder, "--out", run, "--epochs", 1) == 0
    assert json.loads((run / "unfinished-2" / "config.json").read_text()) == {"kept": True}
    assert json.loads((run / "unfinished-3" / "config.json").read_text())["from"].startswith("a run that died")
    assert (run / "netG.pth").is_file() and not (run / "unfinished-1").exists()


# ---- resume ----------------------------------------------------------------------------------------------------

@pytest.fixture
def finished_run(image_folder, tmp_path):
    run = tmp_path / "a"
    assert train("--root", image_folder, "--out", run, "--epochs", 1) == 0
    return run


@pytest.mark.parametrize("field", [*MODEL_FIELDS, "seed"])
def test_a_checkpoint_never_resumes_into_a_folder_of_another_run(finished_run, tmp_path, capsys, field):
    """Another run's folder differs from the checkpoint's run in one field of what makes runs different (the
    model's shape, the seed): refused, and nothing in that folder changes. The same run's copy is taken."""
    other = tmp_path / f"other-{field}"
    shutil.copytree(finished_run, other)
    config = json.loads((other / "config.json").read_text())
    config[field] = config[field] + 1 if isinstance(config[field], int) else config[field] * 2
    (other / "config.json").write_text(json.dumps(config))
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file() and p.name != runfolder.LOCK_NAME}
    capsys.readouterr()
    assert main(["train", "--resume", str(finished_run / "checkpoints" / "last.pt"), "--out", str(other),
                 "--epochs", "2", "--quiet"]) == 2
    assert f"holds another run ({field}=" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file() and p.name != runfolder.LOCK_NAME} == before
    same = tmp_path / "same"
    shutil.copytree(finished_run, same)
    assert main(["train", "--resume", str(finished_run / "checkpoints" / "last.pt"), "--out", str(same),
                 "--epochs", "2", "--quiet"]) == 0


def test_the_batch_size_may_change_at_an_epochs_end_and_not_inside_one(image_folder, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert train("--root", image_folder, "--out", run, "--epochs", 1) == 0  # 3 steps of 8
    assert main(["train", "--out", str(run), "--resume", "auto", "--epochs", "2", "--batch-size", "4",
                 "--quiet"]) == 0
    resumed = load(run / "checkpoints" / "last.pt")
    assert (resumed["epoch"], resumed["step"]) == (2, 3 + 6)  # the second epoch in 6 steps of 4
    assert resumed["config"]["batch_size"] == 4
    # inside an epoch: a checkpoint at epoch 1, batch 1 (--ckpt-every 4), then a crash
    inside = tmp_path / "inside"
    real_step, calls = fastgan.trainer.train_step, [0]

    def crashing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:
            raise RuntimeError("planted crash")
        return real_step(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(fastgan.trainer, "train_step", crashing)
        with pytest.raises(RuntimeError, match="planted"):
            train("--root", image_folder, "--out", inside, "--epochs", 3, "--ckpt-every", 4)
    saved = (inside / "checkpoints" / "last.pt").read_bytes()
    assert load(inside / "checkpoints" / "last.pt")["iteration"] == 1
    capsys.readouterr()
    assert main(["train", "--out", str(inside), "--resume", "auto", "--batch-size", "4", "--quiet"]) == 2
    assert "stopped inside an epoch at batch size 8" in capsys.readouterr().err
    assert (inside / "checkpoints" / "last.pt").read_bytes() == saved
    assert main(["train", "--out", str(inside), "--resume", "auto", "--quiet"]) == 0  # at its own batch size


def test_a_first_format_checkpoint_resumes_with_the_noise_stream_seeded_by_its_step(finished_run):
    """A version 1 checkpoint holds no noise generator: the stream goes on from SeedSequence([seed, 2, step]),
    as docs/training.md says, not from the start of the run's stream (which would repeat the first epoch's
    noise)."""
    saved = load(finished_run / "checkpoints" / "last.pt")
    old = {**saved, "rng": {k: v for k, v in saved["rng"].items() if k != "noise"}, "version": 1}
    cfg = Config(**{k: saved["config"][k] for k in (*MODEL_FIELDS, "seed", "batch_size")}, device="cpu")
    cpu = torch.device("cpu")
    trainer = fastgan.trainer.build_trainer(cfg, cpu, fastgan.trainer.resolve_precision("off", cpu))
    trainer.load_state_dict(old)
    drawn = torch.randn(8, cfg.nz, 1, 1, generator=trainer.noise_generator)
    seed = int(np.random.SeedSequence([cfg.seed, 2, saved["step"]]).generate_state(1)[0])
    assert torch.equal(drawn, torch.randn(8, cfg.nz, 1, 1, generator=torch.Generator().manual_seed(seed)))
    start = int(np.random.SeedSequence([cfg.seed, 2]).generate_state(1)[0])
    assert not torch.equal(drawn, torch.randn(8, cfg.nz, 1, 1, generator=torch.Generator().manual_seed(start)))


# ---- the tiers, with the GPU faked ------------------------------------------------------------------------------

GB = 1_000_000_000


@pytest.mark.parametrize("size, gpu_free, ram, local_ranks, tier", [
    (4 * GB, 10 * GB, 100 * GB, 1, "device"),    # half the GPU's free memory holds it
    (6 * GB, 10 * GB, 100 * GB, 1, "host"),      # not half the GPU's, half the RAM's
    (60 * GB, 10 * GB, 100 * GB, 1, "disk"),     # neither
    (4 * GB, 10 * GB, 100 * GB, 8, "device"),    # each rank its own GPU: one copy a device
    (30 * GB, 10 * GB, 100 * GB, 2, "disk"),     # two ranks' copies in RAM do not fit half of it
    (30 * GB, 10 * GB, 100 * GB, 1, "host"),
])
def test_data_memory_auto_on_cuda_takes_device_then_host_then_disk_by_free_memory(monkeypatch, size, gpu_free, ram,
                                                                                   local_ranks, tier):
    """The GPU's order, checked on every machine: a CUDA device object needs no GPU, and the free-memory
    readings (torch.cuda.mem_get_info, MemAvailable) are faked."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gpu_free, 80 * GB))
    monkeypatch.setattr(streamed, "available_ram", lambda: ram)
    chosen, why = streamed.choose_tier("auto", size, torch.device("cuda"), local_ranks)
    assert chosen == tier, why
    if tier == "host":  # asking for the device tier names the one that works
        with pytest.raises(FastganError, match="--data-memory host would work"):
            streamed.choose_tier("device", size, torch.device("cuda"), local_ranks)


# ---- the EMA under CUDA graphs: what the warm-up puts back ------------------------------------------------------

class Mutations(TorchDispatchMode):
    """The storages that in-place and out= operators write while it is entered."""

    def __init__(self):
        super().__init__()
        self.written = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, argument in enumerate(func._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                value = kwargs.get(argument.name, args[i] if i < len(args) else None)
                for tensor in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(tensor, torch.Tensor):
                        self.written.add(tensor.untyped_storage().data_ptr())
        return func(*args, **kwargs)


def test_the_graph_warm_up_restores_everything_the_ema_update_writes():
    """Under --cuda-graphs the warm-up's steps are undone, the EMA's update included: every tensor the update
    writes (seen by a dispatch spy, not read off the code) must be in the list the warm-up restores."""
    from fastgan.ema import GeneratorEMA
    from fastgan.models import Generator
    netG = Generator(8, 4, 3, 16)
    ema = GeneratorEMA(netG, 0.05, 8)
    with torch.no_grad():
        for p in netG.parameters():
            p.add_(1)  # G moved on: the update has something to fold in
    spy = Mutations()
    with spy:
        ema.update()
    restored = {t.untyped_storage().data_ptr() for t in ema.tensors()}
    assert spy.written and spy.written <= restored, spy.written - restored
    assert ema.images.untyped_storage().data_ptr() in spy.written  # the image count is written too


# ---- eval's draws -----------------------------------------------------------------------------------------------

def test_eval_of_fewer_images_than_the_file_holds_draws_anew_per_seed_and_caches_apart(image_folder, tmp_path):
    from fastgan.data.prepared import load_pixels
    from fastgan.metrics.evaluate import real_images
    data = tmp_path / "faces.fgd"
    assert main(["prepare", "--root", str(image_folder), "--image-size", "16", "--out", str(data)]) == 0
    pixels, _ = load_pixels(data, 16, 3)
    everything = [bytes(image.numpy().tobytes()) for image in pixels.permute(0, 3, 1, 2)]
    draws = {seed: real_images(16, 3, 10, seed, data=str(data)) for seed in (1, 2)}
    picked = {}
    for seed, real in draws.items():
        rows = [everything.index(bytes(image.numpy().tobytes())) for image in real.pixels]
        assert len(set(rows)) == 10 and rows == sorted(rows)  # ten of the file's 24 images, in the file's order
        picked[seed] = rows
    assert picked[1] != picked[2]  # another seed, another draw
    assert draws[1].cache() != draws[2].cache()  # and its features are cached apart, never reused
    assert real_images(16, 3, 10, 1, data=str(data)).key == draws[1].key  # the same seed: the same entry


def test_evals_real_images_of_a_folder_are_decoded_once_however_root_spells_it(image_folder, tmp_path,
                                                                                 monkeypatch):
    import fastgan.data.prepared
    from fastgan.metrics import evaluate
    decoded = []
    real_decode = fastgan.data.prepared.decode_with_pil
    monkeypatch.setattr(fastgan.data.prepared, "decode_with_pil",
                        lambda paths, *args: decoded.append(len(paths)) or real_decode(paths, *args))
    monkeypatch.chdir(image_folder.parent)
    spellings = [str(image_folder), image_folder.name, f"../{image_folder.parent.name}/{image_folder.name}"]
    reals = [evaluate.real_images(16, 3, 10, 1, root=root) for root in spellings]
    assert decoded == [10]  # the first spelling decoded; the others found its entry
    assert len({real.key for real in reals}) == 1
    assert all(torch.equal(real.pixels, reals[0].pixels) for real in reals)


# ---- options at their edges --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, accepted", [(0.0, True), (1.0, True), (0.65, True), (-1e-9, False),
                                             (1 + 1e-9, False), (float("nan"), False)])
def test_hw_decoder_load_takes_zero_to_one_both_ends_included(value, accepted):
    cfg = Config(hw_decoder_load=value)
    if accepted:
        cfg.validate()
    else:
        with pytest.raises(FastganError):
            cfg.validate()


@pytest.mark.parametrize("seed, accepted", [(0, True), (MAX_SEED, True), (-1, False), (MAX_SEED + 1, False),
                                            (True, False), (1.0, False)])
def test_a_seed_is_taken_from_zero_to_the_largest_and_refused_past_it(seed, accepted):
    cfg = Config(seed=seed)
    if accepted:
        cfg.validate()
    else:
        with pytest.raises(FastganError):
            cfg.validate()
