import argparse
import functools
import os
import re
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
def private_cache(tmp_path_factory):
    """Keep the file-index cache, the demo faces and the decoded-once cache of the tests out of the user's
    ~/.cache. A patch of its own: a test's `monkeypatch.undo()` must not send its runs to ~/.cache (it did)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


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


# ---- every error's advice names flags of the command that printed it ---------------------------------------------

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*(?![\w])")


@functools.cache
def command_flags() -> dict[str, frozenset]:
    """{command: its option strings}, read off the real parser."""
    from fastgan.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: frozenset(o for a in parser._actions for o in a.option_strings) for name, parser in sub.choices.items()}


def foreign_flags(command: str, message: str) -> list[str]:
    """The --flags that `message` names as `command`'s but which it does not have. A flag after "fastgan OTHER"
    is OTHER's (advice may send the user to another command by name); torchrun's own flags are not checked."""
    flags, current, foreign = command_flags(), command, []
    words = [w.strip("()[]{},.;:'\"`") for w in message.split()]
    for i, word in enumerate(words):
        if word == "fastgan" and i + 1 < len(words) and words[i + 1] in flags:
            current = words[i + 1]
        elif word == "torchrun":
            current = None
        elif current is not None:
            foreign += [flag for flag in FLAG.findall(word) if flag not in flags[current]]
    return foreign


@pytest.fixture(autouse=True)
def error_advice_names_the_commands_own_flags(monkeypatch):
    """Every FastganError that `fastgan CMD` reports during the suite, whichever test triggers it, is checked: each
    --flag it names must be one of CMD's (or of the command it names)."""
    import fastgan.cli as cli
    report = cli.report_error

    def checked(command: str, message: str) -> None:
        report(command, message)
        foreign = foreign_flags(command, message)
        assert not foreign, f"fastgan {command} names {', '.join(foreign)}, which it does not have: {message}"
    monkeypatch.setattr(cli, "report_error", checked)
