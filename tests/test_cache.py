"""Decode once, by itself: `fastgan train --root` through the cache file (--loader auto or cache), against the
torch loader's run from the same folder, the cache's key, its lock, its room check, and `fastgan cache`."""
import dataclasses
import hashlib
import json
import os
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import fastgan.data.cache as cache
from fastgan.cli import main
from fastgan.data.files import index_images
from fastgan.data.prepared import FORMAT_VERSION, prepare
from fastgan.errors import FastganError
from conftest import write_images

TINY = ["--device", "cpu", "--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "8",
        "--quiet"]


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    write_images(root / "faces", 40)
    return root


def cache_dir(tmp_path):
    return tmp_path / "cache"


def files(tmp_path):
    return sorted(cache_dir(tmp_path).glob("*.fgd"))


def weights(run):
    return torch.load(run / "netG.pth", weights_only=True)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train(tmp_path, folder, out, *flags):
    return main(["train", "--root", str(folder), "--out", str(tmp_path / out), "--cache-dir", str(cache_dir(tmp_path)),
                 *TINY, *flags])


def test_the_cache_trains_bit_for_bit_as_the_torch_loader_and_later_runs_and_resumes_use_it(folder, tmp_path, capsys):
    """The first run decodes once into the cache (PIL: the torch loader's pixels) and trains from it; a second
    run finds it without decoding; a run stopped after an epoch and resumed through it ends where the torch
    loader's straight run ends, bit for bit (the same batches, converted as ToTensor and Normalize do)."""
    assert train(tmp_path, folder, "torch", "--epochs", "2", "--loader", "torch") == 0
    assert train(tmp_path, folder, "first", "--epochs", "2") == 0
    err = " ".join(capsys.readouterr().err.split())
    [made] = files(tmp_path)
    assert f"decoding 40 images once into {made} (30.7 KB, PIL on all cores)" in err
    assert "loader cache (cpu memory" in err
    written = made.stat().st_ino
    assert train(tmp_path, folder, "second", "--epochs", "1") == 0
    assert train(tmp_path, folder, "second", "--epochs", "2", "--resume", "auto", "--data-memory", "disk") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "decoding" not in err and err.count(f"using {made}") == 2 and "loader cache (disk" in err
    assert files(tmp_path) == [made] and made.stat().st_ino == written
    straight = weights(tmp_path / "torch")
    assert same(weights(tmp_path / "first"), straight) and same(weights(tmp_path / "second"), straight)


def test_a_cache_run_resumed_with_the_torch_loader_ends_as_the_torch_loader_s_straight_run(folder, tmp_path):
    """--data-memory host is the cache run's own option, which --loader torch does not use: the resume leaves it
    out (it is not the user's to leave out) and ends where the torch loader's uninterrupted run ends, bit for bit."""
    assert train(tmp_path, folder, "torch", "--epochs", "2", "--loader", "torch") == 0
    assert train(tmp_path, folder, "cached", "--epochs", "1", "--data-memory", "host") == 0
    assert train(tmp_path, folder, "cached", "--epochs", "2", "--resume", "auto", "--loader", "torch") == 0
    assert same(weights(tmp_path / "cached"), weights(tmp_path / "torch"))


def test_a_changed_folder_size_or_channel_count_makes_a_new_cache_file(folder, tmp_path):
    index = index_images(folder)
    key = cache.cache_key(index, 16, 3, "pil")
    assert cache.cache_key(index, 32, 3, "pil") != key and cache.cache_key(index, 16, 1, "pil") != key
    assert cache.cache_key(index, 16, 3, "mixed") != key
    first = index.good[0]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 1))  # the same bytes, a new date
    assert cache.cache_key(index_images(folder), 16, 3, "pil") != key
    write_images(folder / "more", 1, seed=9)
    grown = index_images(folder)
    assert len(grown.good) == 41 and cache.cache_key(grown, 16, 3, "pil") != key
    assert train(tmp_path, folder, "a", "--epochs", "1") == 0
    (folder / "more" / "0000.jpg").unlink()
    assert train(tmp_path, folder, "b", "--epochs", "1") == 0
    assert len(files(tmp_path)) == 2  # each state of the folder its own file; the first stays until cleared


def decodes(monkeypatch) -> list:
    """The cache files the runs decode from here on, one entry each."""
    made, real = [], cache.prepare

    def counted(index, out, *args, **kwargs):
        made.append(out)
        return real(index, out, *args, **kwargs)
    monkeypatch.setattr(cache, "prepare", counted)
    return made


