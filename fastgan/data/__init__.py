"""The data path, from image files to training batches: the file index (files.py), the torchvision loader
(pipeline_torch.py; the DALI loader is fastgan/pipeline_dali.py), prepared data (prepared.py) and the demo faces
(synth.py, demo.py). This
module opens the run's data: the file index (or a prepared file) and the loader the run asked for, over this
rank's shard.

Every loader keeps one contract (len, set_epoch, iteration over fixed-size [-1, 1] batches, NCHW with
channels_last memory when asked, on the training device), so the training loop does not know which it has.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from rich.progress import Progress

from .. import distributed
from ..config import Config
from ..errors import FastganError
from .files import FileIndex, default_workers, index_images
from ..report import console


def index_data(cfg: Config) -> FileIndex:
    if cfg.root is None:
        from .demo import demo_faces
        root = demo_faces(cfg.demo_images, quiet=cfg.quiet)
    else:
        root = Path(cfg.root).expanduser()
    # no bar without a terminal: rich would leave a blank line behind
    with Progress(console=console, transient=True, disable=cfg.quiet or not console.is_interactive) as bar:
        task = bar.add_task("checking images", total=None)
        index = index_images(root, cfg.workers, progress=lambda done, total: bar.update(task, completed=done,
                                                                                          total=total))
    return index


def resolve_loader(cfg: Config, device: torch.device) -> tuple[str, str]:
    """(loader, decoder): "prepared" for --data; "cache" for --loader cache, and for auto (open_data falls back
    to decoding every epoch when the cache's disk has no room); "dali" or "torch" as asked. The decoder: DALI's
    ("mixed" on the GPU, "cpu"), or "pil" for the cache without DALI on CUDA. A --dali-decoder given is DALI's
    decoder wherever the run decodes, the cache included, or a one-line refusal where DALI cannot do it."""
    if cfg.data is not None:
        if cfg.loader != "auto":
            raise FastganError(f"--loader {cfg.loader} decodes image files; --data is decoded already: "
                               "leave --loader out")
        return "prepared", ""
    if cfg.loader in ("auto", "cache"):
        return "cache", dali_decoder(cfg, device) if wants_dali(cfg, device) else "pil"
    if cfg.loader == "torch":
        return "torch", ""
    return "dali", dali_decoder(cfg, device)


def per_epoch_loader(cfg: Config, device: torch.device) -> tuple[str, str]:
    """What --loader auto decodes with every epoch where the cache has no room: DALI on CUDA when installed (or
    as --dali-decoder asks), else torch."""
    return ("dali", dali_decoder(cfg, device)) if wants_dali(cfg, device) else ("torch", "")


def wants_dali(cfg: Config, device: torch.device) -> bool:
    """Whether --loader auto or cache decodes with DALI: asked for with --dali-decoder, or on CUDA when installed."""
    from ..pipeline_dali import dali_available
    return cfg.dali_decoder != "auto" or (device.type == "cuda" and dali_available())


def dali_decoder(cfg: Config, device: torch.device) -> str:
    from ..pipeline_dali import dali_available, dali_missing
    if not dali_available():
        raise dali_missing("--loader dali" if cfg.loader == "dali" else f"--dali-decoder {cfg.dali_decoder}")
    decoder = cfg.dali_decoder if cfg.dali_decoder != "auto" else ("mixed" if device.type == "cuda" else "cpu")
    if decoder == "mixed" and device.type != "cuda":
        raise FastganError("--dali-decoder mixed decodes on the GPU and needs --device cuda")
    return decoder


def loader_threads() -> int:
    """Loader threads or worker processes for one training process: its share of this machine's cores, less one
    for the thread that launches the kernels (torchrun starts LOCAL_WORLD_SIZE processes per machine)."""
    try:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_processes = 1
    return max(1, default_workers() // local_processes - 1)


def build_loader(cfg: Config, paths, device: torch.device, dtype: torch.dtype, loader: str, decoder: str,
                 ranks: distributed.Ranks):
    """The loader the run asked for, over this rank's shard; the loop only sees the shared contract (len,
    set_epoch, iter)."""
    share = loader_threads()
    workers = share if cfg.workers is None else cfg.workers
    batch_size = distributed.per_rank_batch(cfg.batch_size, ranks.world_size)
    shard = dict(rank=ranks.rank, world_size=ranks.world_size)
    if loader == "torch":
        from .pipeline_torch import TorchLoader  # (torchvision: imported where used, so --help never needs it)
        return TorchLoader(paths, cfg.image_size, cfg.nc, batch_size, device,
                           channels_last=cfg.channels_last, workers=workers, seed=cfg.seed, **shard), \
            f"loader torch ({workers} worker{'s' if workers != 1 else ''})"
    from ..pipeline_dali import DaliLoader
    # Half-precision batches halve the hand-off, in the dtype the networks compute in (DALI has no bfloat16: its
    # float16 output is cast, the rounding autocast would have done at the first convolution). The CPU keeps
    # float32 (its fp16 kernels are slow).
    half = device.type == "cuda" and dtype != torch.float32
    threads = cfg.dali_threads or share
    dali = DaliLoader(paths, cfg.image_size, cfg.nc, batch_size, device, channels_last=cfg.channels_last,
                      seed=cfg.seed, decoder=decoder, threads=threads, hw_decoder_load=cfg.hw_decoder_load,
                      dtype=dtype if half else torch.float32, **shard)
    detail = f", hw_decoder_load {cfg.hw_decoder_load}" if decoder == "mixed" else ""
    return dali, f"loader dali (decoder {decoder}, {threads} threads{detail})"


def check_enough_images(index: FileIndex, cfg: Config) -> None:
    if len(index.good) < cfg.batch_size:
        raise FastganError(f"batch size {cfg.batch_size} is larger than the {len(index.good):,} usable images "
                           f"under {index.root}; lower --batch-size")


@dataclass
class Data:
    loader: object          # len(), set_epoch(), iteration: the contract every loader shares
    description: str        # which loader, for the run's first lines
    summary: str            # how many images, from where, how many set aside
    bad: list               # (path, reason) of the files set aside
    preview: Callable[[int], torch.Tensor]  # the first n images of the first epoch, for samples/real.png
    count: int              # images trained on: each epoch's order is a permutation of this many
    # the kind of batch source under --cuda-graphs: where the data can be gathered inside the graph (prepared
    # data in device memory), the capturable gather to ask for (PreparedLoader.in_graph); None where batches
    # come through the loader and are copied into the graph
    graph_feed: Optional[Callable[[], object]] = None


def open_data(cfg: Config, device: torch.device, dtype: torch.dtype, loader_name: str, decoder: str,
              ranks: distributed.Ranks = distributed.Ranks()) -> Data:
    """The run's images and the loader over this rank's shard: image files (torch or DALI), or a prepared file.
    `dtype`: the dtype the networks compute in (the precision's), which batches come in where a loader can."""
    if loader_name == "prepared":
        return open_prepared(cfg, device, dtype, ranks)
    index = index_data(cfg)
    if loader_name == "cache":
        cached, loader_name, decoder, index = through_cache(cfg, index, decoder, ranks, device)
        if cached is not None:
            return open_prepared(cfg, device, dtype, ranks, (cached, index))
    if loader_name == "dali":
        from ..pipeline_dali import readable_by_dali
        index = readable_by_dali(index)
    check_enough_images(index, cfg)
    loader, description = build_loader(cfg, index.good, device, dtype, loader_name, decoder, ranks)

    def preview(count: int) -> torch.Tensor:
        from .pipeline_torch import ImageFiles, epoch_permutation
        dataset = ImageFiles(index.good, cfg.image_size, cfg.nc)
        return torch.stack([dataset[int(j)] for j in epoch_permutation(len(dataset), cfg.seed, 0)[:count]])
    return Data(loader, description, index.summary(), index.bad, preview, len(index.good))


def through_cache(cfg: Config, index: FileIndex, decoder: str, ranks: distributed.Ranks,
                  device: torch.device) -> tuple[Optional[Path], str, str, FileIndex]:
    """(the cache file, "cache", decoder, the index it holds), written first where it is not there yet; or, under
    --loader auto where its disk has no room (or for --dry-run, which writes nothing, where it is not there yet),
    (None, and the loader and decoder that decode every epoch), with a line that says why. --loader cache without
    room is refused."""
    from .cache import CacheUnwritable, cache_folder, cache_paths, cached, file_bytes, room_for
    if decoder != "pil":
        from ..pipeline_dali import readable_by_dali
        index = readable_by_dali(index)  # the cache holds what DALI can decode
    check_enough_images(index, cfg)
    folder = cache_folder(cfg.cache_dir)
    path, earlier = cache_paths(folder, index, cfg.image_size, cfg.nc, decoder)
    there = path.exists() or earlier.is_file()  # an earlier fastgan's name for it: renamed by cached()
    if cfg.dry_run and not there:
        console.print(f"fastgan: the run would decode {len(index.good):,} images once into {path}; the dry run "
                      "writes nothing and tries the torch loader instead")
        return None, "torch", "", index
    if not there:
        fits, why = room_for(folder, file_bytes(index, cfg.image_size, cfg.nc))
        if not fits:
            if cfg.loader == "cache":
                raise FastganError(f"--loader cache has no room for the decoded images: {why}; choose --cache-dir, "
                                   "decode every epoch with --loader torch, or free room (fastgan cache clear)")
            loader_name, decoder = per_epoch_loader(cfg, device)
            console.print(f"fastgan: decoding every epoch ({loader_name}), not once into a cache: {why}")
            return None, loader_name, decoder, index

    # the local ranks wait at open_data's caller (local main first) and then find the file
    try:
        with Progress(console=console, transient=True, disable=cfg.quiet or not console.is_interactive) as bar:
            path = cached(index, folder, cfg.image_size, cfg.nc, decoder,
                          cfg.workers if decoder == "pil" else cfg.dali_threads,
                          lambda line: console.print(f"fastgan: {line}") if ranks.is_main else None,
                          lambda total: functools.partial(bar.advance, bar.add_task(
                              f"decoding {total:,} images once", total=total)), cfg.hw_decoder_load)
    except CacheUnwritable as e:
        if cfg.loader == "cache":
            raise FastganError(f"--loader cache cannot write its file: {e}; choose a writable --cache-dir, or "
                               "decode every epoch with --loader torch") from None
        loader_name, decoder = per_epoch_loader(cfg, device)
        if ranks.is_main:
            console.print(f"fastgan: decoding every epoch ({loader_name}), not once into a cache: {e}; a writable "
                          "--cache-dir decodes once")
        return None, loader_name, decoder, index
    return path, "cache", decoder, index


def open_prepared(cfg: Config, device: torch.device, dtype: torch.dtype, ranks: distributed.Ranks,
                  cached: Optional[tuple[Path, FileIndex]] = None) -> Data:
    """A prepared file's loader, its pixels where --data-memory says (or where they fit, under auto): --data's,
    or under --loader auto or cache the folder's cache file, `cached` (the file and the folder's index), which
    messages name as the cache's."""
    from .cache import naming as cache_naming
    from .prepared import DATA_FILE, PreparedLoader, load_pixels, read_manifest
    from .streamed import StreamedLoader, choose_tier, map_pixels
    advice = ("leave --image-size and --nc out (--data takes the file's), or prepare the data again at the model's "
              f"size: fastgan prepare --image-size {cfg.image_size} --nc {cfg.nc}")
    file, naming = (cfg.data, DATA_FILE) if cached is None else (cached[0], cache_naming(cached[0]))
    manifest, _ = read_manifest(file, naming)
    nbytes = manifest["count"] * manifest["image_size"] ** 2 * manifest["nc"]
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    tier, why = choose_tier(cfg.data_memory, nbytes, device, local_ranks)
    options = dict(batch_size=distributed.per_rank_batch(cfg.batch_size, ranks.world_size), device=device,
                   channels_last=cfg.channels_last, seed=cfg.seed, mirror=cfg.mirror, rank=ranks.rank,
                   world_size=ranks.world_size, dtype=dtype)  # batches in the dtype the networks compute in
    feed = None  # the loader's batches are copied into a CUDA graph, unless gathered inside it (below)
    if tier == "disk":
        source, manifest, check = map_pixels(file, cfg.image_size, cfg.nc, advice, naming)
        loader, where = StreamedLoader(source, check=check, **options), "disk: the file memory-mapped"
    else:
        pixels, manifest = load_pixels(file, cfg.image_size, cfg.nc, advice, naming)  # checks every chunk now
        if tier == "host" and device.type == "cuda":
            loader, where = StreamedLoader(pixels.numpy(), **options), "host memory, copied ahead"
        else:  # on the CPU host memory is device memory
            loader = PreparedLoader(pixels, **options)
            where = f"{device.type} memory" + (" (host memory on the CPU)" if tier == "host" else "")
            feed = loader.in_graph
    if cached is None:
        kind, bad = "prepared", []
        summary = f"{manifest['count']:,} prepared images in {file} (from {manifest['source_root']})"
    else:
        kind, summary, bad = "cache", cached[1].summary(), cached[1].bad
    mirrored = ", mirrored" if cfg.mirror else ""
    return Data(loader, f"loader {kind} ({where}{mirrored}; {why})", summary, bad, loader.preview, manifest["count"],
                feed)
