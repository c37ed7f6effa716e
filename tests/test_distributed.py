"""torchrun on the CPU: two gloo processes train as one, with disjoint shards, identical weights, resume, a
clean stop on Ctrl-C, and a failing rank that ends the job instead of hanging it."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastgan.cli import main

PROBE = Path(__file__).with_name("ddp_probe.py")
TINY = ["--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "8", "--workers", "0",
        "--quiet", "--log-every", "1", "--sample-every", "2", "--device", "cpu"]


def torchrun(*args, env=None, probe_dir=None, nproc=2, device="cpu", **popen):
    flags = [f if f != "cpu" else device for f in TINY]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(PROBE), "train", *flags, *map(str, args)]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if probe_dir:
        environ["PROBE_DIR"] = str(probe_dir)
    return subprocess.Popen(command, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def finish(child, timeout=240):
    out, err = child.communicate(timeout=timeout)
    return child.returncode, out + err


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Two ranks, global batch 8 (4 each), 24 images: 3 steps per epoch, 2 epochs, with G's moving average."""
    tmp = tmp_path_factory.mktemp("ddp")
    from conftest import write_images
    write_images(tmp / "data" / "faces", 24)
    (tmp / "probe").mkdir()
    code, output = finish(torchrun("--root", tmp / "data", "--out", tmp / "run", "--epochs", 2, "--ema", 0.01,
                                   env={"XDG_CACHE_HOME": str(tmp / "cache")}, probe_dir=tmp / "probe"))
    assert code == 0, output
    return tmp, output


