"""The Inception network that FID papers use: pytorch-fid's port of TensorFlow's 2015-12-05 Inception graph,
2048-d pool3 features, so that fastgan's FID and KID compare with published numbers.

Written after mseitzer/pytorch-fid (src/pytorch_fid/inception.py, Apache-2.0, (c) Maximilian Seitzer):
torchvision's Inception3 with a 1008-way classifier and no auxiliary head, four block kinds patched where the
TensorFlow graph differs, inputs resized to 299x299 (bilinear, align_corners=False) and scaled from [0, 1] to
[-1, 1]. The state-dict keys are Inception3's, so pytorch-fid's weights file loads with strict=True.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from ..errors import FastganError

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FEATURES = 2048  # pool3: the final average pooling, the layer FID is defined on
INPUT_SIZE = (299, 299)  # pixels, what the TensorFlow graph was trained on

# torch.hub's naming convention `name-<sha256 prefix>.ext`; 8 or more hex digits as the hub's docs ask, so that a
# name such as `fid-face.pth` is not read as a hash
HASH_SUFFIX = re.compile(r"-([0-9a-f]{8,})\.")


def tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3x3 average pool leaves the zero padding out of the average (torchvision's counts it)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return [branch1x1, branch5x5, branch3x3dbl, branch_pool]


class FIDInceptionC(InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return [branch1x1, branch7x7, branch7x7dbl, branch_pool]


class FIDInceptionE_1(InceptionE):
    """Mixed_7b: TensorFlow's average pool."""

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return tf_avg_pool(x)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        branch_pool = self.branch_pool(self.pool(x))
        return [branch1x1, branch3x3, branch3x3dbl, branch_pool]


class FIDInceptionE_2(FIDInceptionE_1):
    """Mixed_7c: the TensorFlow graph max-pools here (most likely a slip in it, but the published FIDs have it)."""

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class FIDInceptionV3(Inception3):
    """forward: float images (N, 3, H, W) in [0, 1], any H and W -> (N, 2048) float32 pool3 features.

    The classifier (`fc`, 1008 classes) is never run: it stays so that the published file loads strictly."""

    def __init__(self):
        # init_weights=False: the truncated-normal init is slow and the weights are loaded over it anyway
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=INPUT_SIZE, mode="bilinear", align_corners=False)
        x = 2 * x - 1  # [0, 1] -> [-1, 1], the range the TensorFlow graph expects
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,  # 64 x 73 x 73
                      self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2,                       # 192 x 35 x 35
                      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,                  # 768 x 17 x 17
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c,                                 # 2048 x 8 x 8
                      self.avgpool):                                                               # 2048 x 1 x 1
            x = layer(x)
        return torch.flatten(x, 1)


def build_inception() -> FIDInceptionV3:
    """The architecture with PyTorch's default (random) weights: for tests and for loading weights into."""
    return FIDInceptionV3()


def load_inception(path: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu",
                   progress: bool = True) -> FIDInceptionV3:
    """The FID network with pytorch-fid's weights, in eval mode on `device`.

    path: a weights file (`--inception PATH`); without one, torch.hub's cache (downloaded there the first time,
    `progress` drawing its bar). Every failure a user can cause is one FastganError line."""
    state_dict = read_weights(Path(path).expanduser()) if path is not None else hub_weights(progress)
    model = build_inception()
    check_layout(state_dict, model.state_dict(), path or hub_checkpoint())
    model.load_state_dict(state_dict, strict=True)
    return model.eval().requires_grad_(False).to(device)


def hub_checkpoint() -> Path:
    """Where torch.hub keeps the file: $TORCH_HOME/hub/checkpoints, else $XDG_CACHE_HOME/torch/hub/checkpoints,
    else ~/.cache/torch/hub/checkpoints (torch.hub.get_dir's order)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def hub_weights(progress: bool) -> dict[str, torch.Tensor]:
    cached = hub_checkpoint()
    if cached.is_file():
        check_hash(cached)  # the hub checks only what it downloads itself; users put this file there by hand
    try:
        return torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", progress=progress,
                                                  check_hash=True, weights_only=True)
    except (URLError, OSError) as e:  # no network, a refused or timed-out connection, an HTTP error
        if cached.is_file():
            raise FastganError(f"cannot read the FID Inception weights {cached}: {e}") from None
        reason = getattr(e, "reason", None) or e
        raise FastganError(f"the FID Inception weights {FID_WEIGHTS_FILE} are not in {cached.parent} and could not "
                           f"be downloaded from {FID_WEIGHTS_URL} ({reason}): put the file in that folder, or "
                           "pass --inception PATH") from None
    except RuntimeError as e:  # torch.hub's "invalid hash value" for a download that arrived damaged
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FastganError(f"the FID Inception weights from {FID_WEIGHTS_URL} do not load: {reason}") from None


def check_hash(path: Path) -> None:
    """As torch.hub's check_hash: a name `name-<hex>.ext` promises that the file's sha256 starts with <hex>."""
    match = HASH_SUFFIX.search(path.name)
    if match is None:
        return
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha256.update(chunk)
    digest = sha256.hexdigest()
    if not digest.startswith(match.group(1)):
        raise FastganError(f"Inception weights {path} are damaged or not the file their name says: its name "
                           f"promises sha256 {match.group(1)}..., the file's is {digest[:len(match.group(1))]}...")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FastganError(f"Inception weights {path} do not exist")
    check_hash(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle, EOF or weights-only errors: all mean "not a plain weights file"
        raise FastganError(f"Inception weights {path} are not a PyTorch weights file that loads with "
                           f"weights_only=True ({type(e).__name__})") from None
    if not isinstance(state_dict, dict):
        raise FastganError(f"Inception weights {path} hold a {type(state_dict).__name__}, not a state dict")
    return state_dict


def check_layout(state_dict: dict, expected: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """The file's keys and shapes are the network's, or one line naming the first difference."""
    # files saved before PyTorch 0.4.1 have no BatchNorm step counters; BatchNorm fills them in on loading
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [k for k in expected if k in state_dict and
                   (not isinstance(state_dict[k], torch.Tensor) or state_dict[k].shape != expected[k].shape)]
    if missing or unexpected:
        raise FastganError(f"Inception weights {source} are not pytorch-fid's Inception: {len(missing)} keys "
                           f"missing (first: {missing[:1]}), {len(unexpected)} unexpected (first: "
                           f"{unexpected[:1]})")
    if wrong_shape:
        key = wrong_shape[0]
        found = tuple(state_dict[key].shape) if isinstance(state_dict[key], torch.Tensor) else \
            type(state_dict[key]).__name__
        raise FastganError(f"Inception weights {source} are not pytorch-fid's Inception: {key} is {found}, "
                           f"the network's is {tuple(expected[key].shape)} ({len(wrong_shape)} keys differ)")
