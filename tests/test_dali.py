"""The DALI loader on the CPU (what CI runs), and on the GPU where there is one (marked gpu).

Without DALI installed these tests skip, unless FASTGAN_REQUIRE_DALI=1 (as .ci/run sets), where its absence is
an error: CI must not pass by skipping them.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_images
from fastgan.cli import main
from fastgan.pipeline_dali import dali_available
from fastgan.pipeline_torch import TorchLoader, epoch_permutation
from fastgan.synth import write_faces

if not dali_available():
    if os.environ.get("FASTGAN_REQUIRE_DALI"):
        raise RuntimeError("FASTGAN_REQUIRE_DALI is set but NVIDIA DALI is not installed")
    pytest.skip('NVIDIA DALI is not installed (pip install "fastgan[dali]")', allow_module_level=True)

from fastgan.pipeline_dali import DaliLoader, build_pipeline  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """64 synthetic CelebA-sized face JPEGs (178x218)."""
    return write_faces(tmp_path_factory.mktemp("faces"), 64, seed=5, workers=1)


def index_images_of(tmp_path, n):
    """n flat-colour lossless PNGs whose red channel encodes their index (5 * i), to follow images through."""
    paths = []
    for i in range(n):
        path = tmp_path / f"{i:03d}.png"
        Image.new("RGB", (30, 40), (5 * i, 255 - 5 * i, 128)).save(path)
        paths.append(path)
    return paths


def indices(batch: torch.Tensor) -> list[int]:
    red = batch[:, 0].mean(dim=(1, 2)) * 127.5 + 127.5  # back to 0..255
    return (red / 5).round().long().tolist()


@pytest.mark.parametrize("size,nc", [(16, 3), (32, 3), (64, 3), (64, 1), (128, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_same_batches_as_the_torch_loader(faces, size, nc, channels_last):
    dali = list(DaliLoader(faces, size, nc, 16, CPU, channels_last=channels_last, seed=3))
    torch_ = list(TorchLoader(faces, size, nc, 16, CPU, channels_last=channels_last, seed=3))
    assert len(dali) == len(torch_) == 4
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for a, b in zip(dali, torch_):
        assert a.shape == b.shape == (16, nc, size, size)
        assert a.dtype == b.dtype == torch.float32 and a.device == b.device == CPU
        assert a.is_contiguous(memory_format=memory_format)
        assert a.min() >= -1 and a.max() <= 1
    diff = (torch.cat(dali) - torch.cat(torch_)).abs()
    # Same images in the same order; only the resize filters differ (DALI's antialiased linear filter vs PIL's
    # bilinear reduce). Measured on these faces, downscaling 178x218 to 16..128: max 0.055 (7/255 levels),
    # mean 0.0014, 99th percentile 0.0078 (1/255). Upscaling (to 256) differs more: mean 0.018.
    assert diff.max() < 0.08
    assert diff.mean() < 0.003
    assert diff.flatten().kthvalue(int(diff.numel() * 0.99)).values < 0.02


def test_every_image_once_per_epoch_new_order_each_epoch(tmp_path):
    paths = index_images_of(tmp_path, 48)
    loader = DaliLoader(paths, 16, 3, 8, CPU, seed=7)
    epoch0 = [i for batch in loader for i in indices(batch)]
    assert sorted(epoch0) == list(range(48))
    assert epoch0 == epoch_permutation(48, 7, 0).tolist()  # the torch loader's order, too
    loader.set_epoch(1)
    epoch1 = [i for batch in loader for i in indices(batch)]
    assert sorted(epoch1) == list(range(48)) and epoch1 != epoch0
    again = DaliLoader(paths, 16, 3, 8, CPU, seed=7)
    assert [i for batch in again for i in indices(batch)] == epoch0
    other_seed = DaliLoader(paths, 16, 3, 8, CPU, seed=8)
    assert [i for batch in other_seed for i in indices(batch)] != epoch0


def test_two_ranks_split_each_epoch(tmp_path):
    paths = index_images_of(tmp_path, 50)  # 50 = 3 global batches of 2 x 8 + 2 dropped
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = DaliLoader(paths, 16, 3, 8, CPU, seed=7, rank=rank, world_size=2)
            loader.set_epoch(epoch)
            assert len(loader) == 3
            seen.append([indices(batch) for batch in loader])
        assert not set(sum(seen[0], [])) & set(sum(seen[1], []))  # disjoint
        # side by side, the ranks' batches are the global batches of one process with batch 16
        assert sum([a + b for a, b in zip(*seen)], []) == epoch_permutation(50, 7, epoch)[:48].tolist()


def test_a_resumed_epoch_starts_at_its_batch(tmp_path):
    loader = DaliLoader(index_images_of(tmp_path, 40), 16, 3, 8, CPU, seed=7)
    loader.set_epoch(1)
    whole = [indices(batch) for batch in loader]
    loader.set_epoch(1, start=3)
    assert [indices(batch) for batch in loader] == whole[3:]
    loader.set_epoch(1, start=9)
    assert list(loader) == []


def test_incomplete_last_batch_is_dropped(tmp_path):
    loader = DaliLoader(index_images_of(tmp_path, 20), 16, 3, 8, CPU)
    batches = list(loader)
    assert len(loader) == len(batches) == 2 and all(b.shape[0] == 8 for b in batches)


def test_odd_files_train_through_dali(tmp_path, capsys):
    root = tmp_path / "odd"
    write_images(root / "faces", 12)
    rgb = Image.open(root / "faces" / "0000.jpg")
    rgb.convert("L").save(root / "faces" / "gray.jpg")
    rgb.convert("CMYK").save(root / "faces" / "cmyk.jpg")
    rgb.convert("RGBA").save(root / "faces" / "alpha.png")
    rgb.convert("P").save(root / "faces" / "palette.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 2400, 3), dtype=np.uint8)).save(
        root / "faces" / "huge.jpg", quality=50)
    (root / "faces" / "empty.jpg").write_bytes(b"")
    good = (root / "faces" / "0001.jpg").read_bytes()
    (root / "faces" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    rgb.convert("P").save(root / "faces" / "gif-inside.png", format="GIF")  # PIL reads it, DALI cannot
    run = tmp_path / "run"
    assert main(["train", "--root", str(root), "--out", str(run), "--loader", "dali", "--epochs", "1",
                 "--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "6",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "loader dali (decoder cpu" in err
    assert "skipped 3 of 20 files that cannot be decoded" in err  # 17 usable: 2 full batches of 6 ran
    skipped = sorted(line.split("\t")[0].rsplit("/", 1)[1] for line in (run / "skipped_files.txt").read_text()
                     .splitlines())
    assert skipped == ["empty.jpg", "gif-inside.png", "truncated.jpg"]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


def test_mixed_decoder_needs_cuda(image_folder, capsys):
    assert main(["train", "--root", str(image_folder), "--loader", "dali", "--dali-decoder", "mixed",
                 "--device", "cpu"]) == 2
    assert "--dali-decoder mixed decodes on the GPU and needs --device cuda" in capsys.readouterr().err


# ---- GPU ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_is_close_to_cpu_decode(faces, dtype):
    cuda = torch.device("cuda")
    gpu = torch.cat(list(DaliLoader(faces, 64, 3, 16, cuda, channels_last=True, seed=3, decoder="mixed",
                                    dtype=dtype)))
    cpu = torch.cat(list(DaliLoader(faces, 64, 3, 16, CPU, seed=3)))
    assert gpu.device.type == "cuda" and gpu.dtype == dtype
    assert gpu.is_contiguous(memory_format=torch.channels_last)
    diff = (gpu.float().cpu() - cpu).abs()
    # nvJPEG's chroma upsampling and IDCT differ slightly from libjpeg-turbo's
    assert diff.mean() < 0.01 and diff.flatten().kthvalue(int(diff.numel() * 0.99)).values < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_batches_reach_torch_without_a_copy(faces):
    pipe = build_pipeline([str(p) for p in faces], 64, 3, 16, "mixed", 2, torch.cuda.current_device(), 0.65,
                          torch.float16)
    (images,) = pipe.run()
    dali_tensor = images.as_tensor()
    batch = torch.from_dlpack(dali_tensor)
    assert batch.is_cuda and batch.data_ptr() == dali_tensor.data_ptr()


def test_prepare_with_dali_on_the_cpu(faces, tmp_path):
    from fastgan.prepared import load_pixels, read_manifest
    folder = faces[0].parent
    for decoder in ("pil", "dali-cpu"):
        assert main(["prepare", "--root", str(folder), "--image-size", "32", "--out", str(tmp_path / f"{decoder}.fgd"),
                     "--decoder", decoder, "--workers", "2"]) == 0
    pil, _ = load_pixels(tmp_path / "pil.fgd", 32, 3)
    dali, _ = load_pixels(tmp_path / "dali-cpu.fgd", 32, 3)
    assert read_manifest(tmp_path / "dali-cpu.fgd")[0]["decoder"] == "DALI (CPU)"
    assert dali.shape == pil.shape == (64, 32, 32, 3)
    diff = (dali.int() - pil.int()).abs()
    # the loaders' measured agreement, in 0..255 levels: max 7, mean well under 1
    assert diff.max() <= 8 and diff.float().mean() < 0.3
