"""Every cache misses when an input of its content changes, and what it then gives is what a fresh, empty cache
gives: the file index's verdicts, eval's real pixels and Inception features (from a folder and from a prepared
file), and the demo faces. (Hits, and a changed image file, are tested beside each feature: tests/test_files.py,
tests/test_eval.py.)"""
import json

import numpy as np
import pytest
import torch

import fastgan.data.demo
import fastgan.metrics.evaluate
import fastgan.data.files
import fastgan.metrics.inception
import fastgan.data.prepared
from conftest import write_images
from fastgan.metrics import evaluate
from fastgan.cli import main
from fastgan.data.files import index_images
from test_eval import StandIn


@pytest.fixture
def decodes(monkeypatch):
    """The files each decode_with_pil call decoded (eval's real side)."""
    calls = []
    real = fastgan.data.prepared.decode_with_pil
    monkeypatch.setattr(fastgan.data.prepared, "decode_with_pil",
                        lambda paths, *a: (calls.append(len(paths)), real(paths, *a))[1])
    return calls


def fresh(monkeypatch, tmp_path, name, compute):
    """`compute()` with an empty cache of its own: the reference a cache's answer must equal."""
    with monkeypatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path / f"fresh-{name}"))
        return compute()


# ---- eval's real pixels (a folder) ----------------------------------------------------------------------------

def test_eval_real_pixels_miss_on_each_input(tmp_path, monkeypatch, decodes):
    root = tmp_path / "data"
    write_images(root / "faces", 12)
    other = tmp_path / "other"
    write_images(other / "faces", 12, seed=5)
    base = dict(image_size=16, nc=3, n=8, seed=0, root=str(root), workers=1)
    first = evaluate.real_images(**base)
    assert evaluate.real_images(**base).pixels.equal(first.pixels) and decodes == [8]  # a hit decodes nothing
    changes = {"n": dict(n=10), "seed": dict(seed=1), "image_size": dict(image_size=32), "nc": dict(nc=1),
               "folder": dict(root=str(other))}
    for name, change in changes.items():
        decodes.clear()
        got = evaluate.real_images(**{**base, **change})
        assert decodes, f"{name}: the cache answered for other images"
        expected = fresh(monkeypatch, tmp_path, name, lambda: evaluate.real_images(**{**base, **change}))
        assert got.pixels.equal(expected.pixels), name
        assert got.pixels.shape != first.pixels.shape or not got.pixels.equal(first.pixels), name
    # all 12 compared: a file added or removed is another set
    whole = dict(base, n=12)
    evaluate.real_images(**whole)
    for name, edit in (("added", lambda: write_images(root / "more", 1, seed=9)),
                       ("removed", lambda: (root / "faces" / "0002.jpg").unlink())):
        edit()
        decodes.clear()
        got = evaluate.real_images(**{**whole, "n": 13})
        assert decodes, name
        assert got.pixels.equal(fresh(monkeypatch, tmp_path, name, lambda: evaluate.real_images(**{**whole, "n": 13})
                                      ).pixels), name
    # another layout of the cache (its version): not read
    decodes.clear()
    monkeypatch.setattr(fastgan.metrics.evaluate, "CACHE_VERSION", fastgan.metrics.evaluate.CACHE_VERSION + 1)
    evaluate.real_images(**base)
    assert decodes == [8]


# ---- eval's Inception features (a folder, and a prepared file) -----------------------------------------------

@pytest.fixture
def stand_in(monkeypatch):
    """The Inception network replaced by a small fixed one that counts the images it sees."""
    seen = []
    network = StandIn()
    network.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    monkeypatch.setattr(fastgan.metrics.inception, "load_inception", lambda path, device: network)
    return network, seen


def real_features(real, weights):
    return evaluate.Metrics(real, ("fid",), torch.device("cpu"), 0, str(weights)).real_features()