def test_two_ranks_read_disjoint_shards_that_make_up_the_single_process_batches(ddp_run, monkeypatch):
    tmp, output = ddp_run
    assert "2 processes (gloo), batch 4 each" in output
    ranks = [torch.load(tmp / "probe" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [len(r["batches"]) for r in ranks] == [6, 6] and ranks[0]["batches"][0].shape == (4, 3, 16, 16)
    for step in range(6):
        a, b = ranks[0]["batches"][step], ranks[1]["batches"][step]
        assert not any(torch.equal(x, y) for x in a for y in b)  # disjoint
    # side by side, the ranks' batches are those of one process with the whole batch of 8
    import fastgan.trainer
    seen, real_step = [], fastgan.trainer.train_step
    monkeypatch.setattr(fastgan.trainer, "train_step", lambda *a, **k: (seen.append(a[4].clone()), real_step(*a, **k))[1])
    assert main(["train", *TINY, "--root", str(tmp / "data"), "--out", str(tmp / "single"), "--epochs", "2"]) == 0
    for step in range(6):
        torch.testing.assert_close(torch.cat([ranks[0]["batches"][step], ranks[1]["batches"][step]]), seen[step],
                                   rtol=0, atol=0)


def test_both_ranks_end_with_the_same_weights_and_rank_0_saves_them(ddp_run):
    tmp, _ = ddp_run
    ranks = [torch.load(tmp / "probe" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    saved = torch.load(tmp / "run" / "checkpoints" / "last.pt", weights_only=True)
    for net in ("netG", "netD"):
        for name, value in ranks[0][net].items():
            if "running" in name or "num_batches" in name:
                continue  # BatchNorm statistics: each rank keeps its own (no --sync-bn)
            assert torch.equal(value, ranks[1][net][name]), (net, name)
            assert torch.equal(value, saved[net][name]), (net, name)
    # --ema: every rank averages the same G, counting the global batch's images; rank 0's average is saved
    assert saved["ema_images"] == 6 * 8
    for name, value in ranks[0]["netG_ema"].items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, ranks[1]["netG_ema"][name]), name
        assert torch.equal(value, saved["netG_ema"][name]), name
    # BatchNorm running statistics do differ: each rank normalised its own half of the batch
    assert not torch.equal(ranks[0]["netD"]["main.3.running_mean"], ranks[1]["netD"]["main.3.running_mean"])
    assert torch.equal(ranks[0]["netD"]["main.3.running_mean"], saved["netD"]["main.3.running_mean"])


def test_only_rank_0_writes_and_speaks(ddp_run):
    tmp, output = ddp_run
    metrics = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # one record per step, not one per rank
    assert all(m["images_per_second_per_rank"] > 0 for m in metrics)  # torchrun's records name the per-rank pace
    assert output.count("fastgan: trained 48 images") == 1
    assert sorted(p.name for p in (tmp / "run" / "checkpoints").iterdir()) == ["epoch001.pt", "epoch002.pt",
                                                                              "last.pt"]


def test_resume_under_torchrun(ddp_run):
    tmp, _ = ddp_run
    code, output = finish(torchrun("--out", tmp / "run", "--resume", "auto", "--epochs", 3,
                                   env={"XDG_CACHE_HOME": str(tmp / "cache")}))
    assert code == 0, output
    assert "resumed from" in output and "2 processes (gloo)" in output
    assert torch.load(tmp / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 9
    # the global batches do not depend on the number of processes: one process can carry on
    assert main(["train", "--out", str(tmp / "run"), "--resume", "auto", "--epochs", "4"]) == 0
    assert torch.load(tmp / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 12


def test_ctrl_c_stops_every_rank_at_the_same_step_with_a_checkpoint(ddp_run):
    tmp, _ = ddp_run
    run = tmp / "stopped"
    child = torchrun("--root", tmp / "data", "--out", run, "--epochs", 1000,
                     env={"XDG_CACHE_HOME": str(tmp / "cache")}, start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while (child.poll() is None and time.monotonic() < deadline
           and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5)):
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGINT)  # the terminal's Ctrl-C: torchrun forwards it to each rank
    code, output = finish(child)
    assert code != 0
    assert "stopped by SIGINT at iteration" in output, output
    assert "Continue with: the same torchrun command with --out" in output
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert len(saved["loss_history"]) == saved["step"] >= 5
    code, output = finish(torchrun("--out", run, "--resume", "auto", "--epochs", saved["epoch"] + 1,
                                   env={"XDG_CACHE_HOME": str(tmp / "cache")}))
    assert code == 0, output


def test_a_failing_rank_ends_the_job_with_a_clear_message(ddp_run):
    tmp, _ = ddp_run
    started = time.monotonic()
    code, output = finish(torchrun("--root", tmp / "data", "--out", tmp / "failing", "--epochs", 2,
                                   env={"XDG_CACHE_HOME": str(tmp / "cache"), "PROBE_FAIL": "1:2"}), timeout=180)
    assert code != 0
    assert "fastgan: error: (rank 1 of 2) failed: RuntimeError: probe: simulated failure on rank 1" in output
    assert "fastgan: error: (rank 0 of 2) lost contact with another rank, which failed or was stopped" in output
    assert time.monotonic() - started < 120  # ended, not hung
    # torchrun's own summary of the failed processes names fastgan's line, not a link to its documentation
    assert "traceback : fastgan: error: (rank 1 of 2) failed: RuntimeError: probe: simulated failure" in output


def test_bad_input_under_torchrun_stops_every_rank_with_one_message_each(ddp_run):
    tmp, _ = ddp_run
    started = time.monotonic()
    code, output = finish(torchrun("--root", tmp / "missing", "--out", tmp / "never", env={
        "XDG_CACHE_HOME": str(tmp / "cache")}), timeout=180)
    assert code != 0 and time.monotonic() - started < 120
    assert f"fastgan: error: (rank 0 of 2) --root {tmp / 'missing'} does not exist" in output
    assert ("fastgan: error: (rank 1 of 2) stopped because another rank failed reading the data "
            "(its error is above)") in output
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output  # (torchrun prints its own)
    # torchrun's summary (after its own traceback, which no rank can prevent) shows each rank's fastgan line
    assert f"traceback : fastgan: error: (rank 0 of 2) --root {tmp / 'missing'} does not exist" in output
    assert "To enable traceback see" not in output


@pytest.mark.parametrize("launched, reads", [(False, 6), (True, 4)])
def test_under_torchrun_ranks_vote_on_stopping_at_interval_ends_only(monkeypatch, image_folder, tmp_path,
                                                                       launched, reads):
    """Alone, a process looks at its stop requests after every step (free); under torchrun that look is a host
    all-reduce, so the ranks agree at interval ends only: 2 epochs of 3 steps, --log-every 2 -> ends at steps
    2, 3, 5, 6 (4 votes instead of 6). A stop still lands on the same step on every rank."""
    from fastgan import distributed
    from fastgan.interrupt import StopRequests

    class OneRankLaunched(distributed.Ranks):
        def vote(self, flag):  # one rank: the all-reduce of one flag is the flag
            return flag

    def start(*args):
        if launched:  # DDP needs a process group: one gloo rank (train() destroys it at the end)
            torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=torch.distributed.HashStore())
        return OneRankLaunched(launched=launched), torch.device("cpu")
    looks = []
    monkeypatch.setattr(StopRequests, "requested", property(lambda self: looks.append(1) or False))
    monkeypatch.setattr(distributed, "start", start)
    assert main(["train", *TINY, "--log-every", "2", "--root", str(image_folder), "--out", str(tmp_path / "run"),
                 "--epochs", "2"]) == 0
    assert len(looks) == reads


def test_batch_size_must_split_evenly_across_ranks(monkeypatch, capsys, image_folder):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", *TINY, "--root", str(image_folder), "--batch-size", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("fastgan: error: (rank 0 of 3) --batch-size 8 is the total over 3 processes and must divide "
                   "evenly among them: use 6 or 9")


def test_sync_bn_and_cuda_graphs_say_what_they_need(monkeypatch, capsys, image_folder):
    assert main(["train", *TINY, "--root", str(image_folder), "--sync-bn"]) == 2
    assert "--sync-bn synchronises BatchNorm across torchrun's processes" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", *TINY, "--root", str(image_folder), "--cuda-graphs"]) == 2
    assert "--cuda-graphs is not supported under torchrun" in capsys.readouterr().err


# ---- the DDP step itself, in spawned processes ---------------------------------------------------------------

def ddp_worker(rank: int, backend: str, port: int, results) -> None:
    """One rank: fastgan's DDP wrapping through D twice before one backward, and through whole steps."""
    import torch.distributed as dist

    from fastgan import distributed
    from fastgan.config import Config
    from fastgan.trainer import build_optimizers
    from fastgan.models import Discriminator, Generator, init_weights
    from fastgan.step import train_step
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        netG = Generator(8, 4, 3, 16).apply(init_weights).to(device)
        netD = Discriminator(4, 3, 16).apply(init_weights).to(device)
        optimizerG, optimizerD = build_optimizers(Config(device=device.type), netG, netD)
        ranks = distributed.Ranks(rank, 2, rank, launched=True)
        stepG, stepD, stepD_for_G = distributed.wrap(netG, netD, ranks, device, sync_bn=False)
        generator = torch.Generator().manual_seed(rank)  # each rank its own data
        real, fake = (torch.randn(4, 3, 16, 16, generator=generator).to(device) for _ in range(2))
        # the trap: two forward passes through the DDP-wrapped BatchNorms, then one backward
        (stepD(real).mean() + stepD(fake).mean()).backward()
        netD.zero_grad(set_to_none=True)
        for _ in range(2):
            noise = torch.randn(4, 8, 1, 1, generator=generator).to(device)
            train_step(stepG, stepD, optimizerG, optimizerD, real, noise, contextlib.nullcontext(),
                       torch.amp.GradScaler(device.type, enabled=False), netD_for_G=stepD_for_G)
        results[rank] = {k: v.cpu() for k, v in {**{f"G.{k}": v for k, v in netG.state_dict().items()},
                                                 **{f"D.{k}": v for k, v in netD.state_dict().items()}}.items()}
    finally:
        dist.destroy_process_group()


def run_two_ranks(backend: str) -> list[dict]:
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(ddp_worker, args=(backend, port, results), nprocs=2)
    return [results[0], results[1]]


def check_two_ranks(ranks: list[dict]) -> None:
    for name, value in ranks[0].items():
        if "running" in name or "num_batches" in name:
            continue  # each rank's own statistics, with or without DDP's buffer sync: nothing to compare
        assert torch.equal(value, ranks[1][name]), name  # DDP kept the weights identical


def test_ddp_step_survives_two_forwards_before_one_backward_on_gloo():
    """What gloo can show: fastgan's DDP wrapping runs D twice before one backward and whole steps, and keeps
    the ranks' weights identical. What it cannot: the trap itself. On the CPU, DDP's buffer broadcast before
    each forward does not break the backward, so this test passes with broadcast_buffers (forward_sync_buffers)
    left on as well (checked by planting it); only the nccl test below, on two GPUs, can catch it."""
    check_two_ranks(run_two_ranks("gloo"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_ddp_step_survives_two_forwards_before_one_backward_on_nccl():
    check_two_ranks(run_two_ranks("nccl"))


# ---- on GPUs (skipped without them) -----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("flags", [[], ["--sync-bn", "--amp", "--channels-last"]])
def test_torchrun_with_one_gpu_uses_nccl(tmp_path, flags):
    from conftest import write_images
    write_images(tmp_path / "data" / "faces", 24)
    code, output = finish(torchrun("--root", tmp_path / "data", "--out", tmp_path / "run", "--epochs", 2,
                                   "--loader", "torch", *flags, nproc=1, device="cuda",
                                   env={"XDG_CACHE_HOME": str(tmp_path / "cache")}))
    assert code == 0, output
    assert "1 process (NCCL), batch 8 each" in output
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 6 and "main.1.weight" in saved["netD"]  # keys as pytorch/examples', SyncBN or not


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_with_sync_bn_train_like_one_process_with_the_whole_batch(tmp_path, monkeypatch):
    """Same batches, same noise, BatchNorm over the global batch: DDP differs from one process only by the
    order of floating-point sums (the gradient all-reduce, SyncBatchNorm's statistics)."""
    from conftest import write_images
    write_images(tmp_path / "data" / "faces", 24)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    common = ["--root", tmp_path / "data", "--epochs", 2, "--loader", "torch"]
    code, output = finish(torchrun(*common, "--out", tmp_path / "ddp", "--sync-bn", nproc=2, device="cuda", env=env))
    assert code == 0, output
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    flags = [f if f != "cpu" else "cuda" for f in TINY]
    assert main(["train", *flags, *map(str, common), "--out", str(tmp_path / "one")]) == 0
    ddp = torch.load(tmp_path / "ddp" / "netG.pth", weights_only=True)
    one = torch.load(tmp_path / "one" / "netG.pth", weights_only=True)
    for name, value in one.items():
        if value.is_floating_point():
            torch.testing.assert_close(ddp[name], value, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("cores, local_processes, threads", [(16, None, 15), (16, "8", 1), (64, "8", 7), (2, None, 1),
                                                              (1, None, 1), (16, "32", 1)])
def test_loader_threads_are_each_process_share_of_the_cores_less_one(monkeypatch, cores, local_processes, threads):
    """Eight torchrun processes on one machine each take an eighth of its cores for loading, less one core for
    the thread that launches the kernels; never fewer than one."""
    from fastgan import data
    monkeypatch.setattr(data, "default_workers", lambda: cores)
    if local_processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)
    assert data.loader_threads() == threads
