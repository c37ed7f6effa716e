"""fastgan.atomic: the one way fastgan writes a file (temporary beside it, flushed, renamed, folder flushed)."""
import os
import stat

import pytest

from fastgan import atomic


def test_a_write_lands_whole_with_plain_permissions_and_nothing_beside_it(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with atomic.atomic_write(target, "w") as f:
        f.write("{}\n")
    assert target.read_text() == "{}\n"
    assert os.listdir(target.parent) == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous")
    with pytest.raises(atomic.DiskFull, match="cannot write last.pt in .*: No space left on device"):
        with atomic.atomic_write(target) as f:
            f.write(b"half")
            raise OSError(28, "No space left on device")
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize("durable, flushes", [(True, 2), (False, 0)])
def test_durable_writes_flush_the_file_and_its_folder(tmp_path, monkeypatch, durable, flushes):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    with atomic.atomic_write(tmp_path / "a.png", durable=durable) as f:
        f.write(b"x")
    assert len(calls) == flushes  # the file's bytes, then the folder's entry (the rename)


def test_two_writers_of_one_file_never_share_a_temporary(tmp_path):
    target = tmp_path / "metrics.jsonl"
    with atomic.atomic_write(target, "w") as first, atomic.atomic_write(target, "w") as second:
        assert first.name != second.name
        first.write("a\n")
        second.write("b\n")
    # the block exits the second writer first: the first one renamed last, its content stands
    assert target.read_text() == "a\n" and os.listdir(tmp_path) == ["metrics.jsonl"]


@pytest.mark.parametrize("links", [True, False])
def test_atomic_link_makes_the_same_file_or_a_copy(tmp_path, monkeypatch, links):
    source, target = tmp_path / "epoch001.pt", tmp_path / "last.pt"
    source.write_bytes(b"weights")
    target.write_bytes(b"older")
    if not links:
        monkeypatch.setattr(os, "link", lambda a, b: (_ for _ in ()).throw(OSError("no hard links here")))
    atomic.atomic_link(source, target)
    assert target.read_bytes() == b"weights"
    assert os.path.samefile(source, target) == links
    assert sorted(os.listdir(tmp_path)) == ["epoch001.pt", "last.pt"]
