"""fastgan prepare and train --data: the prepared file, its checks, and its loader."""
import hashlib
import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from fastgan.cli import main
from fastgan.errors import FastganError
from fastgan.data.files import index_images
from fastgan.data.pipeline_torch import TorchLoader
import fastgan.data.prepared
from fastgan.data.prepared import MAGIC, PreparedLoader, load_pixels, read_manifest

CPU = torch.device("cpu")


@pytest.fixture
def prepared(image_folder, tmp_path):
    faces = image_folder / "faces"
    (faces / "broken.jpg").write_bytes(b"not a jpeg")
    path = tmp_path / "faces16.fgd"
    # PIL's decode, whatever the machine: "auto" would decode with DALI on a GPU, whose pixels differ from the
    # torch loader's that the tests compare with
    assert main(["prepare", "--root", str(image_folder), "--image-size", "16", "--out", str(path),
                 "--workers", "1", "--decoder", "pil"]) == 0
    return path


def test_manifest_describes_the_file(prepared, image_folder):
    manifest, offset = read_manifest(prepared)
    assert (manifest["count"], manifest["image_size"], manifest["nc"], manifest["layout"]) == (24, 16, 3, "NHWC")
    assert manifest["source_root"] == str(image_folder)
    assert [p.rsplit("/", 1)[1] for p, _ in manifest["skipped"]] == ["broken.jpg"]
    assert offset % 64 == 0 and prepared.stat().st_size == offset + 24 * 16 * 16 * 3


@pytest.mark.parametrize("channels_last", [False, True])
def test_batches_equal_the_torch_loaders(prepared, image_folder, channels_last):
    pixels, _ = load_pixels(prepared, 16, 3)
    good = index_images(image_folder).good
    for epoch in (0, 1):
        ours = PreparedLoader(pixels, 8, CPU, channels_last=channels_last, seed=4)
        theirs = TorchLoader(good, 16, 3, 8, CPU, channels_last=channels_last, seed=4)
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        batches = list(zip(ours, theirs))
        assert len(batches) == 3
        for a, b in batches:
            assert a.shape == b.shape == (8, 3, 16, 16) and a.dtype == torch.float32
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            assert a.is_contiguous(memory_format=memory_format)
            # the same pixels; x / 127.5 - 1 and (x / 255 - 0.5) / 0.5 round differently by ~1e-7
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_ranks_and_resumed_epochs_read_what_the_torch_loader_reads(prepared, image_folder):
    pixels, _ = load_pixels(prepared, 16, 3)
    good = index_images(image_folder).good
    for rank in (0, 1):
        ours = PreparedLoader(pixels, 4, CPU, seed=4, rank=rank, world_size=2)
        theirs = TorchLoader(good, 16, 3, 4, CPU, seed=4, rank=rank, world_size=2)
        ours.set_epoch(1, start=1)
        theirs.set_epoch(1, start=1)
        batches = list(zip(ours, theirs))
        assert len(batches) == 2 and len(ours) == 3
        for a, b in batches:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_mirror_flips_about_half_and_nothing_else(prepared):
    pixels, _ = load_pixels(prepared, 16, 3)
    plain = torch.cat(list(PreparedLoader(pixels, 8, CPU, seed=4)))
    mirrored = torch.cat(list(PreparedLoader(pixels, 8, CPU, seed=4, mirror=True)))
    flipped = [not torch.equal(m, p) for m, p in zip(mirrored, plain)]
    assert 4 <= sum(flipped) <= 20
    for m, p, f in zip(mirrored, plain, flipped):
        assert torch.equal(m, p.flip(2) if f else p)


