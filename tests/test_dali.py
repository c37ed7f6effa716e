"""The DALI loader on the CPU (what CI runs), and on the GPU where there is one (marked gpu).

Without DALI installed these tests skip, unless FASTGAN_REQUIRE_DALI=1 (as .ci/run sets), where its absence is
an error: CI must not pass by skipping them.
"""
import gc
import itertools
import os
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_images
from fastgan.cli import main
from fastgan.pipeline_dali import dali_available, dali_unusable
from fastgan.data.pipeline_torch import TorchLoader, epoch_permutation
from fastgan.data.synth import write_faces

pytestmark = pytest.mark.dali  # bench/gpu_check.py runs the GPU tests that need DALI once DALI has arrived

if not dali_available():
    if os.environ.get("FASTGAN_REQUIRE_DALI"):
        raise RuntimeError(f"FASTGAN_REQUIRE_DALI is set but NVIDIA DALI is not usable here: {dali_unusable()}")
    pytest.skip(f'NVIDIA DALI is not usable here: {dali_unusable()} (pip install "fastgan[dali]")',
                allow_module_level=True)

from fastgan import pipeline_dali  # noqa: E402
from fastgan.pipeline_dali import DaliLoader, decode_all  # noqa: E402
from fastgan.data.pipeline_torch import rank_order  # noqa: E402

CPU = torch.device("cpu")


class Recorded:
    """A pipeline whose run() calls are recorded in `runs`: (arguments, outputs). It holds the pipeline, and the
    pipeline holds nothing of it. A run() patched onto the pipeline itself made a reference cycle, which left each
    pipeline to the cycle collector: when a forked worker (index_images' pool) collected its copy, DALI's
    destructor crashed the worker (SIGSEGV, a BrokenProcessPool in a later test of the same pytest process)."""

    def __init__(self, pipe, runs: list):
        self.pipe, self.runs = pipe, runs

    def run(self, *args):
        outputs = self.pipe.run(*args)
        self.runs.append((args, outputs))
        return outputs


@pytest.fixture
def builds(monkeypatch):
    """Every pipeline the DALI loader builds, each as the list of its run() calls: (arguments, outputs)."""
    built = []
    build = pipeline_dali.build_pipeline

    def recording(*args, **kwargs):
        built.append([])
        return Recorded(build(*args, **kwargs), built[-1])
    monkeypatch.setattr(pipeline_dali, "build_pipeline", recording)
    return built


def epochs_of(loader, epochs, start=0):
    """The training loop's way through a loader: set_epoch, then every batch, epoch after epoch."""
    batches = []
    for epoch in range(epochs):
        loader.set_epoch(epoch, start if epoch == 0 else 0)
        batches += list(loader)
    return batches


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


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_bf16_run_gets_bf16_batches_rounded_from_the_pipelines_float16(faces, channels_last):
    """DALI has no bfloat16: its float16 output is cast, so that the step sees the run's dtype from every loader
    (a compiled step otherwise compiles a version for DALI's dtype as well)."""
    bf16 = list(DaliLoader(faces, 32, 3, 16, CPU, channels_last=channels_last, seed=3, dtype=torch.bfloat16))
    fp16 = list(DaliLoader(faces, 32, 3, 16, CPU, channels_last=channels_last, seed=3, dtype=torch.float16))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for a, b in zip(bf16, fp16):
        assert a.dtype == torch.bfloat16 and b.dtype == torch.float16
        assert a.is_contiguous(memory_format=memory_format)
        assert torch.equal(a, b.to(torch.bfloat16))  # the rounding autocast does at the first convolution


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


def test_two_ranks_split_each_epoch_from_one_pipeline_each(tmp_path, builds):
    paths = index_images_of(tmp_path, 50)  # 50 = 3 global batches of 2 x 8 + 2 dropped
    loaders = [DaliLoader(paths, 16, 3, 8, CPU, seed=7, rank=rank, world_size=2) for rank in (0, 1)]
    assert len(loaders[0]) == len(loaders[1]) == 3
    seen = [[indices(batch) for batch in epochs_of(loader, 3)] for loader in loaders]
    assert len(builds) == 2  # one pipeline per rank for the 3 epochs
    for epoch in range(3):
        ours = [batches[3 * epoch:3 * (epoch + 1)] for batches in seen]
        assert not set(sum(ours[0], [])) & set(sum(ours[1], []))  # disjoint
        # side by side, the ranks' batches are the global batches of one process with batch 16
        assert sum([a + b for a, b in zip(*ours)], []) == epoch_permutation(50, 7, epoch)[:48].tolist()


