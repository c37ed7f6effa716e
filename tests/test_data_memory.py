"""--data-memory: the prepared pixels in device memory, host memory or the memory-mapped file, the same batches
from each, the mapped file's chunks checked as they are first read, and the choice of a tier."""
import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fastgan.data.streamed as streamed
from fastgan.cli import main
from fastgan.errors import FastganError
from fastgan.data.prepared import MAGIC, PreparedLoader, load_pixels
from fastgan.data.streamed import StreamedLoader, choose_tier, map_pixels

CPU = torch.device("cpu")


def write_prepared(path, pixels: np.ndarray, chunk_bytes: int) -> None:
    """A version-2 prepared file written from its description (prepared.py's docstring), not by fastgan."""
    data = pixels.tobytes()
    count, size, _, nc = pixels.shape
    manifest = {"format": "fastgan-data", "version": 2, "source_root": "/made/by/the/test", "count": count,
                "image_size": size, "nc": nc, "layout": "NHWC", "dtype": "uint8", "decoder": "PIL", "skipped": [],
                "chunk_bytes": chunk_bytes, "created": "2026-12-03 12:00:00",
                "chunk_sha256": [hashlib.sha256(data[i:i + chunk_bytes]).hexdigest()
                                 for i in range(0, len(data), chunk_bytes)]}
    header = json.dumps(manifest).encode()
    head = MAGIC + struct.pack("<Q", len(header)) + header
    path.write_bytes(head + b"\0" * (-len(head) % 64) + data)


def random_pixels(count: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.fixture
def prepared_file(tmp_path):
    path = tmp_path / "set.fgd"
    write_prepared(path, random_pixels(50), chunk_bytes=1000)  # 192-byte images: some span two chunks
    return path


@pytest.fixture
def prepared16(tmp_path):
    """A set training can take (16 px, the smallest --image-size): 24 images of 768 bytes, chunks of 1000."""
    path = tmp_path / "set16.fgd"
    write_prepared(path, random_pixels(24, size=16), chunk_bytes=1000)
    return path


def loaders(path, **options):
    """The three tiers over one file: device (PreparedLoader), host (in RAM, gathered ahead), disk (mapped)."""
    pixels, _ = load_pixels(path, 8, 3)
    source, _, check = map_pixels(path, 8, 3, "")
    return {"device": PreparedLoader(pixels, device=CPU, **options),
            "host": StreamedLoader(pixels.numpy(), device=CPU, **options),
            "disk": StreamedLoader(source, device=CPU, check=check, **options)}


@pytest.mark.parametrize("options", [dict(), dict(mirror=True, channels_last=True, dtype=torch.bfloat16),
                                     dict(rank=1, world_size=2, mirror=True)])
def test_every_tier_yields_the_same_batches_and_resumes_inside_an_epoch(prepared_file, options):
    tiers = loaders(prepared_file, batch_size=6, seed=5, **options)
    for epoch in (0, 1):
        batches = {}
        for name, loader in tiers.items():
            loader.set_epoch(epoch)
            batches[name] = list(loader)
        assert len(batches["device"]) == (8 if options.get("world_size") != 2 else 4)
        for name in ("host", "disk"):
            for ours, theirs in zip(batches[name], batches["device"], strict=True):
                assert ours.dtype == theirs.dtype and ours.is_contiguous(memory_format=torch.channels_last) == \
                    theirs.is_contiguous(memory_format=torch.channels_last)
                assert torch.equal(ours, theirs), (name, epoch)
            loader = tiers[name]
            loader.set_epoch(epoch, start=3)  # resumed after three batches of the epoch
            resumed = list(loader)
            assert len(resumed) == len(batches["device"]) - 3
            assert all(torch.equal(a, b) for a, b in zip(resumed, batches["device"][3:]))
    for name in ("host", "disk"):
        assert torch.equal(tiers[name].preview(7), tiers["device"].preview(7))


def test_the_disk_tier_checks_each_chunk_when_first_read_and_names_a_damaged_one(prepared_file, tmp_path):
    source, manifest, check = map_pixels(prepared_file, 8, 3, "")
    assert not check.checked.any()  # opening reads no pixels
    loader = StreamedLoader(source, 6, CPU, seed=1, check=check, threads=1, ahead=1)
    next(iter(loader))
    touched = check.checked.sum()
    assert 0 < touched < len(check.checked)  # the first batch's chunks, not all 10
    data = bytearray(prepared_file.read_bytes())
    offset = len(data) - 50 * 192
    data[offset + 4 * 1000 + 3] ^= 1  # chunk 5
    damaged = tmp_path / "damaged.fgd"
    damaged.write_bytes(bytes(data))
    source, _, check = map_pixels(damaged, 8, 3, "")
    with pytest.raises(FastganError, match=r"damaged.fgd fails its checksum .*chunk 5 of 10"):
        for _ in StreamedLoader(source, 6, CPU, seed=1, check=check):
            pass


def test_chunk_check_covers_images_that_span_chunks(prepared_file):
    source, manifest, check = map_pixels(prepared_file, 8, 3, "")
    check.images(np.array([5]))  # bytes 960..1151: chunks 1 and 2
    assert check.checked.nonzero()[0].tolist() == [0, 1]


def test_the_disk_tier_holds_no_copy_of_the_set(tmp_path):
    """An epoch from a 98 MB mapped file raises the process's own (anonymous) memory, from before the file is
    opened (after a warm-up epoch of a small set), by a few batches, not by the set: the pixels it reads are the
    page cache's (file-backed). malloc is told to give large blocks back when freed, so that its slack (10-41 MB
    under load without it) does not hide what is held. Measured: 7 MB. Holding the set in memory adds 98 MB
    (planted np.fromfile: 109 MB); the bound, 30 MB, leaves room for the batches ahead (3 MB each as float32)."""
    path = tmp_path / "big.fgd"
    write_prepared(path, random_pixels(2000, size=128), chunk_bytes=4 << 20)  # 48 KB images
    script = textwrap.dedent(f"""
        import numpy as np
        import torch
        from fastgan.data.streamed import StreamedLoader, map_pixels
        def anonymous():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        for _ in StreamedLoader(np.zeros((64, 128, 128, 3), np.uint8), 16, torch.device("cpu"), seed=0):
            pass  # the threads, the allocator's pools and torch's first calls: paid before the baseline
        before = anonymous()
        source, manifest, check = map_pixels({str(path)!r}, 128, 3, "")
        loader = StreamedLoader(source, 16, torch.device("cpu"), seed=0, check=check)
        print(max(anonymous() for _ in loader) - before)
    """)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # blocks over 64 KB mapped, and unmapped when freed
    grown = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, env=env)
                .stdout.split()[-1])
    assert grown < 30 << 20, f"anonymous memory grew by {grown / 2**20:.0f} MB over an epoch of a 98 MB file"


