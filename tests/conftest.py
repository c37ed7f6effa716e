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
def backend_flags_restored():
    """cuDNN's and TF32's process-wide switches put back after every test: `fastgan train` turns
    cudnn.benchmark on, GPU tests turn TF32 off or cuDNN deterministic on, and one test's setting must not leak
    into the next test of the same worker."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    yield
    cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = saved[:4]
    torch.set_float32_matmul_precision(saved[4])


@pytest.fixture
def deterministic_cuda():
    """fp32 on the GPU that two runs can compare weight for weight: cuDNN's deterministic algorithms, no
    autotuning (which may pick other algorithms for two builds of the same shapes), no TF32. Restored after the
    test by backend_flags_restored."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


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
    is OTHER's (advice may send the user to another command by name); torchrun's and pip's own flags are not
    checked."""
    flags, current, foreign = command_flags(), command, []
    words = [w.strip("()[]{},.;:'\"`") for w in message.split()]
    for i, word in enumerate(words):
        if word == "fastgan" and i + 1 < len(words) and words[i + 1] in flags:
            current = words[i + 1]
        elif word in ("torchrun", "pip"):
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