def test_inception_features_miss_on_other_weights_and_other_data(tmp_path, monkeypatch, stand_in):
    network, seen = stand_in
    root = tmp_path / "data"
    write_images(root / "faces", 12)
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"weights a")
    b.write_bytes(b"weights b, another file")
    real = evaluate.real_images(16, 3, 12, 0, root=str(root), workers=1)
    with torch.no_grad():
        expected = network(real.pixels.float() / 255).double().numpy()  # the features, computed directly
    seen.clear()
    assert np.allclose(real_features(real, a), expected, rtol=1e-6) and seen == [12]
    assert np.allclose(real_features(real, a), expected, rtol=1e-6) and seen == [12]  # a hit
    real_features(real, b)
    assert seen == [12, 12]  # other weights: other features (here the same stand-in, so the same values)
    # a prepared file: its own key (its checksum); the same images give the same features, another file others
    data, other = tmp_path / "d.fgd", tmp_path / "other.fgd"
    assert main(["prepare", "--root", str(root), "--image-size", "16", "--out", str(data), "--decoder", "pil",
                 "--workers", "1"]) == 0
    write_images(tmp_path / "elsewhere" / "faces", 12, seed=4)
    assert main(["prepare", "--root", str(tmp_path / "elsewhere"), "--image-size", "16", "--out", str(other),
                 "--decoder", "pil", "--workers", "1"]) == 0
    seen.clear()
    from_file = evaluate.real_images(16, 3, 12, 0, data=str(data))
    assert np.allclose(real_features(from_file, a), expected, rtol=1e-6) and seen == [12]
    real_features(evaluate.real_images(16, 3, 12, 0, data=str(data)), a)
    assert seen == [12]  # a hit
    from_other = evaluate.real_images(16, 3, 12, 0, data=str(other))
    got = real_features(from_other, a)
    assert seen == [12, 12]
    assert np.array_equal(got, fresh(monkeypatch, tmp_path, "other", lambda: real_features(
        evaluate.real_images(16, 3, 12, 0, data=str(other)), a)))
    assert not np.allclose(got, expected)


# ---- the file index --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("version", -1), ("root", "/somewhere/else")])
def test_the_file_index_is_not_read_from_a_cache_of_another_version_or_root(tmp_path, field, value):
    root = tmp_path / "data"
    write_images(root, 4)
    index_images(root, workers=1)
    cache_file = fastgan.data.files._cache_path(root)
    saved = json.loads(cache_file.read_text())
    # the same verdicts, under another version or root: a cache that is not this one's
    cache_file.write_text(json.dumps({**saved, field: value}))
    again = index_images(root, workers=1)
    assert again.checked == 4 and again.good == index_images(root, workers=1, use_cache=False).good


# ---- the demo faces --------------------------------------------------------------------------------------------

def test_the_demo_faces_are_drawn_once_per_size_and_drawing_code(tmp_path, monkeypatch):
    drawn = []
    real = fastgan.data.demo.write_faces
    monkeypatch.setattr(fastgan.data.demo, "write_faces", lambda folder, n, **kw: (drawn.append(n), real(folder, n, **kw))[1])
    first = fastgan.data.demo.demo_faces(4, quiet=True)
    assert fastgan.data.demo.demo_faces(4, quiet=True) == first and drawn == [4]  # a hit
    assert fastgan.data.demo.is_demo_folder(first)
    assert fastgan.data.demo.demo_faces(5, quiet=True) != first and drawn == [4, 5]  # another size
    (first / ".complete").unlink()  # a folder another process left unfinished
    assert fastgan.data.demo.demo_faces(4, quiet=True) == first and drawn == [4, 5, 4]
    # another drawing code (synth.py edited): another folder, drawn anew, and its faces are the new code's
    monkeypatch.setattr(fastgan.data.demo, "drawing_digest", lambda: "0123abcd")
    redrawn = fastgan.data.demo.demo_faces(4, quiet=True)
    assert redrawn != first and drawn == [4, 5, 4, 4] and fastgan.data.demo.is_demo_folder(redrawn)
    assert sorted(p.name for p in redrawn.glob("*.jpg")) == sorted(p.name for p in first.glob("*.jpg"))
