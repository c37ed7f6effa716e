"""The CUDA paths of the real CLI on tiny data: CUDA graphs with fp16 and bf16 on every loader and under
torch.compile, a run resumed into CUDA graphs, the prepared loader on the device, `fastgan prepare` with DALI's
GPU decoder, and several epochs of DALI decoding on the GPU.

Every test here is marked gpu: it skips without a CUDA GPU, and fails instead under FASTGAN_REQUIRE_GPU=1 (as
bench/gpu_check.py runs the suite). Tests that need DALI skip without it, unless FASTGAN_REQUIRE_DALI=1.
"""
import json
import os

import numpy as np
import pytest
import torch

from fastgan.cli import main
from fastgan.pipeline_dali import dali_available, dali_unusable
from fastgan.data.synth import write_faces

pytestmark = pytest.mark.gpu

FACES = 48  # 6 steps of 8 an epoch
CUDA_TINY = ["--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "8", "--workers", "0",
             "--quiet", "--log-every", "2", "--sample-every", "2", "--device", "cuda"]
# Graphed against eager, same precision: the largest difference in the loss history (Loss_D, Loss_G over 12
# steps). Measured on the CPU at these sizes: bf16 and fp32 runs differ by at most 2.8e-4, while one training step
# moves the losses by 1e-3 to 1.8e-2 (median 8.7e-3), so a run a step ahead or behind (a warm-up left in, a
# stale batch or noise) is off by about 1.8e-2 somewhere. 3e-3 is 10x the rounding gap and 1/6 of a step; it
# has not yet been measured on a GPU, where cuDNN may pick other kernels for the two runs: the assertion prints
# the difference found.
GRAPHED_VS_EAGER = 3e-3


def need_dali():
    if not dali_available():
        if os.environ.get("FASTGAN_REQUIRE_DALI"):
            pytest.fail(f"FASTGAN_REQUIRE_DALI is set but NVIDIA DALI is not usable here: {dali_unusable()}",
                        pytrace=False)
        pytest.skip(f'NVIDIA DALI is not usable here: {dali_unusable()} (pip install "fastgan[dali]")')


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """FACES synthetic CelebA-sized face JPEGs (178x218)."""
    folder = tmp_path_factory.mktemp("faces")
    write_faces(folder, FACES, seed=5, workers=1)
    return folder


@pytest.fixture(scope="module")
def prepared(faces, tmp_path_factory):
    """The faces prepared at 16x16 with PIL (the torch loader's pixels)."""
    out = tmp_path_factory.mktemp("prepared") / "faces.fgd"
    with pytest.MonkeyPatch.context() as patch:  # module scope: the file index's cache stays private here too
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
        assert main(["prepare", "--root", str(faces), "--image-size", "16", "--out", str(out), "--decoder", "pil"]) == 0
    return out


def train(*args) -> int:
    return main(["train", *CUDA_TINY, *map(str, args)])


def load(path):
    return torch.load(path, weights_only=True)


