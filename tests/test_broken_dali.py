"""A DALI that is installed but does not load (its CUDA libraries missing, a driver it was not built for) counts as
absent, with the reason: `--loader dali` says so in one line, the DALI tests skip instead of erroring, and the
benches' DALI rows say why they did not run. Checked with a fake package on the path whose import fails as such
a DALI's does."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import write_images

REPO = Path(__file__).resolve().parents[1]
BROKEN = "libnvimgcodec.so.0: cannot open shared object file: No such file or directory"


@pytest.fixture
def broken_dali(tmp_path) -> dict:
    """The environment of a process whose `import nvidia.dali` raises OSError, as a DALI without its libraries."""
    fake = tmp_path / "fake"
    (fake / "nvidia" / "dali").mkdir(parents=True)
    (fake / "nvidia" / "__init__.py").write_text("")  # a regular package: found before the real one
    (fake / "nvidia" / "dali" / "__init__.py").write_text(f"raise OSError({BROKEN!r})\n")
    path = os.pathsep.join([str(fake), str(REPO), str(REPO / "bench"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep), "FASTGAN_REQUIRE_DALI": ""}


def python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)


def test_a_dali_that_does_not_load_counts_as_absent_with_its_reason(broken_dali):
    result = python("""
        from fastgan.pipeline_dali import dali_available, dali_unusable, dali_version
        import loaders
        print(dali_available(), dali_version())
        print(dali_unusable())
        print(loaders.dali_skip())
    """, broken_dali)
    assert result.returncode == 0, result.stderr
    available, reason, skip = result.stdout.splitlines()
    assert available == "False None"
    assert reason == f"OSError: {BROKEN}"
    assert skip == f"skipped: DALI does not load: OSError: {BROKEN}"


def test_loader_dali_with_a_broken_dali_says_why_in_one_line(broken_dali, tmp_path):
    write_images(tmp_path / "data" / "faces", 24)
    result = subprocess.run([sys.executable, "-m", "fastgan", "train", "--root", str(tmp_path / "data"),
                             "--loader", "dali", "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet"],
                            capture_output=True, text=True, env=broken_dali, timeout=300, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.startswith("fastgan: error: --loader dali needs NVIDIA DALI, which is installed but does "
                                    f"not load here (OSError: {BROKEN}); reinstall"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "netG.pth").exists()


def test_the_dali_tests_skip_with_the_reason_instead_of_erroring(broken_dali):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                             "tests/test_dali.py"], capture_output=True, text=True, env=broken_dali, timeout=300,
                            cwd=REPO)
    assert result.returncode == 5, result.stdout[-2000:]  # pytest's "no tests ran": the module skipped whole
    assert "1 skipped in" in result.stdout and "error" not in result.stdout and f"NVIDIA DALI is not usable here: OSError: {BROKEN}" in result.stdout