def test_a_resumed_epoch_starts_at_its_batch(tmp_path):
    loader = DaliLoader(index_images_of(tmp_path, 40), 16, 3, 8, CPU, seed=7)
    loader.set_epoch(1)
    whole = [indices(batch) for batch in loader]
    loader.set_epoch(1, start=3)
    assert [indices(batch) for batch in loader] == whole[3:]
    loader.set_epoch(1, start=9)
    assert list(loader) == []


def test_one_pipeline_for_every_epoch_same_batches_as_the_torch_loader(faces, builds):
    dali = epochs_of(DaliLoader(faces, 32, 3, 16, CPU, channels_last=True, seed=3), 3)
    torch_ = epochs_of(TorchLoader(faces, 32, 3, 16, CPU, channels_last=True, seed=3), 3)
    assert len(builds) == 1  # the pipeline went on from epoch to epoch
    assert len(dali) == len(torch_) == 12
    for a, b in zip(dali, torch_):
        diff = (a - b).abs()
        # test_same_batches_as_the_torch_loader's bounds, batch by batch. Measured here: max 0.047, mean under
        # 0.0007 in every batch; two images swapped inside a batch give max 0.96, mean 0.03 (and a batch from
        # another place in the order, mean 0.34)
        assert diff.max() < 0.08 and diff.mean() < 0.003


def test_a_run_resumed_mid_epoch_goes_on_into_the_next_epochs(tmp_path, builds):
    paths = index_images_of(tmp_path, 40)  # 5 batches of 8 per epoch
    loader = DaliLoader(paths, 16, 3, 8, CPU, seed=7)
    got = [indices(batch) for batch in epochs_of(loader, 3, start=2)]
    assert len(builds) == 1
    expected = [rank_order(40, 7, epoch, 8).view(5, 8)[first:].tolist()
                for epoch, first in ((0, 2), (1, 0), (2, 0))]
    assert got == sum(expected, [])


def test_an_unexpected_set_epoch_rebuilds_and_reads_what_it_asked_for(tmp_path, builds):
    paths = index_images_of(tmp_path, 40)
    loader = DaliLoader(paths, 16, 3, 8, CPU, seed=7)

    def expected(epoch, first=0):
        return rank_order(40, 7, epoch, 8).view(5, 8)[first:].tolist()
    loader.set_epoch(0)
    assert [indices(batch) for batch in loader] == expected(0)
    loader.set_epoch(4)  # not the next epoch: a jump
    assert [indices(batch) for batch in loader] == expected(4)
    assert len(builds) == 2
    loader.set_epoch(5)  # the one the pipeline has coming: no build
    first_two = [indices(batch) for batch in itertools.islice(loader, 2)]  # left after 2 of 5 batches
    assert first_two == expected(5)[:2] and len(builds) == 2
    loader.set_epoch(6)  # the pipeline holds epoch 5's third batch next
    assert [indices(batch) for batch in loader] == expected(6)
    assert len(builds) == 3
    assert [indices(batch) for batch in loader] == expected(6)  # no set_epoch: the same epoch again
    loader.set_epoch(2, start=4)
    assert [indices(batch) for batch in loader] == expected(2, 4)
    assert len(builds) == 5


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
    assert main(["train", "--root", str(root), "--out", str(run), "--loader", "dali", "--device", "cpu", "--epochs", "1",
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


def test_a_pipeline_let_go_is_freed_at_once_not_left_to_the_cycle_collector(tmp_path, monkeypatch):
    """fastgan forks worker processes after DALI may have run in the same process (index_images' pool, the torch
    loader's workers, the benches' loaders side by side). A pipeline held in a reference cycle waits for the cycle
    collector, and a forked worker that collects its copy dies in DALI's destructor (SIGSEGV). So every pipeline
    fastgan lets go must be freed at once: the loader's old one at a rebuild, its last one with the loader, and
    decode_all's (prepare and the cache) when it ends. The collector is off, so only reference counts free them."""
    freed = []
    build = pipeline_dali.build_pipeline
    monkeypatch.setattr(pipeline_dali, "build_pipeline",
                        lambda *args, **kwargs: (pipe := build(*args, **kwargs), freed.append(weakref.ref(pipe)))[0])
    paths = index_images_of(tmp_path, 24)
    gc.collect()
    gc.disable()
    try:
        loader = DaliLoader(paths, 16, 3, 8, CPU, seed=7)
        epochs_of(loader, 2)
        loader.set_epoch(5, 1)  # a jump: the loader rebuilds
        list(loader)
        assert len(freed) == 2 and freed[0]() is None and freed[1]() is not None
        del loader
        assert freed[1]() is None
        assert len(list(decode_all(paths, 16, 3, "cpu", threads=2, batch_size=8))) == 3
        assert len(freed) == 3 and freed[2]() is None
    finally:
        gc.enable()


def test_decode_all_yields_every_file_once_in_order_the_last_batch_short(tmp_path):
    paths = index_images_of(tmp_path, 21)
    batches = list(decode_all(paths, 16, 3, "cpu", threads=2, batch_size=8))
    assert [len(b) for b in batches] == [8, 8, 5]
    assert all(b.dtype == torch.uint8 and b.shape[1:] == (16, 16, 3) for b in batches)
    # flat colours survive the resize exactly: the red channel is 5 * the file's index
    assert (torch.cat(batches)[..., 0].float().mean(dim=(1, 2)) / 5).round().long().tolist() == list(range(21))


# ---- GPU ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_is_close_to_cpu_decode(faces, dtype, builds):
    cuda = torch.device("cuda")
    gpu = torch.cat(epochs_of(DaliLoader(faces, 64, 3, 16, cuda, channels_last=True, seed=3, decoder="mixed",
                                         dtype=dtype), 3))
    assert len(builds) == 1  # one pipeline for the 3 epochs
    cpu = torch.cat(epochs_of(DaliLoader(faces, 64, 3, 16, CPU, seed=3), 3))
    assert gpu.device.type == "cuda" and gpu.dtype == dtype and len(gpu) == len(cpu) == 3 * 64
    assert gpu.is_contiguous(memory_format=torch.channels_last)
    diff = (gpu.float().cpu() - cpu).abs()
    # nvJPEG's chroma upsampling and IDCT differ slightly from libjpeg-turbo's
    assert diff.mean() < 0.01 and diff.flatten().kthvalue(int(diff.numel() * 0.99)).values < 0.05


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_decoder_on_a_cuda_device_hands_over_cuda_tensors(faces, channels_last):
    gpu = epochs_of(DaliLoader(faces, 32, 3, 16, torch.device("cuda"), channels_last=channels_last, seed=3), 2)
    cpu = epochs_of(DaliLoader(faces, 32, 3, 16, CPU, channels_last=channels_last, seed=3), 2)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert all(b.is_cuda and b.is_contiguous(memory_format=memory_format) for b in gpu)
    # the same CPU operators decoded both; the GPU ones were copied inside the pipeline
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu, cpu))