def test_mirror_flips_a_different_half_each_epoch(prepared):
    """A fixed flip set would make --mirror a fixed augmentation: each image seen one way only."""
    pixels, _ = load_pixels(prepared, 16, 3)
    flipped_sets = []
    for epoch in (0, 1):
        plain, mirrored = PreparedLoader(pixels, 8, CPU, seed=4), PreparedLoader(pixels, 8, CPU, seed=4, mirror=True)
        plain.set_epoch(epoch)
        mirrored.set_epoch(epoch)
        order, _ = mirrored.epoch_plan()  # the images in the order the batches hold them
        flipped = {int(i) for i, m, p in zip(order, torch.cat(list(mirrored)), torch.cat(list(plain)))
                   if not torch.equal(m, p)}
        flipped_sets.append(flipped)
    # 24 images, each flipped with probability 1/2 per epoch: equal sets by chance have probability 2**-24
    assert flipped_sets[0] and flipped_sets[1] and flipped_sets[0] != flipped_sets[1]


def test_damaged_files_are_refused(prepared, tmp_path):
    data = prepared.read_bytes()
    truncated = tmp_path / "truncated.fgd"
    truncated.write_bytes(data[:-100])
    with pytest.raises(FastganError, match="is truncated"):
        load_pixels(truncated, 16, 3)
    tampered = tmp_path / "tampered.fgd"
    tampered.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(FastganError, match="fails its checksum"):
        load_pixels(tampered, 16, 3)
    other = tmp_path / "other.fgd"
    other.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(FastganError, match="not a fastgan prepared data file"):
        load_pixels(other, 16, 3)
    with pytest.raises(FastganError, match="holds 16x16 images with 3 channel"):
        load_pixels(prepared, 32, 3)
    assert data.startswith(MAGIC)


def test_train_from_a_prepared_file(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(prepared), "--out", str(run), "--epochs", "2", "--ngf", "4", "--ndf", "4",
                 "--nz", "8", "--batch-size", "8", "--quiet", "--mirror", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "24 prepared images in" in err and "loader prepared (cpu memory, mirrored; auto: 18.4 KB of " in err
    assert json.loads((run / "config.json").read_text())["image_size"] == 16  # taken from the file
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 6
    assert (run / "samples" / "real.png").exists()


def test_prepare_and_data_errors(prepared, image_folder, tmp_path, capsys):
    cases = [
        (["prepare", "--root", str(image_folder), "--out", str(prepared)], "already exists"),
        (["prepare", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "x.fgd")], "does not exist"),
        (["prepare", "--root", str(image_folder), "--image-size", "24", "--out", str(tmp_path / "x.fgd")],
         "power of two"),
        (["train", "--data", str(tmp_path / "missing.fgd")], "does not exist"),
        (["train", "--data", str(prepared), "--root", str(image_folder)], "not both"),
        (["train", "--root", str(image_folder), "--mirror"], "--mirror works with --data"),
        (["train", "--data", str(prepared), "--loader", "dali"], "--data is decoded already"),
        (["train", "--data", str(prepared), "--batch-size", "25"], "larger than the 24 prepared images"),
    ]
    device = {"prepare": ["--decoder", "pil"], "train": ["--device", "cpu"]}
    cases = [([argv[0], *device[argv[0]], *argv[1:]], message) for argv, message in cases]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "x.fgd").exists()



def test_each_chunk_of_pixels_has_its_own_checksum_and_a_damaged_one_is_named(image_folder, tmp_path, monkeypatch):
    """With 1,000-byte chunks, 24 16x16 RGB images (18,432 bytes) make 19 checksums, the last over 432 bytes: each
    is the SHA-256 of its bytes in the file, computed here from the file itself; a flipped byte in chunk 7 is
    reported as that chunk."""
    monkeypatch.setattr(fastgan.data.prepared, "CHUNK_BYTES", 1000)
    path = tmp_path / "chunked.fgd"
    assert main(["prepare", "--root", str(image_folder), "--image-size", "16", "--out", str(path),
                 "--workers", "1", "--decoder", "pil"]) == 0
    manifest, offset = read_manifest(path)
    pixels = path.read_bytes()[offset:]
    assert manifest["version"] == 2 and manifest["chunk_bytes"] == 1000 and len(pixels) == 18432
    assert manifest["chunk_sha256"] == [hashlib.sha256(pixels[i:i + 1000]).hexdigest() for i in range(0, 18432, 1000)]
    loaded, _ = load_pixels(path, 16, 3)
    assert loaded.numpy().tobytes() == pixels
    data = bytearray(path.read_bytes())
    data[offset + 6 * 1000 + 17] ^= 1
    damaged = tmp_path / "damaged.fgd"
    damaged.write_bytes(bytes(data))
    with pytest.raises(FastganError, match="fails its checksum .*chunk 7 of 19"):
        load_pixels(damaged, 16, 3)


