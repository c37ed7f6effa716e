"""The DALI loader: JPEGs decoded on the GPU (nvJPEG, and the hardware JPEG decoder where the GPU has one),
resized, cropped and normalised there, and handed to torch through DLPack without a copy, ordered on torch's
current stream (no host wait). With decoder="cpu" the same pipeline runs on the CPU (device_id=None), which is
what CI tests and what a user without a GPU can choose; on a CUDA training device its batches are still copied
to the GPU inside the pipeline, so that the loader hands over CUDA tensors.

It follows the loader contract of pipeline_torch.TorchLoader: fixed-size batches of [-1, 1] images, NCHW
(channels_last memory when asked), on the training device, the last incomplete batch dropped. Each epoch reads
the files in the order `epoch_permutation(n, seed, epoch)`, the torch loader's order, so both loaders see the
same images in the same order and a resumed run sees the same orders as an uninterrupted one. Under torchrun,
rank r of N reads its shard of each epoch (pipeline_torch.rank_order: the r-th slice of every global batch).
The pipeline is fed file names by an external source that follows this order (EpochPlan), rather than by a
file reader over a fixed list: one pipeline serves every epoch, interleaved slices keep each global batch the
one a single process would train on, and a resumed epoch can start at any batch.

DALI never sees a file that the file index could not decode (one corrupt file aborts a whole DALI pipeline),
nor one in a format its decoder does not read (GIF, for instance): those are set aside and reported.
"""
from __future__ import annotations

import functools
import importlib
from typing import Iterator, Optional, Sequence

import torch

from .config import HW_DECODER_LOAD
from .errors import FastganError
from .data.files import FileIndex, default_workers
from .data.pipeline_torch import no_full_batch, rank_order

INSTALL_HINT = ('pip install "fastgan[dali]" (DALI built for CUDA 12; with a CUDA 13 driver, '
                'pip install nvidia-dali-cuda130 instead)')
# PIL's names for the formats fn.decoders.image reads (JPEG, JPEG 2000, TIFF, PNG, BMP, PNM, WebP)
DALI_FORMATS = frozenset({"JPEG", "JPEG2000", "TIFF", "PNG", "BMP", "PPM", "WEBP"})
# CelebA's aligned crops: preallocation hints for the hardware JPEG decoder's buffers
CELEBA_WIDTH, CELEBA_HEIGHT = 178, 218
DECODERS = ("cpu", "mixed")  # "mixed": DALI's name for decoding on the GPU from host-side bytes
HALF = (torch.float16, torch.bfloat16)  # the pipeline's float16 output serves both


NOT_INSTALLED = "not installed"


@functools.cache
def dali_unusable() -> Optional[str]:
    """Why DALI cannot be used in this process ("not installed", or the error its import raised), or None.

    DALI is imported to find out, once per process: a package that is present but does not load (its CUDA
    libraries missing, a driver it was not built for) must count as absent, not fail later inside a run."""
    try:
        importlib.import_module("nvidia.dali")
    except ModuleNotFoundError as e:
        if e.name in ("nvidia", "nvidia.dali"):
            return NOT_INSTALLED
        return f"{type(e).__name__}: {e}"
    except Exception as e:  # an OSError from a missing shared library, a RuntimeError from a CUDA mismatch, ...
        return f"{type(e).__name__}: {e}"
    return None


def dali_available() -> bool:
    return dali_unusable() is None


def dali_missing(asked: str) -> FastganError:
    """The one-line error for `asked` (a flag and its value) when DALI cannot be used here."""
    why = dali_unusable()
    if why is None or why == NOT_INSTALLED:  # None: dali_available patched out, as tests do
        return FastganError(f"{asked} needs NVIDIA DALI, which is not installed: {INSTALL_HINT}")
    return FastganError(f"{asked} needs NVIDIA DALI, which is installed but does not load here ({why.splitlines()[0]}"
                        f"); reinstall the build that matches this machine's CUDA: {INSTALL_HINT}")


def dali_version() -> Optional[str]:
    if not dali_available():
        return None
    import nvidia.dali
    return nvidia.dali.__version__


def readable_by_dali(index: FileIndex) -> FileIndex:
    """The index without the files whose format DALI's decoder does not read; they join the skipped list."""
    return index.without([(path, f"{fmt} file: DALI's decoder does not read this format")
                          for path, fmt in zip(index.good, index.formats) if fmt not in DALI_FORMATS])