def assert_finished(run, steps: int, epoch: int):
    ckpt = load(run / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (epoch, steps)
    assert ckpt["loss_history"].shape == (steps, 2) and torch.isfinite(ckpt["loss_history"]).all()
    assert (run / "netG.pth").exists()
    return ckpt


def assert_same_training(graphed, eager):
    diff = (load(graphed / "checkpoints" / "last.pt")["loss_history"]
            - load(eager / "checkpoints" / "last.pt")["loss_history"]).abs().max().item()
    assert diff < GRAPHED_VS_EAGER, f"graphed and eager loss histories differ by up to {diff:.2e}"


SOURCES = {"prepared": lambda faces, prepared: ["--data", prepared],
           "torch": lambda faces, prepared: ["--root", faces, "--loader", "torch"],
           "dali": lambda faces, prepared: ["--root", faces, "--loader", "dali", "--dali-decoder", "mixed"]}
SAYS = {"prepared": "loader prepared (cuda memory", "torch": "loader torch", "dali": "loader dali (decoder mixed"}


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
@pytest.mark.parametrize("loader", ["prepared", "torch", pytest.param("dali", marks=pytest.mark.dali)])
def test_cuda_graphs_train_as_eager_does_on_every_loader(faces, prepared, tmp_path, capsys, loader, amp):
    if loader == "dali":
        need_dali()
    source = SOURCES[loader](faces, prepared)
    assert train(*source, "--amp", amp, "--epochs", 2, "--cuda-graphs", "--out", tmp_path / "graphed") == 0
    err = capsys.readouterr().err
    assert f"precision {amp}" in err and "CUDA graphs on" in err and SAYS[loader] in err, err
    ckpt = assert_finished(tmp_path / "graphed", 12, 2)
    if amp == "fp16":  # the GradScaler ran inside the graph and its scale reached the checkpoint
        assert ckpt["scaler"]["scale"] > 0
    metrics = [json.loads(line) for line in (tmp_path / "graphed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6, 8, 10, 12]
    assert train(*source, "--amp", amp, "--epochs", 2, "--out", tmp_path / "eager") == 0
    assert_same_training(tmp_path / "graphed", tmp_path / "eager")


def test_cuda_graphs_under_compile(prepared, tmp_path, capsys):
    """fp16 (the GradScaler in the graph) with compiled networks; bf16 with both is gpu_check's compile-graphs."""
    run = tmp_path / "run"
    assert train("--data", prepared, "--amp", "fp16", "--channels-last", "--compile", "--cuda-graphs", "--epochs", 2,
                 "--out", run) == 0
    err = capsys.readouterr().err
    assert "compile on" in err and "CUDA graphs on" in err and "precision fp16" in err
    ckpt = assert_finished(run, 12, 2)
    # saved unwrapped from torch.compile: pytorch/examples' keys
    for weights in (ckpt["netG"], ckpt["netD"], load(run / "netG.pth")):
        assert not [k for k in weights if "_orig_mod" in k] and "main.0.weight" in weights


def test_a_run_written_without_cuda_graphs_resumes_with_them(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--data", prepared, "--amp", "fp16", "--epochs", 1, "--out", run) == 0
    assert "CUDA graphs off" in capsys.readouterr().err
    assert main(["train", "--resume", "auto", "--out", str(run), "--epochs", "2", "--cuda-graphs", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "CUDA graphs on" in err and "precision fp16" in err
    ckpt = assert_finished(run, 12, 2)
    assert ckpt["scaler"]["scale"] > 0 and json.loads((run / "config.resumed-at-6.json").read_text())["cuda_graphs"]
    # the same two epochs without a break and without graphs: the resumed graph went on from the checkpoint
    assert train("--data", prepared, "--amp", "fp16", "--epochs", 2, "--out", tmp_path / "straight") == 0
    assert_same_training(run, tmp_path / "straight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mirror", [False, True])
def test_the_prepared_loader_on_cuda_yields_the_cpu_loaders_batches(dtype, mirror):
    from fastgan.data.prepared import PreparedLoader
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    for rank, world_size, start in [(0, 1, 0), (0, 1, 2), (1, 2, 0)]:  # a whole epoch, a resumed one, a shard
        loaders = [PreparedLoader(pixels, 4, device, channels_last=True, seed=7, mirror=mirror, rank=rank,
                                  world_size=world_size, dtype=dtype) for device in ("cuda", "cpu")]
        for epoch in (0, 1):
            for loader in loaders:
                loader.set_epoch(epoch, start)
            on_cuda, on_cpu = (list(loader) for loader in loaders)
            assert len(on_cuda) == len(on_cpu) == 40 // (4 * world_size) - start
            for cuda_batch, cpu_batch in zip(on_cuda, on_cpu):
                assert cuda_batch.is_cuda and cuda_batch.dtype == dtype and cuda_batch.shape == (4, 3, 16, 16)
                assert cuda_batch.is_contiguous(memory_format=torch.channels_last)
                # the same gather and table look-up on either device: bit for bit
                assert torch.equal(cuda_batch.cpu(), cpu_batch)


@pytest.mark.dali
def test_prepare_with_dali_on_the_gpu_is_close_to_pil(faces, tmp_path):
    need_dali()
    from fastgan.data.prepared import load_pixels, read_manifest
    for decoder in ("pil", "dali-gpu"):
        assert main(["prepare", "--root", str(faces), "--image-size", "32", "--out", str(tmp_path / f"{decoder}.fgd"),
                     "--decoder", decoder]) == 0
    assert read_manifest(tmp_path / "dali-gpu.fgd")[0]["decoder"] == "DALI (GPU)"
    pil, _ = load_pixels(tmp_path / "pil.fgd", 32, 3)
    dali, _ = load_pixels(tmp_path / "dali-gpu.fgd", 32, 3)
    assert dali.shape == pil.shape == (FACES, 32, 32, 3)
    diff = (dali.int() - pil.int()).abs().float()
    mean, p999 = diff.mean().item(), diff.flatten().kthvalue(int(diff.numel() * 0.999)).values.item()
    # In 0..255 levels. DALI's CPU decoder against PIL on these faces, measured: mean 0.085, 99.9th percentile 1,
    # max 6; nvJPEG and the hardware decoder round their IDCT and chroma upsampling their own way (the GPU loader's
    # test allows 1.3 levels on average). A one-pixel shift of the crop costs 7.5 levels on average, a swap of
    # the colour channels 22: mean < 1 and a 99.9th percentile <= 10 let a decoder's rounding through, not those.
    assert mean < 1 and p999 <= 10, f"DALI on the GPU against PIL: mean {mean:.3f}, 99.9th percentile {p999}"


@pytest.mark.dali
def test_three_epochs_of_dali_decoding_on_the_gpu(faces, tmp_path, capsys):
    """One DALI pipeline feeds the whole run, prefetching across epoch ends: every epoch gets all its batches."""
    need_dali()
    run = tmp_path / "run"
    assert train("--root", faces, "--loader", "dali", "--dali-decoder", "mixed", "--amp", "fp16", "--epochs", 3,
                 "--out", run) == 0
    assert "loader dali (decoder mixed" in capsys.readouterr().err
    assert_finished(run, 18, 3)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch001.pt", "epoch002.pt", "epoch003.pt",
                                                                      "last.pt"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["iteration"]) for m in metrics] == [(e, i) for e in (1, 2, 3) for i in (2, 4, 6)]