def write_version_1(path, pixels: bytes, count: int, size: int) -> None:
    """A file as fastgan wrote it before checksums per chunk: one SHA-256 of all the pixels."""
    manifest = {"format": "fastgan-data", "version": 1, "source_root": "/old", "count": count, "image_size": size,
                "nc": 3, "layout": "NHWC", "dtype": "uint8", "decoder": "PIL", "skipped": [],
                "sha256": hashlib.sha256(pixels).hexdigest(), "created": "2026-11-26 12:00:00"}
    header = json.dumps(manifest).encode()
    head = MAGIC + struct.pack("<Q", len(header)) + header
    path.write_bytes(head + b"\0" * (-len(head) % 64) + pixels)


def test_a_version_1_file_is_still_read_and_checked(prepared, tmp_path):
    manifest, offset = read_manifest(prepared)
    pixels = prepared.read_bytes()[offset:]
    old = tmp_path / "old.fgd"
    write_version_1(old, pixels, manifest["count"], 16)
    loaded, old_manifest = load_pixels(old, 16, 3)
    assert old_manifest["version"] == 1 and loaded.numpy().tobytes() == pixels
    data = old.read_bytes()
    old.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(FastganError, match="fails its checksum"):
        load_pixels(old, 16, 3)


def test_a_header_whose_checksums_do_not_cover_the_pixels_is_refused(prepared, tmp_path):
    data = prepared.read_bytes()
    (length,) = struct.unpack("<Q", data[len(MAGIC):len(MAGIC) + 8])
    header = json.loads(data[len(MAGIC) + 8:len(MAGIC) + 8 + length])
    header["chunk_sha256"] = []
    short = json.dumps(header).encode().ljust(length)  # the same length: the pixels stay where they were
    bad = tmp_path / "bad.fgd"
    bad.write_bytes(data[:len(MAGIC) + 8] + short + data[len(MAGIC) + 8 + length:])
    with pytest.raises(FastganError, match="damaged header"):
        load_pixels(bad, 16, 3)


def test_prepare_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """prepare writes each image as it is decoded: 1,200 images at 128 px (59 MB of pixels, 8x8 sources upscaled,
    decoded in this process) must raise the peak resident memory by far less than the pixels, which holding them
    all before writing would add whole. The bound, 24 MB, is generous for the per-image buffers."""
    from PIL import Image
    faces = tmp_path / "root" / "faces"
    faces.mkdir(parents=True)
    for i in range(1200):
        Image.new("RGB", (8, 8), (i % 256, i // 256 * 40, 99)).save(faces / f"{i:04d}.png")
    script = textwrap.dedent(f"""
        import resource
        from fastgan.data.files import index_images
        from fastgan.data.prepared import prepare
        index = index_images({str(tmp_path / "root")!r}, workers=1, use_cache=False)
        import numpy  # the decode's own one-off allocations, before the baseline
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        prepare(index, {str(tmp_path / "out.fgd")!r}, 128, 3, workers=1)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
                .stdout.split()[-1])
    pixels = 1200 * 128 * 128 * 3
    assert (tmp_path / "out.fgd").stat().st_size > pixels
    assert grown < 24 << 20, f"peak memory grew by {grown / 2**20:.0f} MB while preparing {pixels / 2**20:.0f} MB"
