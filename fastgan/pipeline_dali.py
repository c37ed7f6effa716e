"""The DALI loader: JPEGs decoded on the GPU (nvJPEG, and the hardware JPEG decoder where the GPU has one),
resized, cropped and normalised there, and handed to torch through DLPack without a copy. With
decoder="cpu" the same pipeline runs on the CPU (device_id=None), which is what CI tests and what a user
without a GPU can choose.

It follows the loader contract of pipeline_torch.TorchLoader: fixed-size batches of [-1, 1] images, NCHW
(channels_last memory when asked), on the training device, the last incomplete batch dropped. Each epoch reads
the files in the order `epoch_permutation(n, seed, epoch)`, the torch loader's order, so both loaders see the
same images in the same order and a resumed run sees the same orders as an uninterrupted one. Under torchrun,
rank r of N reads its shard of each epoch (pipeline_torch.rank_order: the r-th slice of every global batch).
The shard is computed here and handed to the reader as its file list rather than through the reader's
shard_id/num_shards, which cut the list into contiguous blocks: interleaved slices keep each global batch
the one a single process would train on, and let a resumed epoch start at any batch.

DALI never sees a file that the file index could not decode (one corrupt file aborts a whole DALI pipeline),
nor one in a format its decoder does not read (GIF, for instance): those are set aside and reported.
"""
from __future__ import annotations

import importlib.util
from typing import Iterator, Optional, Sequence

import torch

from .errors import FastganError
from .files import FileIndex, default_workers
from .pipeline_torch import no_full_batch, rank_order

INSTALL_HINT = ('pip install "fastgan[dali]" (DALI built for CUDA 12; with a CUDA 13 driver, '
                'pip install nvidia-dali-cuda130 instead)')
# PIL's names for the formats fn.decoders.image reads (JPEG, JPEG 2000, TIFF, PNG, BMP, PNM, WebP)
DALI_FORMATS = frozenset({"JPEG", "JPEG2000", "TIFF", "PNG", "BMP", "PPM", "WEBP"})
# CelebA's aligned crops: preallocation hints for the hardware JPEG decoder's buffers
CELEBA_WIDTH, CELEBA_HEIGHT = 178, 218
DECODERS = ("cpu", "mixed")  # "mixed": DALI's name for decoding on the GPU from host-side bytes


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def dali_version() -> Optional[str]:
    if not dali_available():
        return None
    import nvidia.dali
    return nvidia.dali.__version__


def readable_by_dali(index: FileIndex) -> FileIndex:
    """The index without the files whose format DALI's decoder does not read; they join the skipped list."""
    return index.without([(path, f"{fmt} file: DALI's decoder does not read this format")
                          for path, fmt in zip(index.good, index.formats) if fmt not in DALI_FORMATS])


