"""Tests for fastgan.data.synth: the procedural CelebA stand-in."""

import numpy as np
import pytest
from PIL import Image

from fastgan.data.synth import IMAGE_HEIGHT, IMAGE_WIDTH, draw_face, write_faces


def _pixels(img):
    return np.asarray(img, np.float32)


def test_size_mode_and_pure_function_of_seed_and_index():
    img = draw_face(0, 3)
    assert (IMAGE_WIDTH, IMAGE_HEIGHT) == (178, 218)
    assert img.size == (IMAGE_WIDTH, IMAGE_HEIGHT) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), np.asarray(draw_face(0, 3)))


def test_different_indices_and_seeds_give_clearly_different_images():
    base = _pixels(draw_face(0, 0))
    for other in [draw_face(0, 1), draw_face(0, 2), draw_face(1, 0)]:
        assert np.abs(base - _pixels(other)).mean() > 10


def test_face_like_layout():
    # The face centre differs from the top corners (background), and the eye line
    # holds something much darker (pupils) than the cheeks and nose below it.
    for i in range(24):
        a = _pixels(draw_face(2, i))
        centre = a[118:145, 74:104].reshape(-1, 3).mean(0)
        corners = np.concatenate([a[:20, :20], a[:20, -20:]]).reshape(-1, 3).mean(0)
        assert np.linalg.norm(centre - corners) > 12, i
        lum = a.mean(2)
        assert lum[125:140, 78:100].mean() - lum[104:118, 60:118].min() > 15, i


def test_write_faces_is_deterministic_across_runs_and_worker_counts(tmp_path):
    n = 40  # above the in-process threshold, so workers=2 really uses a pool
    calls = []
    one = write_faces(tmp_path / "one", n, seed=1, workers=1)
    two = write_faces(tmp_path / "two", n, seed=1, workers=2, progress=calls.append)
    again = write_faces(tmp_path / "one", n, seed=1, workers=2)
    assert [p.name for p in one] == [f"{i:06d}.jpg" for i in range(1, n + 1)]
    assert again == one
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes()
    assert sum(calls) == n and all(k > 0 for k in calls)
    # Temp files are renamed into place; nothing else is left behind.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [p.name for p in two]
    with Image.open(one[0]) as im:
        assert im.format == "JPEG" and im.size == (178, 218)


def test_start_offset_names_and_content(tmp_path):
    full = write_faces(tmp_path / "full", 8, seed=4, workers=1)
    part = write_faces(tmp_path / "part", 3, seed=4, workers=1, start=5)
    assert [p.name for p in part] == ["000006.jpg", "000007.jpg", "000008.jpg"]
    for a, b in zip(full[5:], part):
        assert a.read_bytes() == b.read_bytes()


def test_average_file_size_like_celeba(tmp_path):
    paths = write_faces(tmp_path, 64, seed=0, workers=2)
    mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1000
    assert 5 < mean_kb < 13


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(n=-3), dict(n=2, seed=-1), dict(n=2, seed="x"),
                                    dict(n=2, seed=1.5), dict(n=2, workers=0)])
def test_bad_arguments_raise_value_error(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_faces(tmp_path, **kwargs)
