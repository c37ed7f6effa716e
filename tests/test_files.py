"""The file index: finding images under --root, loading them upright in the model's channels, and the cached,
parallel decode check that sets bad files aside before training."""
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_images
from fastgan.data import files
from fastgan.errors import FastganError
from fastgan.data.synth import draw_face
from fastgan.data.files import FileIndex, find_images, index_images, inspect_image, load_image, write_skipped


def names(paths, root):
    return sorted(str(Path(p).relative_to(root)) for p in paths)


def jpeg_bytes(size=(40, 48), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def make_bad_files(folder: Path) -> dict[str, bytes]:
    """The four kinds of undecodable file the index must set aside, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    whole = jpeg_bytes()
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": whole[: len(whole) // 2],
        "text.jpg": b"this is not an image, just some words\n",
        "noise.png": np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes(),
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    return bad


def bump_mtime(path: Path, seconds: int = 10) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 1_000_000_000))


# ---------------------------------------------------------------------------------------------------------
# find_images

def test_find_images_tutorial_layout(image_folder):
    found = find_images(image_folder)
    assert names(found, image_folder) == [f"faces/{i:04d}.jpg" for i in range(24)]
    assert found == sorted(found)


def test_find_images_flat_and_deep(tmp_path):
    write_images(tmp_path / "flat", 3)
    assert names(find_images(tmp_path / "flat"), tmp_path / "flat") == ["0000.jpg", "0001.jpg", "0002.jpg"]
    deep = tmp_path / "deep"
    write_images(deep / "a" / "b" / "c", 2)
    write_images(deep / "a", 1, ext=".png")
    assert names(find_images(deep), deep) == ["a/0000.png", "a/b/c/0000.jpg", "a/b/c/0001.jpg"]


def test_find_images_extensions_case_insensitive_and_ignores_the_rest(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    kept = ["a.JPG", "b.Jpeg", "c.PNG", "d.jpeg", "e.bmp", "f.TIFF", "g.webp"]
    for name in kept:
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP", "tiff": "TIFF", "webp": "WEBP"}
        image.save(root / name, format=fmt[name.rsplit(".", 1)[1].lower()])
    (root / "notes.txt").write_text("hello")
    (root / "labels.csv").write_text("a,b\n")
    (root / "README").write_text("no extension")
    image.save(root / "jpg", format="JPEG")        # the extension's letters, but no extension
    image.save(root / ".hidden.jpg")               # hidden file
    image.save(root / "._b.jpg", format="JPEG")    # macOS AppleDouble sidecar
    (root / ".thumbs").mkdir()
    image.save(root / ".thumbs" / "x.jpg")         # file inside a hidden folder
    (root / "sub" / ".git").mkdir(parents=True)
    image.save(root / "sub" / ".git" / "y.png")    # hidden folder deeper down
    image.save(root / "sub" / "z.Png")
    assert names(find_images(root), root) == sorted(kept + ["sub/z.Png"])


def test_find_images_missing_root(tmp_path):
    with pytest.raises(FastganError, match="does not exist") as e:
        find_images(tmp_path / "nowhere")
    assert "nowhere" in str(e.value)
    with pytest.raises(FastganError, match="does not exist"):
        index_images(tmp_path / "nowhere")


def test_find_images_root_is_a_file(tmp_path):
    path = write_images(tmp_path, 1)[0]
    with pytest.raises(FastganError, match="not a folder") as e:
        find_images(path)
    assert str(path) in str(e.value)
    with pytest.raises(FastganError, match="not a folder"):
        index_images(path)


def test_find_images_no_images(tmp_path):
    root = tmp_path / "empty"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "notes.txt").write_text("x")
    Image.new("RGB", (8, 8)).save(root / ".hidden.png")
    with pytest.raises(FastganError, match="no image files") as e:
        find_images(root)
    assert "empty" in str(e.value)
    with pytest.raises(FastganError, match="no image files"):
        index_images(root)


# ---------------------------------------------------------------------------------------------------------
# load_image

def save_and_load(image: Image.Image, path: Path, nc: int, **save_args) -> np.ndarray:
    image.save(path, **save_args)
    loaded = load_image(path, nc)
    assert loaded.mode == ("RGB" if nc == 3 else "L")
    return np.asarray(loaded).astype(int)


def test_load_rgb_jpeg_unchanged(tmp_path):
    path = write_images(tmp_path, 1)[0]
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))
    loaded = load_image(path, 3)
    assert loaded.mode == "RGB" and loaded.size == (40, 48)
    assert np.array_equal(np.asarray(loaded), expected)
    gray = load_image(path, 1)
    assert gray.mode == "L" and gray.size == (40, 48)


def test_load_grayscale(tmp_path):
    image = Image.new("L", (10, 6), 77)
    rgb = save_and_load(image, tmp_path / "g.png", 3)
    assert rgb.shape == (6, 10, 3) and (rgb == 77).all()
    assert (save_and_load(image, tmp_path / "g.png", 1) == 77).all()


def test_load_cmyk_jpeg(tmp_path):
    image = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    path = tmp_path / "cmyk.jpg"
    image.save(path, quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    rgb = np.asarray(load_image(path, 3)).astype(int)
    assert rgb.shape == (16, 16, 3)
    assert np.abs(rgb - [0, 255, 255]).max() <= 6
    gray = np.asarray(load_image(path, 1)).astype(int)
    assert gray.shape == (16, 16) and abs(gray.mean() - 179) <= 6  # L = .299 R + .587 G + .114 B


def test_load_palette(tmp_path):
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 200, 40, 10] + [0] * 762)
    rgb = save_and_load(image, tmp_path / "p.png", 3)
    assert (rgb == [200, 40, 10]).all()


@pytest.mark.parametrize("ext", [".png", ".gif"])
def test_load_palette_with_transparency_over_white(tmp_path, ext):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0: red, made transparent; 1: blue, opaque
    for x in range(4):
        for y in range(8):
            image.putpixel((x, y), 1)
    rgb = save_and_load(image, tmp_path / f"p{ext}", 3, transparency=0)
    assert (rgb[:, :4] == [0, 0, 255]).all()
    assert (rgb[:, 4:] == 255).all()  # white, not red
    gray = save_and_load(image, tmp_path / f"p{ext}", 1, transparency=0)
    assert (gray[:, 4:] == 255).all()


def test_load_rgba_over_white(tmp_path):
    pixels = np.zeros((4, 6, 4), dtype=np.uint8)
    pixels[:, :2] = [255, 0, 0, 0]      # fully transparent red
    pixels[:, 2:4] = [255, 0, 0, 255]   # opaque red
    pixels[:, 4:] = [0, 0, 0, 128]      # half-transparent black
    image = Image.fromarray(pixels, "RGBA")
    rgb = save_and_load(image, tmp_path / "a.png", 3)
    assert (rgb[:, :2] == 255).all()
    assert (rgb[:, 2:4] == [255, 0, 0]).all()
    assert (np.abs(rgb[:, 4:] - 127) <= 1).all()
    gray = save_and_load(image, tmp_path / "a.png", 1)
    assert (gray[:, :2] == 255).all() and (np.abs(gray[:, 4:] - 127) <= 1).all()


def test_load_la_over_white(tmp_path):
    pixels = np.zeros((4, 6, 2), dtype=np.uint8)
    pixels[:, :3] = [0, 0]      # transparent black
    pixels[:, 3:] = [30, 255]   # opaque dark gray
    image = Image.fromarray(pixels, "LA")
    gray = save_and_load(image, tmp_path / "la.png", 1)
    assert (gray[:, :3] == 255).all() and (gray[:, 3:] == 30).all()
    rgb = save_and_load(image, tmp_path / "la.png", 3)
    assert (rgb[:, :3] == 255).all() and (rgb[:, 3:] == 30).all()


@pytest.mark.parametrize("mode, colour, key", [("RGB", (0, 0, 255), (255, 0, 0)), ("L", 40, 7)])
def test_load_transparency_key_over_white(tmp_path, mode, colour, key):
    """PNG's tRNS colour key on an RGB or grayscale image is transparency too."""
    image = Image.new(mode, (8, 4), key)
    for x in range(4):
        for y in range(4):
            image.putpixel((x, y), colour)
    rgb = save_and_load(image, tmp_path / "key.png", 3, transparency=key)
    expected = colour if mode == "RGB" else (colour,) * 3
    assert (rgb[:, :4] == expected).all()
    assert (rgb[:, 4:] == 255).all()


@pytest.mark.parametrize("orientation, corner", [(6, "top-right"), (8, "bottom-left"), (3, "bottom-right"),
                                                 (1, "top-left")])
def test_load_honours_exif_orientation(tmp_path, orientation, corner):
    """A 40x20 image stored sideways, with a red block in its stored top-left corner."""
    pixels = np.full((20, 40, 3), 255, dtype=np.uint8)
    pixels[:8, :8] = [255, 0, 0]
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = np.asarray(load_image(path, 3)).astype(int)
    h, w = (20, 40) if orientation in (1, 3) else (40, 20)
    assert loaded.shape == (h, w, 3)
    red = (loaded[..., 0] > 200) & (loaded[..., 1] < 80) & (loaded[..., 2] < 80)
    corners = {"top-left": red[:6, :6], "top-right": red[:6, -6:], "bottom-left": red[-6:, :6],
               "bottom-right": red[-6:, -6:]}
    for name, block in corners.items():
        assert block.all() if name == corner else not block.any(), name
    assert red.sum() < 100  # the block only, about 8x8


# ---------------------------------------------------------------------------------------------------------
# inspect_image and index_images

def reason_of(path) -> str | None:
    return inspect_image(path)[0]


def test_inspect_image_reasons_and_format(tmp_path):
    bad = make_bad_files(tmp_path)
    good = write_images(tmp_path, 1)[0]
    assert inspect_image(good) == (None, "JPEG")
    assert reason_of(tmp_path / "empty.jpg") == "empty file"
    for name in bad:
        reason = reason_of(tmp_path / name)
        assert isinstance(reason, str) and reason and "\n" not in reason and "\t" not in reason, name


def face_cut_in_its_pixels(fmt: str) -> bytes:
    """A demo face saved as `fmt`, cut at 75% of its length: past the header (JPEG's start-of-scan marker, PNG's
    first IDAT chunk), so the file opens and tells its size but its pixels end early (pytorch/examples #835)."""
    buffer = io.BytesIO()
    draw_face(0, 0).save(buffer, format=fmt)
    whole = buffer.getvalue()
    cut = len(whole) * 3 // 4
    data_starts = whole.find(b"\xff\xda") if fmt == "JPEG" else whole.find(b"IDAT") + 4
    assert 0 < data_starts < cut < whole.rfind(b"\xff\xd9" if fmt == "JPEG" else b"IEND"), "cut outside the data"
    return whole[:cut]


@pytest.mark.parametrize("fmt, name", [("JPEG", "face.jpg"), ("PNG", "face.png")])
def test_a_file_cut_inside_its_pixel_data_is_bad(tmp_path, fmt, name):
    path = tmp_path / name
    path.write_bytes(face_cut_in_its_pixels(fmt))
    with Image.open(path) as opened:  # the header alone says nothing is wrong: only a full decode can tell
        assert opened.size == (178, 218)
    reason = reason_of(path)
    assert reason is not None and "truncated" in reason.lower(), reason
    good = write_images(tmp_path, 1)
    index = index_images(tmp_path, workers=1)
    assert index.good == good and [p.name for p, _ in index.bad] == [name]


def test_index_sets_bad_files_aside(tmp_path):
    root = tmp_path / "data"
    good = write_images(root / "faces", 6)
    make_bad_files(root / "faces")
    index = index_images(root, workers=1)
    assert isinstance(index, FileIndex)
    assert index.root == root
    assert index.good == good
    assert names([p for p, _ in index.bad], root / "faces") == ["empty.jpg", "noise.png", "text.jpg",
                                                                "truncated.jpg"]
    reasons = dict((p.name, r) for p, r in index.bad)
    assert reasons["empty.jpg"] == "empty file"
    assert all(r for r in reasons.values())
    assert index.checked == 10
    summary = index.summary()
    assert "6 images" in summary and "skipped 4 of 10" in summary


def test_summary_without_bad_files(image_folder):
    index = index_images(image_folder, workers=1)
    assert index.bad == [] and len(index.good) == 24
    assert "24 images" in index.summary() and "skipped" not in index.summary()


def test_write_skipped(tmp_path):
    root = tmp_path / "data"
    write_images(root, 2)
    make_bad_files(root)
    index = index_images(root, workers=1)
    out = tmp_path / "skipped_files.txt"
    write_skipped(index.bad, out)
    lines = out.read_text().splitlines()
    assert len(lines) == 4
    rows = [line.split("\t") for line in lines]
    assert all(len(row) == 2 for row in rows)
    assert rows == [[str(p), reason] for p, reason in index.bad]
    assert {Path(p).name for p, _ in rows} == {"empty.jpg", "truncated.jpg", "text.jpg", "noise.png"}


def test_write_skipped_nothing_bad(image_folder, tmp_path):
    out = tmp_path / "skipped.txt"
    write_skipped(index_images(image_folder, workers=1).bad, out)
    assert out.read_text() == ""


def test_index_no_file_decodes(tmp_path):
    root = tmp_path / "broken"
    make_bad_files(root)
    with pytest.raises(FastganError, match="none of its 4 image files can be decoded") as e:
        index_images(root, workers=1)
    assert str(root) in str(e.value)


def test_index_progress(tmp_path):
    root = tmp_path / "data"
    write_images(root, 5)
    calls = []
    index_images(root, workers=1, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 5) and calls[-1] == (5, 5)
    calls.clear()
    index_images(root, workers=1, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 0)]  # all from the cache


