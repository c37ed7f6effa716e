from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, torch.get_num_threads()))


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