def build_pipeline(files: Sequence[str], image_size: int, nc: int, batch_size: int, decoder: str,
                   threads: int, device_id: Optional[int], hw_decoder_load: float, dtype: torch.dtype):
    """The DALI 2.x pipeline: read -> decode -> resize shorter side -> centre crop -> [-1, 1], HWC.

    dtype torch.uint8 skips the normalisation: 0..255 pixels, for `fastgan prepare`."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, exec_dynamic=True,
                  prefetch_queue_depth=2)
    def faces():
        jpegs, _ = fn.readers.file(files=list(files), name="reader", random_shuffle=False, pad_last_batch=False)
        decode = dict(device=decoder, output_type=types.RGB if nc == 3 else types.GRAY)
        if decoder == "mixed":
            decode.update(hw_decoder_load=hw_decoder_load, preallocate_width_hint=CELEBA_WIDTH,
                          preallocate_height_hint=CELEBA_HEIGHT)
        images = fn.decoders.image(jpegs, **decode)
        # torchvision's Resize(S) truncates the longer side (int(S * long / short)) where DALI's resize_shorter
        # rounds it; the sizes are computed here as torchvision does, so that both crop the same pixels
        shape = fn.cast(fn.peek_image_shape(jpegs), dtype=types.FLOAT)  # H, W, C after EXIF orientation
        height, width = shape[0], shape[1]
        shorter = dmath.min(height, width)
        images = fn.resize(images, resize_y=dmath.floor(height * image_size / shorter),
                           resize_x=dmath.floor(width * image_size / shorter), antialias=True, subpixel_scale=False)
        if dtype == torch.uint8:
            return fn.crop(images, crop=(image_size, image_size))
        # (x - 127.5) / 127.5 maps 0..255 onto [-1, 1], as the tutorial's Normalize(0.5, 0.5) after ToTensor
        return fn.crop_mirror_normalize(images, crop=(image_size, image_size), mean=[127.5] * nc,
                                        std=[127.5] * nc, output_layout="HWC",
                                        dtype=types.FLOAT16 if dtype == torch.float16 else types.FLOAT)

    pipe = faces()
    pipe.build()
    return pipe


def decode_all(paths: Sequence, image_size: int, nc: int, decoder: str, threads: Optional[int] = None,
               batch_size: int = 256) -> Iterator[torch.Tensor]:
    """Every file once, in order, as uint8 (B, S, S, C) CPU batches: `fastgan prepare` with DALI."""
    device_id = torch.cuda.current_device() if decoder == "mixed" else None
    pipe = build_pipeline([str(p) for p in paths], image_size, nc, batch_size, decoder,
                          threads or default_workers(), device_id, 0.65, torch.uint8)
    remaining = len(paths)
    while remaining > 0:  # the reader fills the last batch from the start again: those extras are dropped
        (images,) = pipe.run()
        if decoder == "mixed":
            images = images.as_cpu()
        batch = torch.from_dlpack(images.as_tensor())[:remaining]
        remaining -= len(batch)
        yield batch


class DaliLoader:
    """Batches of [-1, 1] images decoded by DALI, on `device`, reshuffled every epoch from `seed`."""

    name = "dali"

    def __init__(self, paths: Sequence, image_size: int, nc: int, batch_size: int, device: torch.device,
                 channels_last: bool = False, seed: int = 0, decoder: str = "cpu", threads: Optional[int] = None,
                 hw_decoder_load: float = 0.65, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32):
        if not dali_available():
            raise FastganError(f"--loader dali needs NVIDIA DALI, which is not installed: {INSTALL_HINT}")
        self.device = torch.device(device)
        if decoder not in DECODERS:
            raise FastganError(f"DALI decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        if decoder == "mixed" and self.device.type != "cuda":
            raise FastganError("the DALI GPU decoder (mixed) needs a CUDA device; use the cpu decoder here")
        if not 0 <= rank < world_size:
            raise FastganError(f"rank {rank} does not exist among {world_size} processes")
        self.steps = len(paths) // (batch_size * world_size)
        if self.steps < 1:
            raise no_full_batch(len(paths), "images", batch_size, world_size)
        self.paths = [str(p) for p in paths]
        self.image_size, self.nc, self.batch_size = image_size, nc, batch_size
        self.channels_last, self.seed, self.epoch, self.start = channels_last, seed, 0, 0
        self.decoder, self.hw_decoder_load = decoder, hw_decoder_load
        self.threads = threads or default_workers()
        self.rank, self.world_size, self.dtype = rank, world_size, dtype
        # DALI's GPU work runs on the training GPU; a CPU-only pipeline has no device at all (DALI 2.x)
        if decoder == "mixed":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch to read next, from its batch `start` on (0 unless resuming in the middle of it)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps

    def epoch_files(self) -> list[str]:
        """The files this rank reads in the epoch set by set_epoch, from its start batch on, in order."""
        order = rank_order(len(self.paths), self.seed, self.epoch, self.batch_size, self.rank, self.world_size)
        return [self.paths[i] for i in order[self.start * self.batch_size:].tolist()]

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.start >= self.steps:  # a resumed epoch that had ended already (on data that has since shrunk)
            return
        # A pipeline per epoch: its file list is that epoch's order (a CPU build measured 19 ms after the
        # first, which loads DALI's libraries; the GPU decoder's is still to be measured)
        pipe = build_pipeline(self.epoch_files(), self.image_size, self.nc, self.batch_size, self.decoder,
                              self.threads, self.device_id, self.hw_decoder_load, self.dtype)
        try:
            for _ in range(self.start, self.steps):
                (images,) = pipe.run()
                # DLPack hands torch DALI's own buffer (NHWC); exec_dynamic gives each output its own buffer,
                # so it stays valid while training uses it
                batch = torch.from_dlpack(images.as_tensor()).permute(0, 3, 1, 2)  # NCHW, channels_last memory
                if not self.channels_last:
                    batch = batch.contiguous()
                yield batch.to(self.device, non_blocking=True)  # a no-op when DALI decoded on this device
        finally:
            del pipe  # free the decoder's buffers before the next epoch builds its own