def encoded(path) -> bytes:
    """A file name as fn.io.file.read takes it (a 1-D uint8 array of its UTF-8 bytes, made per batch)."""
    return str(path).encode()


def build_pipeline(source, image_size: int, nc: int, batch_size: int, decoder: str, threads: int,
                   device_id: Optional[int], hw_decoder_load: float, dtype: torch.dtype, to_gpu: bool = False):
    """The DALI 2.x pipeline: file names -> read -> decode -> resize shorter side -> centre crop -> [-1, 1], HWC.

    source: called once per batch, up to prefetch_queue_depth batches ahead of the batch run() returns; it
    gives the next batch's file names as `encoded` bytes (batch_size of them or fewer), or raises StopIteration.
    dtype torch.uint8 skips the normalisation: 0..255 pixels, for `fastgan prepare`; float16 and bfloat16 both
    leave as float16 (DALI has no bfloat16: DaliLoader casts). to_gpu: the CPU decoder's
    images are copied to GPU device_id inside the pipeline, on DALI's stream."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    def names():
        return [np.frombuffer(name, dtype=np.uint8) for name in source()]

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, exec_dynamic=True,
                  prefetch_queue_depth=2)
    def faces():
        # The file reads run on DALI's threads; Python only hands over the names (about 1 us a file)
        jpegs = fn.io.file.read(fn.external_source(source=names, batch=True, dtype=types.UINT8, ndim=1))
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
            images = fn.crop(images, crop=(image_size, image_size))
        else:
            # (x - 127.5) / 127.5 maps 0..255 onto [-1, 1], as the tutorial's Normalize(0.5, 0.5) after ToTensor
            images = fn.crop_mirror_normalize(images, crop=(image_size, image_size), mean=[127.5] * nc,
                                              std=[127.5] * nc, output_layout="HWC",
                                              dtype=types.FLOAT16 if dtype in HALF else types.FLOAT)
        return images.gpu() if to_gpu else images

    pipe = faces()
    pipe.build()
    return pipe


def decode_all(paths: Sequence, image_size: int, nc: int, decoder: str, threads: Optional[int] = None,
               batch_size: int = 256, hw_decoder_load: float = HW_DECODER_LOAD) -> Iterator[torch.Tensor]:
    """Every file once, in order, as uint8 (B, S, S, C) CPU batches: `fastgan prepare` with DALI. The last batch
    holds the remainder (fewer than batch_size when the count is not a multiple)."""
    names = [encoded(p) for p in paths]
    batches = [names[i:i + batch_size] for i in range(0, len(names), batch_size)]
    if not batches:
        return
    device_id = torch.cuda.current_device() if decoder == "mixed" else None
    pipe = build_pipeline(iter(batches).__next__, image_size, nc, batch_size, decoder, threads or default_workers(),
                          device_id, hw_decoder_load, torch.uint8)
    for _ in batches:
        (images,) = pipe.run()  # host-synchronous: each batch is copied out before the next
        if decoder == "mixed":
            images = images.as_cpu()
        yield torch.from_dlpack(images.as_tensor())


class EpochPlan:
    """The DALI pipeline's source: one rank's batches of file names, epoch after epoch, from a given batch on.

    Batch i of epoch e is rows i*B..(i+1)*B of rank_order(e), the torch loader's order; after an epoch's last
    batch comes the next epoch's first, so that DALI's prefetching runs on across the boundary (the training loop
    always asks for the epoch after the one it finished)."""

    def __init__(self, names: list[bytes], seed: int, batch_size: int, rank: int, world_size: int, epoch: int,
                 start: int):
        self.names, self.seed, self.batch_size, self.rank, self.world_size = names, seed, batch_size, rank, world_size
        self.steps = len(names) // (batch_size * world_size)
        self.epoch, self.batch = epoch, start  # the next batch to hand DALI
        self.order_epoch, self.order = None, None  # the epoch whose order is at hand, and that order

    def __call__(self) -> list[bytes]:
        if self.order_epoch != self.epoch:  # once an epoch: CelebA's 202,599 files take 5-15 ms (2-core CPU)
            self.order = rank_order(len(self.names), self.seed, self.epoch, self.batch_size, self.rank,
                                    self.world_size)
            self.order_epoch = self.epoch
        rows = self.order[self.batch * self.batch_size:(self.batch + 1) * self.batch_size].tolist()
        self.epoch, self.batch = (self.epoch, self.batch + 1) if self.batch + 1 < self.steps else (self.epoch + 1, 0)
        return [self.names[i] for i in rows]


class DaliLoader:
    """Batches of [-1, 1] images decoded by DALI, on `device`, reshuffled every epoch from `seed`.

    One pipeline serves the whole run: its source (EpochPlan) feeds it epoch after epoch, so that an epoch
    boundary costs a batch, not a pipeline build and a cold prefetch queue. A set_epoch that asks for another
    batch than the one the pipeline has coming next (a jump, or an epoch left before its end) rebuilds it."""

    name = "dali"

    def __init__(self, paths: Sequence, image_size: int, nc: int, batch_size: int, device: torch.device,
                 channels_last: bool = False, seed: int = 0, decoder: str = "cpu", threads: Optional[int] = None,
                 hw_decoder_load: float = HW_DECODER_LOAD, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32):
        if not dali_available():
            raise dali_missing("--loader dali")
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
        self.names = [encoded(p) for p in paths]
        self.image_size, self.nc, self.batch_size = image_size, nc, batch_size
        self.channels_last, self.seed, self.epoch, self.start = channels_last, seed, 0, 0
        self.decoder, self.hw_decoder_load = decoder, hw_decoder_load
        self.threads = threads or default_workers()
        self.rank, self.world_size, self.dtype = rank, world_size, dtype
        # On a CUDA training device the batches leave the pipeline on the training GPU, whichever decoder: the
        # CPU decoder's output would otherwise sit in pageable memory, whose "non_blocking" copy blocks the host.
        # A CPU-only pipeline has no device at all (DALI 2.x).
        self.on_gpu = self.device.type == "cuda"
        if self.on_gpu:
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None
        self.pipe = None
        self.coming = None  # (epoch, batch) the pipeline's next output holds

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch to read next, from its batch `start` on (0 unless resuming in the middle of it)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps

    def build(self) -> None:
        """A pipeline whose first output is batch `start` of epoch `epoch`. On the 2-core CPU a build took 25-40 ms
        after the first (1.1 s: it loads DALI's libraries), plus the wait for the old pipeline's batch in flight."""
        self.pipe = None  # the old pipeline's buffers go before the new one allocates its own
        plan = EpochPlan(self.names, self.seed, self.batch_size, self.rank, self.world_size, self.epoch, self.start)
        self.pipe = build_pipeline(plan, self.image_size, self.nc, self.batch_size, self.decoder, self.threads,
                                   self.device_id, self.hw_decoder_load, self.dtype,
                                   to_gpu=self.on_gpu and self.decoder == "cpu")
        self.coming = (self.epoch, self.start)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.start >= self.steps:  # a resumed epoch that had ended already (on data that has since shrunk)
            return
        if self.pipe is None or self.coming != (self.epoch, self.start):
            self.build()
        epoch = self.epoch
        for i in range(self.start, self.steps):
            # On CUDA, run(stream) makes the batch ready in the order of torch's current stream (DALI sets it as
            # the outputs' order: a device-side wait, where run() alone waits on the host for every batch).
            # torch.from_dlpack passes that stream to DALI's __dlpack__ again, which adds an event only if the
            # streams differ. exec_dynamic gives each output its own buffer, never recycled, so the batch stays
            # valid while training uses it and is freed when torch lets go of it. On the CPU, run() returns
            # finished host batches.
            stream = torch.cuda.current_stream(self.device) if self.on_gpu else None
            try:
                (images,) = self.pipe.run(stream)
            except BaseException:
                self.pipe = None  # its queue is in an unknown state: the next epoch builds afresh
                raise
            self.coming = (epoch, i + 1) if i + 1 < self.steps else (epoch + 1, 0)
            batch = torch.from_dlpack(images.as_tensor()).permute(0, 3, 1, 2)  # NCHW, channels_last memory
            if batch.dtype != self.dtype:  # bfloat16, from the pipeline's float16: the run's dtype, so that the
                batch = batch.to(self.dtype)  # step sees one input dtype whichever loader (one compiled version)
            yield batch if self.channels_last else batch.contiguous()
