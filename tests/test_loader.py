"""The torch loader against the loader contract, and its values against the tutorial's torchvision transform."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import write_images
from fastgan.errors import FastganError
from fastgan.data.pipeline_torch import EpochShuffle, ImageFiles, TorchLoader, epoch_permutation, rank_order

CPU = torch.device("cpu")


def numbered_images(folder: Path, n: int, size=(40, 48)) -> list[Path]:
    """n lossless solid images; image i has red = 4 i + 3, so every value of a batch names its image."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.new("RGB", size, (4 * i + 3, 255 - 2 * i, 128)).save(path)
        paths.append(path)
    return paths


def ids(batch: torch.Tensor) -> list[int]:
    """The image numbers of a batch of numbered_images."""
    red = (batch[:, 0].mean(dim=(1, 2)) + 1) / 2 * 255
    numbers = (red - 3) / 4
    assert torch.allclose(numbers, numbers.round(), atol=1e-3)
    return numbers.round().long().tolist()


def epoch_ids(loader: TorchLoader, epoch: int) -> list[list[int]]:
    loader.set_epoch(epoch)
    return [ids(batch) for batch in loader]


@pytest.fixture
def numbered(tmp_path) -> list[Path]:
    return numbered_images(tmp_path / "numbered", 12)


# ---------------------------------------------------------------------------------------------------------
# the contract

def test_batches_shape_dtype_range_device(image_folder):
    paths = sorted(image_folder.glob("faces/*.jpg"))
    loader = TorchLoader(paths, image_size=16, nc=3, batch_size=5, device=CPU)
    assert len(loader) == 24 // 5 == 4
    batches = list(loader)
    assert len(batches) == 4
    for batch in batches:
        assert batch.shape == (5, 3, 16, 16)
        assert batch.dtype == torch.float32
        assert batch.device.type == "cpu"
        assert batch.min() >= -1 and batch.max() <= 1
        assert batch.is_contiguous()


def test_grayscale_batches(image_folder):
    paths = sorted(image_folder.glob("faces/*.jpg"))
    loader = TorchLoader(paths, image_size=8, nc=1, batch_size=6, device="cpu")
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    assert all(b.shape == (6, 1, 8, 8) and b.dtype == torch.float32 for b in batches)
    # same pixels as L conversion of the RGB file
    dataset = ImageFiles(paths, 8, 1)
    with Image.open(paths[0]) as image:
        reference = transforms.Compose([transforms.Resize(8), transforms.CenterCrop(8), transforms.ToTensor(),
                                        transforms.Normalize((0.5,), (0.5,))])(image.convert("L"))
    assert torch.equal(dataset[0], reference)


def test_channels_last(image_folder):
    paths = sorted(image_folder.glob("faces/*.jpg"))
    loader = TorchLoader(paths, image_size=16, nc=3, batch_size=4, device=CPU, channels_last=True)
    batch = next(iter(loader))
    assert batch.shape == (4, 3, 16, 16)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert not batch.is_contiguous()
    plain = next(iter(TorchLoader(paths, image_size=16, nc=3, batch_size=4, device=CPU)))
    assert torch.equal(batch, plain)  # same values, other memory layout


def test_values_reach_both_ends(tmp_path):
    folder = tmp_path / "contrast"
    folder.mkdir()
    paths = []
    for i in range(4):
        pixels = np.zeros((48, 40, 3), dtype=np.uint8)
        pixels[:, 20:] = 255
        path = folder / f"{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    batch = next(iter(TorchLoader(paths, image_size=32, nc=3, batch_size=4, device=CPU)))
    assert batch.min().item() == -1.0 and batch.max().item() == 1.0
    assert (batch[:, :, :, :10] == -1).all() and (batch[:, :, :, -10:] == 1).all()


def test_last_incomplete_batch_dropped(tmp_path):
    paths = numbered_images(tmp_path / "ten", 10)
    loader = TorchLoader(paths, image_size=8, nc=3, batch_size=4, device=CPU)
    assert len(loader) == 2
    for epoch in range(3):
        batches = epoch_ids(loader, epoch)
        assert [len(b) for b in batches] == [4, 4]
        seen = sum(batches, [])
        assert len(set(seen)) == 8 and set(seen) <= set(range(10))  # at most once each
    with pytest.raises(FastganError, match="batch size 4 is larger than the 3 images"):
        TorchLoader(paths[:3], image_size=8, nc=3, batch_size=4, device=CPU)


def test_every_image_once_per_epoch(numbered):
    loader = TorchLoader(numbered, image_size=8, nc=3, batch_size=4, device=CPU, seed=5)
    assert len(loader) == 3
    orders = []
    for epoch in range(3):
        order = sum(epoch_ids(loader, epoch), [])
        assert sorted(order) == list(range(12))
        orders.append(order)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert orders[0] != list(range(12))  # shuffled
    # the orders are epoch_permutation's: a resumed run sees what an uninterrupted one saw
    for epoch, order in enumerate(orders):
        assert order == epoch_permutation(12, 5, epoch).tolist()
    # same epoch again: same order
    assert sum(epoch_ids(loader, 1), []) == orders[1]


def test_same_seed_same_order_other_seed_other_order(numbered):
    a = TorchLoader(numbered, image_size=8, nc=3, batch_size=3, device=CPU, seed=7)
    b = TorchLoader(numbered, image_size=8, nc=3, batch_size=3, device=CPU, seed=7)
    c = TorchLoader(numbered, image_size=8, nc=3, batch_size=3, device=CPU, seed=8)
    for epoch in (0, 1):
        assert epoch_ids(a, epoch) == epoch_ids(b, epoch)
        assert epoch_ids(a, epoch) != epoch_ids(c, epoch)