def test_one_folder_however_root_spells_it_is_decoded_once_into_one_file(folder, tmp_path, monkeypatch, capsys):
    """--root data, ../data from a subfolder and the absolute path are one folder: one decode, one cache file."""
    made = decodes(monkeypatch)
    (tmp_path / "sub").mkdir()
    for i, (cwd, spelled) in enumerate([(tmp_path, "data"), (tmp_path / "sub", "../data"), (tmp_path, str(folder))]):
        monkeypatch.chdir(cwd)
        assert train(tmp_path, spelled, f"run{i}", "--epochs", "1") == 0
    assert len(made) == 1 and files(tmp_path) == made
    capsys.readouterr()
    assert main(["cache", "list", "--cache-dir", str(cache_dir(tmp_path))]) == 0
    assert capsys.readouterr().out.count(" 40 images of 16x16 from ") == 1


def key_as_typed(index, image_size, nc, decoder):
    """The cache key of fastgan before it resolved the files' paths (each as --root was typed), written out."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": FORMAT_VERSION, "root": str(Path(index.root).resolve()),
                              "image_size": image_size, "nc": nc, "decoder": decoder,
                              "bad": sorted(str(p) for p, _ in index.bad)}).encode())
    for path in index.good:
        stat = os.stat(path)
        digest.update(f"\n{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def test_a_cache_file_an_earlier_fastgan_named_is_renamed_and_used_not_decoded_again(folder, tmp_path, monkeypatch,
                                                                                     capsys):
    monkeypatch.chdir(tmp_path)
    index = index_images("data")  # --root spelled relative: the earlier key differs from the resolved one
    earlier = cache_dir(tmp_path) / f"data-16px-3c-pil-{key_as_typed(index, 16, 3, 'pil')}.fgd"
    earlier.parent.mkdir()
    prepare(dataclasses.replace(index, root=folder), earlier, 16, 3, workers=1)
    earlier.with_suffix(".lock").touch()  # as the earlier run left it
    pixels = earlier.read_bytes()
    made = decodes(monkeypatch)
    assert train(tmp_path, "data", "a", "--epochs", "1") == 0
    [renamed] = files(tmp_path)
    assert made == [] and renamed != earlier and renamed.read_bytes() == pixels
    assert sorted(p.name for p in cache_dir(tmp_path).iterdir()) == [renamed.name, renamed.with_suffix(".lock").name]
    err = " ".join(capsys.readouterr().err.split())
    assert f"renamed the cache file {earlier.name} of an earlier fastgan to {renamed.name}" in err
    assert train(tmp_path, str(folder), "b", "--epochs", "1") == 0  # and another spelling finds it
    assert made == [] and files(tmp_path) == [renamed]


def test_two_runs_at_once_decode_once_and_both_use_the_file(folder, tmp_path, monkeypatch):
    """The first writer holds the lock while it decodes (slowly here); the second waits, says whose lock it waits
    for, and then finds its file."""
    calls = []
    real = cache.prepare

    def slow_prepare(*args, **kwargs):
        calls.append(threading.current_thread().name)
        time.sleep(0.5)
        return real(*args, **kwargs)
    monkeypatch.setattr(cache, "prepare", slow_prepare)
    index, got, lines = index_images(folder), {}, []

    def run(name):
        got[name] = cache.cached(index, cache_dir(tmp_path), 16, 3, "pil", 1, lines.append,
                                 lambda total: lambda k: None)
    threads = [threading.Thread(target=run, args=(n,), name=n) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and got["a"] == got["b"] and got["a"].is_file()
    assert sorted(line.split()[0] for line in lines) == ["decoding", "using", "waiting"]
    assert f"waiting for process {os.getpid()}, which is writing the cache file {got['a'].name}" in " ".join(lines)


Usage = namedtuple("Usage", "total used free")


def test_without_room_auto_decodes_every_epoch_and_cache_is_refused_before_anything_is_written(folder, tmp_path,
                                                                                                 monkeypatch, capsys):
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: Usage(10 << 30, 10 << 30, 500 << 20))
    assert train(tmp_path, folder, "auto", "--epochs", "1") == 0
    err = " ".join(capsys.readouterr().err.split())  # the line as said, however the console wrapped it
    assert "decoding every epoch (torch), not once into a cache: it needs 30.7 KB and " in err
    assert "has 0.5 GB free (a margin of 10% or 1 GB kept)" in err and "loader torch" in err, err
    assert train(tmp_path, folder, "refused", "--epochs", "1", "--loader", "cache") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastgan: error: --loader cache has no room for the decoded images: it needs 30.7 KB")
    assert len(err.splitlines()) == 1 and not (tmp_path / "refused").exists() and files(tmp_path) == []
    monkeypatch.undo()
    assert cache.room_for(tmp_path, 1000)[0]


def test_a_dry_run_writes_no_cache(folder, tmp_path, capsys):
    assert train(tmp_path, folder, "dry", "--dry-run") == 0
    assert "the dry run writes nothing" in capsys.readouterr().err
    assert files(tmp_path) == [] and not (tmp_path / "dry").exists()


def test_cache_list_and_clear(folder, tmp_path, capsys):
    for size in ("16", "32"):
        assert main(["train", "--root", str(folder), "--out", str(tmp_path / size), "--cache-dir",
                     str(cache_dir(tmp_path)), *TINY, "--epochs", "1", "--image-size", size]) == 0
    capsys.readouterr()
    small, large = files(tmp_path)
    assert main(["cache", "list", "--cache-dir", str(cache_dir(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert f"{large.name}  0.1 MB  40 images of 32x32 from {folder} (PIL)" in out
    assert f"{small.name}  31." in out and "KB  40 images of 16x16" in out  # 30.7 KB of pixels and the header
    assert "\n2 cache files, 0.2 MB, in" in out
    assert main(["cache", "clear", "nothing.fgd", "--cache-dir", str(cache_dir(tmp_path))]) == 2
    assert "no cache file nothing.fgd in" in capsys.readouterr().err
    assert small.with_suffix(".lock").is_file() and large.with_suffix(".lock").is_file()  # each run's writing lock
    assert main(["cache", "clear", small.name, "--cache-dir", str(cache_dir(tmp_path))]) == 0
    assert files(tmp_path) == [large] and "removed 1 cache file (31." in capsys.readouterr().out
    assert not small.with_suffix(".lock").exists() and large.with_suffix(".lock").is_file()  # its lock went with it
    stranger = cache_dir(tmp_path) / "stranger.fgd"  # not a prepared file: listed with the cache's way out
    stranger.write_bytes(b"not pixels")
    assert main(["cache", "list", "--cache-dir", str(cache_dir(tmp_path))]) == 0
    assert (f"stranger.fgd  0.0 KB  unreadable: the cache file {stranger} is not a fastgan prepared data file "
            "(remove it with `fastgan cache clear stranger.fgd` and run again to decode anew)\n"
            in capsys.readouterr().out)
    with cache.writing_lock(cache_dir(tmp_path) / "busy.fgd"):  # a run writing another file
        (cache_dir(tmp_path) / ".busy.fgd.x1.tmp").write_bytes(b"half")
        assert main(["cache", "clear", "--cache-dir", str(cache_dir(tmp_path))]) == 0
    left = sorted(p.name for p in cache_dir(tmp_path).iterdir())
    assert left == [".busy.fgd.x1.tmp", "busy.lock"]  # the writer's files stay; everything else is gone
    for action in ("list", "clear"):  # a folder that is not there is said to be missing, not only empty
        assert main(["cache", action, "--cache-dir", str(tmp_path / "nowhere")]) == 0
        assert capsys.readouterr().out.endswith(f" {tmp_path / 'nowhere'}, a folder that does not exist\n")
        assert not (tmp_path / "nowhere").exists()
    assert main(["cache", "list", "--cache-dir", str(cache_dir(tmp_path))]) == 0
    # the writer is gone now (its lock free): its temporary file is a leftover, counted
    assert capsys.readouterr().out.endswith(f"in {cache_dir(tmp_path)}; and 1 leftover of killed writes, 0.0 KB "
                                            "(fastgan cache clear removes them)\n")


def test_data_memory_is_refused_with_a_loader_that_decodes_every_epoch(folder, tmp_path, capsys):
    assert train(tmp_path, folder, "x", "--loader", "torch", "--data-memory", "disk") == 2
    assert "--data-memory works with --data (a prepared file) or the cache" in capsys.readouterr().err
    with pytest.raises(FastganError, match="no cache file"):
        cache.clear(cache_dir(tmp_path), ["x.fgd"])


@pytest.mark.parametrize("tier", ["device", "disk"])  # checked at start, or when a batch first reads the chunk
@pytest.mark.parametrize("damage", ["a pixel", "the header"])
def test_a_damaged_cache_file_is_named_with_the_way_out(folder, tmp_path, capsys, tier, damage):
    assert train(tmp_path, folder, "a", "--epochs", "1") == 0
    [made] = files(tmp_path)
    data = bytearray(made.read_bytes())
    data[-1 if damage == "a pixel" else 0] ^= 1
    made.write_bytes(bytes(data))
    assert train(tmp_path, folder, "b", "--epochs", "1", "--data-memory", tier) == 2
    err = " ".join(capsys.readouterr().err.split())
    what = ("fails its checksum (altered or damaged: chunk 1 of 1); " if damage == "a pixel"
            else "is not a fastgan prepared data file (")
    assert f"the cache file {made} {what}remove it with `fastgan cache clear {made.name}` and run again to " \
        "decode anew" in err and "--data" not in err and "with fastgan prepare" not in err, err
    assert main(["cache", "clear", made.name, "--cache-dir", str(cache_dir(tmp_path))]) == 0
    assert train(tmp_path, folder, "c", "--epochs", "1") == 0 and files(tmp_path) == [made]