def test_index_cache(tmp_path):
    root = tmp_path / "data"
    paths = write_images(root / "faces", 8)
    first = index_images(root, workers=1)
    assert first.checked == 8 and len(first.good) == 8

    # unchanged: nothing decoded, same answer
    second = index_images(root, workers=1)
    assert second.checked == 0
    assert second.good == first.good and second.bad == []

    # touched: only that file is decoded again
    bump_mtime(paths[3])
    assert index_images(root, workers=1).checked == 1
    assert index_images(root, workers=1).checked == 0

    # replaced by another good image: re-checked, still good
    paths[4].write_bytes(jpeg_bytes(seed=9))
    bump_mtime(paths[4])
    again = index_images(root, workers=1)
    assert again.checked == 1 and len(again.good) == 8

    # made bad after caching: caught because its size changed (even with the old mtime put back)
    whole = paths[5].read_bytes()
    before = paths[5].stat()
    paths[5].write_bytes(whole[: len(whole) // 2])
    os.utime(paths[5], ns=(before.st_atime_ns, before.st_mtime_ns))
    broken = index_images(root, workers=1)
    assert broken.checked == 1
    assert [p for p, _ in broken.bad] == [paths[5]]
    assert paths[5] not in broken.good and len(broken.good) == 7
    # and stays bad from the cache
    cached = index_images(root, workers=1)
    assert cached.checked == 0 and [p for p, _ in cached.bad] == [paths[5]]
    assert cached.bad[0][1] == broken.bad[0][1]

    # repaired: good again
    paths[5].write_bytes(whole)
    bump_mtime(paths[5], 20)
    repaired = index_images(root, workers=1)
    assert repaired.checked == 1 and repaired.bad == [] and len(repaired.good) == 8

    # deleted: gone from the index, nothing decoded
    paths[0].unlink()
    gone = index_images(root, workers=1)
    assert gone.checked == 0 and paths[0] not in gone.good and len(gone.good) == 7

    # added: only the new file is decoded
    write_images(root / "more", 1, seed=3)
    added = index_images(root, workers=1)
    assert added.checked == 1 and len(added.good) == 8


def test_index_cache_lives_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "data"
    write_images(root, 3)
    index_images(root, workers=1)
    assert len(list((tmp_path / "xdg" / "fastgan" / "index").glob("*.json"))) == 1
    assert index_images(root, workers=1).checked == 0


def test_index_without_cache_and_with_damaged_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "data"
    write_images(root, 3)
    assert index_images(root, workers=1, use_cache=False).checked == 3
    assert index_images(root, workers=1, use_cache=False).checked == 3
    assert not (tmp_path / "xdg" / "fastgan" / "index").exists()
    index_images(root, workers=1)
    (cache_file,) = (tmp_path / "xdg" / "fastgan" / "index").glob("*.json")
    cache_file.write_text("{not json")
    index = index_images(root, workers=1)
    assert index.checked == 3 and len(index.good) == 3
    assert index_images(root, workers=1).checked == 0  # rewritten


def test_index_caches_are_per_root(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_images(a, 2)
    write_images(b, 3)
    assert index_images(a, workers=1).checked == 2
    assert index_images(b, workers=1).checked == 3
    assert len(index_images(a, workers=1).good) == 2 and len(index_images(b, workers=1).good) == 3


def test_index_parallel(tmp_path, monkeypatch):
    root = tmp_path / "many"
    good = write_images(root / "faces", 66, size=(8, 8))
    make_bad_files(root / "faces")
    pools = []

    class CountingPool(files.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self._max_workers)

    monkeypatch.setattr(files, "ProcessPoolExecutor", CountingPool)
    calls = []
    parallel = index_images(root, workers=2, progress=lambda done, total: calls.append((done, total)))
    assert pools == [2]
    assert parallel.checked == 70 and calls[0] == (0, 70) and calls[-1] == (70, 70)
    assert parallel.good == good
    assert sorted(p.name for p, _ in parallel.bad) == ["empty.jpg", "noise.png", "text.jpg", "truncated.jpg"]
    serial = index_images(root, workers=1, use_cache=False)
    assert pools == [2]  # workers=1: no pool
    assert serial.good == parallel.good and serial.bad == parallel.bad
    # the parallel verdicts were cached
    assert index_images(root, workers=2).checked == 0
    assert len(pools) == 1


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image
    from fastgan.data.files import load_image
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)  # mid-gray in 16 bits
    assert np.asarray(load_image(path, nc=1)).max() == 128
    assert np.asarray(load_image(path, nc=3))[0, 0].tolist() == [128, 128, 128]


def test_a_symlink_loop_lists_each_image_once(tmp_path):
    import os
    from conftest import write_images
    from fastgan.data.files import find_images
    write_images(tmp_path / "root" / "faces", 2)
    os.symlink(tmp_path / "root", tmp_path / "root" / "faces" / "loop")
    assert [p.name for p in find_images(tmp_path / "root")] == ["0000.jpg", "0001.jpg"]