@pytest.mark.parametrize("decoder", ["cpu", "mixed"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_are_ordered_on_torchs_stream_without_a_host_sync(faces, decoder, builds):
    cuda = torch.device("cuda")
    loader = DaliLoader(faces, 32, 3, 8, cuda, channels_last=True, seed=3, decoder=decoder, dtype=torch.float16)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        loader.set_epoch(0)
        batches = iter(loader)
        kept = [next(batches) for _ in range(2)]  # warm-up: the build and the first prefetch
        copies = [batch.clone() for batch in kept]
        # torch's syncs only: DALI's own CUDA calls are not torch's, set_sync_debug_mode does not see them
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                kept.append(next(batches))
                copies.append(kept[-1].clone())
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.current_stream().synchronize()
    (runs,) = builds
    assert all(getattr(args[0], "cuda_stream", None) == side.cuda_stream for args, _ in runs)  # torch's stream
    (images,) = runs[-1][1]
    assert kept[-1].data_ptr() == images.as_tensor().data_ptr()  # DALI's own buffer: no copy
    # six batches later, the first are still what DALI handed over: exec_dynamic gave each its own buffer
    assert all(torch.equal(batch, copy) for batch, copy in zip(kept, copies))


def test_the_cache_decodes_with_dali_as_its_options_ask(faces, tmp_path, monkeypatch, capsys):
    """--dali-decoder cpu without --loader: the cache decodes with DALI on the CPU (its name and manifest say so),
    on --dali-threads threads and with --hw-decoder-load's share, not with PIL and the defaults."""
    from fastgan.data.prepared import read_manifest
    built = []
    build = pipeline_dali.build_pipeline
    monkeypatch.setattr(pipeline_dali, "build_pipeline", lambda *args: built.append(args) or build(*args))
    assert main(["train", "--root", str(faces[0].parent), "--cache-dir", str(tmp_path / "cache"), "--out",
                 str(tmp_path / "run"), "--dali-decoder", "cpu", "--dali-threads", "3", "--hw-decoder-load", "0.5",
                 "--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "16", "--epochs", "1",
                 "--device", "cpu", "--quiet"]) == 0
    [made] = (tmp_path / "cache").glob("*.fgd")
    assert "-16px-3c-dali-cpu-" in made.name and read_manifest(made)[0]["decoder"] == "DALI (CPU)"
    err = " ".join(capsys.readouterr().err.split())
    assert "KB, DALI on the CPU)" in err, err
    [(_, _, _, _, decoder, threads, _, hw_load, _)] = built  # decode_all's one pipeline; training reads the cache
    assert (decoder, threads, hw_load) == ("cpu", 3, 0.5)


def test_prepare_with_dali_on_the_cpu(faces, tmp_path):
    from fastgan.data.prepared import load_pixels, read_manifest
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
