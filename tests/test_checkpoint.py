"""Loading generators saved by pytorch/examples and the tutorial, and fastgan's own checkpoint safety."""
import pytest
import torch
from PIL import Image

from fastgan import checkpoint
from fastgan.atomic import DiskFull
from fastgan.cli import main
from fastgan.errors import FastganError
from fastgan.generate import load_generator
from fastgan.models import Generator, init_weights


def examples_generator() -> Generator:
    """A full-size 64x64 generator as pytorch/examples builds it (the same keys: checked in test_models)."""
    torch.manual_seed(0)
    return Generator(nz=100, ngf=64, nc=3, image_size=64).apply(init_weights)


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_pytorch_examples_netG_loads_with_any_wrapper_prefix(tmp_path, prefix):
    netG = examples_generator()
    path = tmp_path / "netG_epoch_24.pth"
    torch.save({prefix + k: v for k, v in netG.state_dict().items()}, path)
    loaded = load_generator(path, torch.device("cpu"))
    assert (loaded.main[0].in_channels, loaded.main[-2].out_channels) == (100, 3)
    for k, v in netG.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    out = tmp_path / "faces.png"
    assert main(["generate", "--checkpoint", str(path), "--device", "cpu", "--n", "4", "--seed", "0",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * 66 + 2, 2 * 66 + 2)


@pytest.mark.parametrize("nz,ngf,nc,size", [(100, 64, 3, 64), (16, 8, 1, 32), (8, 4, 3, 128), (8, 4, 3, 16)])
def test_generator_shape_is_read_off_the_weights(nz, ngf, nc, size):
    state = Generator(nz, ngf, nc, size).state_dict()
    assert checkpoint.infer_generator_shape(state) == {"nz": nz, "ngf": ngf, "nc": nc, "image_size": size}


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.write_file(path, {"step": 1})

    def broken_save(obj, f):  # a disk that fills up half-way through the write
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(DiskFull, match="cannot write last.pt in .*: No space left on device"):  # one line
        checkpoint.write_file(path, {"step": 2})
    assert checkpoint.read_file(path) == {"step": 1}  # the previous checkpoint is whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_unwrap_strips_compile_wrappers():
    netG = Generator(8, 4, 3, 16)
    compiled = torch.compile(netG)  # wrapping only: nothing is compiled until it is called
    assert checkpoint.unwrap(compiled) is netG
    assert list(checkpoint.unwrap(compiled).state_dict())[0] == "main.0.weight"


def test_a_state_dict_that_is_not_a_generator_is_refused(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(FastganError, match="does not hold DCGAN generator weights"):
        load_generator(path, torch.device("cpu"))
    torch.save([1, 2, 3], path)
    with pytest.raises(FastganError, match="neither a fastgan checkpoint nor a generator state dict"):
        load_generator(path, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_netG_saved_on_the_gpu_loads_on_the_cpu(tmp_path):
    netG = examples_generator().cuda()
    path = tmp_path / "netG_epoch_24.pth"
    torch.save(netG.state_dict(), path)
    loaded = load_generator(path, torch.device("cpu"))
    assert next(loaded.parameters()).device.type == "cpu"
    torch.testing.assert_close(loaded.state_dict()["main.0.weight"], netG.state_dict()["main.0.weight"].cpu())


def test_kill_9_during_a_write_leaves_the_previous_checkpoint_readable(tmp_path):
    """A process killed half-way through writing a checkpoint: its torch.save writes half the bytes, says so,
    and waits to be killed."""
    import os
    import signal
    import subprocess
    import sys
    path = tmp_path / "last.pt"
    checkpoint.write_file(path, {"step": 1, "weights": torch.zeros(16)})
    writer = subprocess.Popen([sys.executable, "-c", (
        "import io, sys, time, torch\n"
        "from fastgan import checkpoint\n"
        "real_save = torch.save\n"
        "def half_then_hang(obj, f):\n"
        "    buffer = io.BytesIO(); real_save(obj, buffer); data = buffer.getvalue()\n"
        "    f.write(data[: len(data) // 2]); f.flush(); print('half', flush=True); time.sleep(600)\n"
        "torch.save = half_then_hang\n"
        "checkpoint.write_file(sys.argv[1], {'step': 2, 'weights': torch.ones(2**20)})\n"), str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "half"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    payload = checkpoint.read_file(path)
    assert payload["step"] == 1 and torch.equal(payload["weights"], torch.zeros(16))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.pt.") and leftovers[0].endswith(".tmp")  # the killed write's temporary