def test_workers_give_the_same_batches(numbered):
    """Worker processes decode; the order and values are the main process's."""
    serial = TorchLoader(numbered, image_size=16, nc=3, batch_size=4, device=CPU, seed=3, channels_last=True)
    parallel = TorchLoader(numbered, image_size=16, nc=3, batch_size=4, device=CPU, seed=3, workers=2,
                           channels_last=True)
    assert len(parallel) == len(serial) == 3
    for epoch in (0, 1):  # persistent workers must follow set_epoch too
        serial.set_epoch(epoch)
        parallel.set_epoch(epoch)
        a, b = list(serial), list(parallel)
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            assert torch.equal(x, y)
            assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
        assert sorted(sum(map(ids, b), [])) == list(range(12))
        if epoch == 0:
            first = [ids(x) for x in b]
    assert first != [ids(x) for x in b]


# ---------------------------------------------------------------------------------------------------------
# epoch_permutation and the sampler

def test_epoch_permutation_is_pure():
    p = epoch_permutation(50, 1, 0)
    assert torch.equal(p, epoch_permutation(50, 1, 0))
    torch.manual_seed(123)  # the global RNG plays no part
    np.random.seed(123)
    assert torch.equal(p, epoch_permutation(50, 1, 0))
    assert sorted(p.tolist()) == list(range(50))
    assert not torch.equal(p, epoch_permutation(50, 1, 1))
    assert not torch.equal(p, epoch_permutation(50, 2, 0))
    assert not torch.equal(epoch_permutation(50, 0, 1), epoch_permutation(50, 1, 0))  # (seed, epoch) not summed
    assert epoch_permutation(0, 1, 0).tolist() == []
    assert epoch_permutation(1, 1, 0).tolist() == [0]


def test_epoch_shuffle_sampler():
    sampler = EpochShuffle(20, seed=4)
    assert len(sampler) == 20
    assert list(sampler) == epoch_permutation(20, 4, 0).tolist()
    sampler.set_epoch(3)
    assert list(sampler) == epoch_permutation(20, 4, 3).tolist()
    assert list(sampler) == list(sampler)


def test_rank_shards_are_disjoint_and_make_up_the_single_process_batches():
    n, per_rank, world = 50, 4, 3  # 4 global batches of 12; 2 images dropped
    for epoch in (0, 1, 2):
        single = rank_order(n, 7, epoch, per_rank * world)
        shards = [rank_order(n, 7, epoch, per_rank, r, world) for r in range(world)]
        assert all(len(s) == 16 for s in shards)
        assert not set(shards[0].tolist()) & set(shards[1].tolist()) and not set(shards[1].tolist()) & set(shards[2].tolist())
        for step in range(4):  # global batch i = the ranks' batch i, side by side
            joined = torch.cat([s[step * per_rank:(step + 1) * per_rank] for s in shards])
            assert torch.equal(joined, single[step * 12:(step + 1) * 12])
    assert not torch.equal(rank_order(n, 7, 0, 4, 1, 3), rank_order(n, 7, 1, 4, 1, 3))  # reshuffled per epoch


def test_a_resumed_epoch_starts_at_its_batch(numbered):
    loader = TorchLoader(numbered, image_size=8, nc=3, batch_size=4, device=CPU, seed=5)
    whole = epoch_ids(loader, 1)
    loader.set_epoch(1, start=2)
    assert len(loader) == 3  # an epoch's length, wherever it starts
    assert [ids(batch) for batch in loader] == whole[2:]
    loader.set_epoch(1, start=5)  # past the end (the data shrank since the checkpoint): nothing left
    assert list(loader) == []


def test_torch_loader_reads_its_rank_shard(numbered):
    shards = []
    for rank in (0, 1):
        loader = TorchLoader(numbered, image_size=8, nc=3, batch_size=3, device=CPU, seed=5, rank=rank,
                             world_size=2)
        assert len(loader) == 2
        shards.append(epoch_ids(loader, 1))
    single = TorchLoader(numbered, image_size=8, nc=3, batch_size=6, device=CPU, seed=5)
    assert [a + b for a, b in zip(*shards)] == epoch_ids(single, 1)


# ---------------------------------------------------------------------------------------------------------
# against the tutorial

def test_values_equal_the_tutorial_transform(tmp_path):
    size = 32
    paths = write_images(tmp_path / "celeba" / "img", 6, size=(40, 48), seed=11)
    tutorial = transforms.Compose([
        transforms.Resize(size),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])
    expected = torch.stack([tutorial(Image.open(p).convert("RGB")) for p in paths])
    assert expected.shape == (6, 3, size, size)

    dataset = ImageFiles(paths, size, 3)
    for i in range(6):
        assert torch.equal(dataset[i], expected[i])

    loader = TorchLoader(paths, image_size=size, nc=3, batch_size=3, device=CPU, seed=2, channels_last=True)
    order = epoch_permutation(6, 2, 0).tolist()
    got = torch.cat(list(loader))
    assert torch.equal(got, expected[order])
    # and the images are not trivially alike: the comparison above can fail
    assert not torch.equal(expected[0], expected[1])
    assert expected.min() < -0.5 and expected.max() > 0.5


def test_wide_image_is_centre_cropped(tmp_path):
    """Shorter side to image_size, then the centre: a 60x20 image with red, green, blue thirds keeps green."""
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :20] = [255, 0, 0]
    pixels[:, 20:40] = [0, 255, 0]
    pixels[:, 40:] = [0, 0, 255]
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    image = ImageFiles([path], 10, 3)[0]
    assert image.shape == (3, 10, 10)
    assert torch.allclose(image[:, 2:8, 2:8].mean(dim=(1, 2)), torch.tensor([-1.0, 1.0, -1.0]), atol=1e-6)
