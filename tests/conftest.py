import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.hookimpl(tryfirst=True)  # before the skipif markers: their "needs a CUDA GPU" must not skip quietly
def pytest_runtest_setup(item):
    """Tests marked `gpu` skip without a CUDA GPU, unless FASTGAN_REQUIRE_GPU=1 (as bench/gpu_check.py sets),
    where a missing GPU fails them: a check on a GPU machine must not pass by skipping. Skips for other
    reasons (two GPUs, DALI) stay skips; FASTGAN_REQUIRE_DALI governs DALI."""
    if item.get_closest_marker("gpu") is None or torch.cuda.is_available():
        return
    if os.environ.get("FASTGAN_REQUIRE_GPU") == "1":
        pytest.fail("FASTGAN_REQUIRE_GPU=1 but torch sees no CUDA GPU (torch.cuda.is_available() is False)",
                    pytrace=False)
    pytest.skip("needs a CUDA GPU")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Keep the file-index cache and demo faces of the tests out of the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def write_images(folder: Path, n: int, size=(40, 48), seed: int = 0, ext: str = ".jpg") -> list[Path]:
    """n small random-blob RGB images (smooth enough that JPEG keeps them recognisable)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize(size, Image.BILINEAR)
        path = folder / f"{i:04d}{ext}"
        image.save(path)
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """The tutorial layout: root/faces/*.jpg, 24 images."""
    root = tmp_path / "data"
    write_images(root / "faces", 24)
    return root