def test_auto_picks_device_memory_when_the_set_fits_and_the_file_when_not(monkeypatch):
    monkeypatch.setattr(streamed, "available_ram", lambda: 10_000_000_000)
    assert choose_tier("auto", 4_000_000_000, CPU) == ("device", "auto: 4.0 GB of 10.0 GB free RAM")
    tier, why = choose_tier("auto", 6_000_000_000, CPU)
    assert tier == "disk" and "6.0 GB of 10.0 GB free RAM, more than half" in why
    tier, why = choose_tier("auto", 3_000_000_000, CPU, local_ranks=2)  # each rank holds its copy
    assert tier == "disk" and "3.0 GB x 2 ranks" in why
    assert choose_tier("host", 1_000, CPU)[0] == "host"
    with pytest.raises(FastganError, match=r"--data-memory device cannot hold the set: 6.0 GB of 10.0 GB free RAM.*"
                                           r"--data-memory disk would work"):
        choose_tier("device", 6_000_000_000, CPU)


def test_a_tier_that_cannot_hold_the_set_is_refused_in_one_line_before_anything_is_written(prepared16, tmp_path,
                                                                                          monkeypatch, capsys):
    monkeypatch.setattr(streamed, "available_ram", lambda: 10_000)
    run = tmp_path / "run"
    argv = ["train", "--data", str(prepared16), "--out", str(run), "--device", "cpu", "--batch-size", "6",
            "--ngf", "4", "--ndf", "4", "--nz", "8", "--epochs", "1", "--image-size", "16"]
    assert main([*argv, "--data-memory", "device"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot hold the set: 18.4 KB of 10.0 KB free RAM" in err and "--data-memory disk would work" in err
    assert len(err.splitlines()) == 1 and not run.exists()
    assert main(["train", "--data-memory", "disk", "--loader", "torch", "--device", "cpu"]) == 2
    assert "--data-memory works with --data (a prepared file) or the cache" in capsys.readouterr().err


def test_on_the_cpu_the_host_tier_is_the_device_tier_as_the_docs_say(prepared16, tmp_path, capsys):
    """--data-memory host is taken on the CPU, where RAM is the device's memory: the run holds the pixels as the
    device tier does, trains its weights bit for bit, and docs/data.md's row says so (it said CUDA only)."""
    argv = ["train", "--data", str(prepared16), "--device", "cpu", "--batch-size", "6", "--ngf", "4", "--ndf", "4",
            "--nz", "8", "--quiet", "--image-size", "16", "--epochs", "1"]
    assert main([*argv, "--out", str(tmp_path / "device"), "--data-memory", "device"]) == 0
    assert main([*argv, "--out", str(tmp_path / "host"), "--data-memory", "host"]) == 0
    assert "loader prepared (cpu memory (host memory on the CPU); " in " ".join(capsys.readouterr().err.split())
    device, host = (torch.load(tmp_path / run / "netG.pth", weights_only=True) for run in ("device", "host"))
    assert all(torch.equal(device[k], host[k]) for k in device)
    page = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| `host` |"))
    assert "CUDA only" not in row and "on the CPU" in row and "`device` tier" in row


def test_a_run_from_the_mapped_file_trains_and_resumes_as_one_from_device_memory(prepared16, tmp_path, capsys):
    """Where the tiers meet the run: the disk tier's run, stopped after an epoch and resumed, ends with the
    device tier's straight run's weights, bit for bit."""
    argv = ["train", "--data", str(prepared16), "--device", "cpu", "--batch-size", "6", "--ngf", "4",
            "--ndf", "4", "--nz", "8", "--quiet", "--mirror", "--image-size", "16"]
    assert main([*argv, "--out", str(tmp_path / "device"), "--epochs", "2", "--data-memory", "device"]) == 0
    assert main([*argv, "--out", str(tmp_path / "disk"), "--epochs", "1", "--data-memory", "disk"]) == 0
    assert main([*argv, "--out", str(tmp_path / "disk"), "--epochs", "2", "--data-memory", "disk",
                 "--resume", "auto"]) == 0
    assert "loader prepared (disk: the file memory-mapped, mirrored; asked for)" in capsys.readouterr().err
    straight = torch.load(tmp_path / "device" / "netG.pth", weights_only=True)
    resumed = torch.load(tmp_path / "disk" / "netG.pth", weights_only=True)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_damaged_chunk_in_a_device_tier_file_is_refused_at_start(prepared_file, tmp_path):
    data = bytearray(prepared_file.read_bytes())
    data[-1] ^= 1
    damaged = tmp_path / "damaged.fgd"
    damaged.write_bytes(bytes(data))
    with pytest.raises(FastganError, match="chunk 10 of 10"):
        load_pixels(damaged, 8, 3)



@pytest.mark.gpu
def test_on_cuda_the_host_and_disk_tiers_copy_through_pinned_memory_and_give_the_device_tiers_batches(prepared_file):
    """On CUDA the host and disk tiers gather into pinned memory and copy on a side stream that the step's stream
    waits on: the batches are the device tier's, bit for bit, and nothing waits on the host (each batch's copy is
    ordered on the device; the gathering is the pool's). The step's stream is a non-default one, as under
    --cuda-graphs' warm-up, so that an ordering bug shows as a wrong batch."""
    cuda = torch.device("cuda")
    pixels, _ = load_pixels(prepared_file, 8, 3)
    source, _, check = map_pixels(prepared_file, 8, 3, "")
    options = dict(batch_size=6, device=cuda, seed=5, mirror=True, channels_last=True, dtype=torch.float16)
    device = PreparedLoader(pixels, **options)
    host = StreamedLoader(pixels.numpy(), **options)
    disk = StreamedLoader(source, check=check, **options)
    assert host.copies is not None and host.host_rows(np.arange(3)).is_pinned()
    # A batch of six 8x8 images copies in microseconds, so a missing wait would almost never show: each copy is
    # queued behind ~50 ms of spinning on the side stream (torch.cuda._sleep), so that the step's stream, were it
    # not to wait for the side stream, would read the batch's memory before the copy has written it
    copy = StreamedLoader._to_device

    def delayed(self, tensor):
        if tensor is not None:
            with torch.cuda.stream(self.copies):
                torch.cuda._sleep(50_000_000)  # cycles: tens of ms at the GPU's clock
        return copy(self, tensor)
    host._to_device = delayed.__get__(host)
    disk._to_device = delayed.__get__(disk)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for loader in (device, host, disk):
            loader.set_epoch(1)
        expected = list(device)
        for tier in (host, disk):
            got = [batch.clone() for batch in tier]
            stream.synchronize()
            assert len(got) == len(expected)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), tier


def test_a_damaged_chunk_found_during_a_disk_tier_run_stops_it_in_one_line(prepared16, tmp_path, capsys):
    """The disk tier finds damage only when a batch first touches it, after the run has started: the run stops
    with the chunk's name, exit 2 and no traceback, and its folder is set aside when the same --out runs again."""
    data = bytearray(prepared16.read_bytes())
    data[-1] ^= 1
    damaged = tmp_path / "damaged.fgd"
    damaged.write_bytes(bytes(data))
    argv = ["train", "--device", "cpu", "--batch-size", "6", "--ngf", "4", "--ndf", "4", "--nz", "8", "--quiet",
            "--image-size", "16", "--epochs", "1", "--data-memory", "disk", "--out", str(tmp_path / "run")]
    assert main([*argv, "--data", str(damaged)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"fastgan: error: --data {damaged} fails its checksum (altered or damaged: chunk 19 of 19); "
                       "prepare it again")
    assert main([*argv, "--data", str(prepared16)]) == 0
    assert (tmp_path / "run" / "netG.pth").is_file() and (tmp_path / "run" / "unfinished-1").is_dir()
