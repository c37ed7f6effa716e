"""The checkpoint file format: one file of plain tensors and Python values, written atomically (write_file) and
read with `torch.load(weights_only=True)` (read_file). What a training run puts in one is Trainer.state_dict and loop.RunState.state_dict.

Also reads the generator files of pytorch/examples `dcgan/main.py` and the tutorial (`netG_epoch_24.pth`),
including ones saved from DataParallel (`module.`) or torch.compile (`_orig_mod.`) modules, or on a GPU.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import FastganError
from .atomic import atomic_link, atomic_write

FORMAT = "fastgan-checkpoint"
VERSION = 2  # 2: the position inside the epoch, the noise generator, the data size (1 still resumes, at its epoch)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile and DDP wrappers, so saved keys carry no prefixes."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            module = module.module
        else:
            return module


def strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Remove leading `module.` / `_orig_mod.` (in any order, any number) from every key."""
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


def write_file(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename: a crash mid-write leaves the
    previous file whole."""
    with atomic_write(path) as f:
        torch.save(payload, f)


def link_or_copy(source: Path, target: Path) -> None:
    """Make `target` (atomically) the same file as `source`: a hard link, or a copy where links fail."""
    atomic_link(source, target)


def last_in(folder: Path) -> Path | None:
    """The latest checkpoint of a run folder (folder/checkpoints/last.pt), or of its checkpoints folder
    (folder/last.pt); None where there is neither."""
    return next((p for p in (folder / "checkpoints" / "last.pt", folder / "last.pt") if p.is_file()), None)


def read_file(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True onto the CPU; every failure becomes one clear FastganError that says
    what the file is: empty, not a PyTorch file, a PyTorch file cut short or damaged, or one holding objects.

    A broken PyTorch file's message says "corrupt or truncated": resume.read_checkpoint then names the newest
    readable checkpoint beside it."""
    path = Path(path).expanduser()
    if path.is_dir():
        last = last_in(path)
        raise FastganError(f"checkpoint {path} is a folder, not a checkpoint file" + (
            f"; its latest checkpoint is {last}" if last else ""))
    if not path.is_file():
        raise FastganError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    if size == 0:
        raise FastganError(f"checkpoint {path} is empty (0 bytes), not a checkpoint")
    if head.startswith(ZIP_MAGIC):  # torch.save's format since PyTorch 1.6
        if not zipfile.is_zipfile(path):  # a zip archive's index sits at its very end: gone when cut short
            raise FastganError(f"checkpoint {path} is corrupt or truncated: a PyTorch file cut short at {size:,} "
                               "bytes, its end missing (as an interrupted copy or a full disk leaves it)")
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise FastganError(f"checkpoint {path} is not a PyTorch file: it is a zip archive of other files")
    elif not head.startswith(LEGACY_MAGIC):  # torch.save's format before PyTorch 1.6
        raise FastganError(f"checkpoint {path} is not a PyTorch file: it {describe_contents(head)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise FastganError(f"checkpoint {path} holds pickled Python objects, not plain weights; "
                               "fastgan loads only weights_only=True files") from None
        raise FastganError(damaged(path, head)) from None
    except Exception:  # zip, CRC or record errors from torch's reader; EOF errors of many kinds in the old format
        raise FastganError(damaged(path, head)) from None


def damaged(path: Path, head: bytes) -> str:
    if head.startswith(ZIP_MAGIC):  # its index, at its very end, was read: nothing is cut off
        return (f"checkpoint {path} is corrupt or truncated: a PyTorch file whose contents do not read back "
                "(damaged bytes)")
    # the old format has no index to tell a cut-short file from a damaged one
    return (f"checkpoint {path} is corrupt or truncated: a PyTorch file in the format before PyTorch 1.6 that "
            "does not read back to its end (cut short or damaged)")


ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]  # (less pickle's STOP opcode)
KNOWN_FORMATS = [  # (first bytes, what the file is): files a checkpoint is mistaken for
    (b"\xff\xd8\xff", "is a JPEG image"), (b"\x89PNG", "is a PNG image"), (b"GIF8", "is a GIF image"),
    (b"\x1f\x8b", "is gzip-compressed: decompress it first"), (b"\x80", "is a Python pickle of other objects"),
    (b"\x93NUMPY", "is a NumPy array file"), (b"\x89HDF", "is an HDF5 (Keras) file"),
    (b"FASTGAN-DATA\n", "is a fastgan prepared data file (images made by fastgan prepare), for fastgan train --data"),
]  # (the last: data/prepared.py's MAGIC, written out so that reading a checkpoint imports no data module)


def describe_contents(head: bytes) -> str:
    """What a file that is no PyTorch file holds, judged by its first bytes, worded to follow "it "."""
    for magic, what in KNOWN_FORMATS:
        if head.startswith(magic):
            return what
    # (the last character may be cut in two at the 512th byte)
    text = head.decode("utf-8", errors="replace").rstrip("\ufffd")
    if "\ufffd" not in text and all(c.isprintable() or c.isspace() for c in text):
        first = text.strip().splitlines()[0] if text.strip() else ""
        return f"holds text ({first[:40]!r}{'...' if len(first) > 40 else ''})"
    return f"starts with the bytes {head[:8].hex(' ')}, which no PyTorch file does"


def is_fastgan_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def generator_state(payload: Any, path: str | os.PathLike, ema: bool = True) -> dict[str, torch.Tensor]:
    """The generator's state dict from a fastgan checkpoint or a plain (pytorch/examples) state dict.

    A checkpoint of a run with --ema holds G's moving average beside G ("netG_ema"; None or absent without
    --ema): that one, unless ema=False. A plain state dict (netG.pth, netG_ema.pth) is what it is, either way."""
    if is_fastgan_checkpoint(payload):
        payload = payload["netG_ema"] if ema and payload.get("netG_ema") is not None else payload["netG"]
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise FastganError(f"{path} is neither a fastgan checkpoint nor a generator state dict")
    return strip_prefixes(payload)


def infer_generator_shape(state_dict: dict[str, torch.Tensor], path: str | os.PathLike = "checkpoint") -> dict[str, int]:
    """nz, ngf, nc and image_size of the generator whose weights these are."""
    convs = [(int(k.split(".")[1]), v) for k, v in state_dict.items()
             if k.startswith("main.") and k.endswith(".weight") and v.dim() == 4]
    convs.sort(key=lambda kv: kv[0])
    if len(convs) < 3:
        raise FastganError(f"{path} does not hold DCGAN generator weights (found {len(convs)} convolutions)")
    first, last = convs[0][1], convs[-1][1]
    if first.shape[2:] != (4, 4) or last.shape[2:] != (4, 4):
        raise FastganError(f"{path} does not hold DCGAN generator weights (kernel sizes "
                           f"{tuple(first.shape[2:])} and {tuple(last.shape[2:])}, expected 4x4)")
    if last.shape[0] == 1:  # a discriminator's last conv is [1, ndf*8, 4, 4]; a generator's [ngf, nc, 4, 4]
        raise FastganError(f"{path} holds discriminator weights; generate needs the generator (netG)")
    # ConvTranspose2d weights are [in, out, k, k]; each of the len(convs) layers doubles the size from 2
    return {"nz": int(first.shape[0]), "ngf": int(last.shape[0]), "nc": int(last.shape[1]),
            "image_size": 2 ** (len(convs) + 1)}
