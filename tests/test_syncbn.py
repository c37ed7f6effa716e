"""fastgan.syncbn: BatchNorm over two gloo processes' batches equals nn.BatchNorm2d over the concatenated batch in
one process (outputs, gradients, running statistics), with no host sync; and `--sync-bn` under torchrun trains
like one process with the whole batch."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from fastgan import syncbn
from fastgan.cli import main
from fastgan.models import Discriminator, Generator, init_weights
from hostsync import HostSyncError, no_host_sync

RANKS, BATCH, CHANNELS, SIZE, STEPS = 2, 4, 6, 5, 3  # BATCH images per rank; the global batch is RANKS * BATCH
MOMENTA = (0.1, None)  # nn.BatchNorm2d's exponential average, and its cumulative average


def step_data(step: int):
    """The global batch of a step, the weights of its loss, and a layout: the same in every process."""
    generator = torch.Generator().manual_seed(step)
    images = torch.randn(RANKS * BATCH, CHANNELS, SIZE, SIZE, generator=generator) * 3 + 2  # mean far from 0
    probe = torch.randn(images.shape, generator=generator)
    layout = torch.channels_last if step % 2 else torch.contiguous_format
    return images.contiguous(memory_format=layout), probe.contiguous(memory_format=layout)


def affine(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        bn.weight.copy_(1 + 0.5 * torch.randn(bn.num_features, generator=generator))
        bn.bias.copy_(torch.randn(bn.num_features, generator=generator))
    return bn


def train_steps(bn: nn.Module, rank: int, world_size: int) -> dict:
    """STEPS forward and backward passes of this rank's slice; loss = sum(output * probe), so that the ranks'
    losses add up to the one-process loss and so do their gradients."""
    rows = slice(rank * BATCH, (rank + 1) * BATCH) if world_size > 1 else slice(None)
    record = {"output": [], "grad_input": [], "grad_weight": [], "grad_bias": [], "channels_last": []}
    for step in range(STEPS):
        images, probe = step_data(step)
        x = images[rows].detach().requires_grad_()
        output = bn(x)
        (output * probe[rows]).sum().backward()
        record["output"].append(output.detach())
        record["grad_input"].append(x.grad)
        record["grad_weight"].append(bn.weight.grad.clone())
        record["grad_bias"].append(bn.bias.grad.clone())
        record["channels_last"].append((x.is_contiguous(memory_format=torch.channels_last),
                                        output.is_contiguous(memory_format=torch.channels_last),
                                        x.grad.is_contiguous(memory_format=torch.channels_last)))
        bn.zero_grad()
    record.update({k: v.clone() for k, v in bn.state_dict().items()})
    bn.eval()  # the plain path, on the running statistics
    record["eval_output"] = bn(step_data(STEPS)[0][rows]).detach()
    return record


def rank_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        records = {}
        for momentum in MOMENTA:
            bn = syncbn.convert(affine(nn.BatchNorm2d(CHANNELS, momentum=momentum)))
            with no_host_sync():
                records[momentum] = train_steps(bn, rank, RANKS)
        torch.save(records, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Each rank's record, and the one-process reference: nn.BatchNorm2d on the whole batch."""
    import torch.multiprocessing as mp
    out = tmp_path_factory.mktemp("syncbn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_worker, args=(port, str(out)), nprocs=RANKS)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(RANKS)]
    reference = {m: train_steps(affine(nn.BatchNorm2d(CHANNELS, momentum=m)), 0, 1) for m in MOMENTA}
    return ranks, reference


# Measured on a 2-core CPU, fp32 (statistics in float32 on both sides), largest difference from nn.BatchNorm2d
# over the 3 steps: outputs 1.4e-6 (values up to 6), input gradients 2.4e-7 (up to 1.8), weight gradients 3.8e-6
# and bias gradients 1.1e-5 (sums of 100 terms, up to 40: a few ulps), running mean 2.4e-7 and variance 1.9e-6
# (up to 10). All float rounding: the statistics and sums are added in another order. atol 5e-5 is 4x the largest;
# a wrong count, a biased running variance or a missing all_reduce is off by 1e-2 or more.
TOLERANCE = dict(rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("momentum", MOMENTA)
def test_two_ranks_equal_batchnorm_over_the_concatenated_batch(two_ranks, momentum):
    ranks, reference = two_ranks[0], two_ranks[1][momentum]
    ranks = [r[momentum] for r in ranks]
    for step in range(STEPS):
        for key in ("output", "grad_input"):  # each rank holds its slice of the one-process tensor
            torch.testing.assert_close(torch.cat([r[key][step] for r in ranks]), reference[key][step],
                                       **TOLERANCE, msg=lambda m: f"{key}, step {step}: {m}")
        for key in ("grad_weight", "grad_bias"):  # local shares: DDP's average times RANKS is their sum
            torch.testing.assert_close(sum(r[key][step] for r in ranks), reference[key][step],
                                       **TOLERANCE, msg=lambda m: f"{key}, step {step}: {m}")
    torch.testing.assert_close(torch.cat([r["eval_output"] for r in ranks]), reference["eval_output"], **TOLERANCE)
    for rank in ranks:
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(rank[key], reference[key], **TOLERANCE, msg=lambda m: f"{key}: {m}")
        assert rank["num_batches_tracked"].item() == reference["num_batches_tracked"].item() == STEPS


def test_channels_last_stays_channels_last(two_ranks):
    for rank in two_ranks[0]:
        for step in range(STEPS):
            x, output, grad = rank[0.1]["channels_last"][step]
            assert output == x and grad == x, f"step {step}: input channels_last {x}, output {output}, grad {grad}"
    assert any(rank[0.1]["channels_last"][step][0] for step in range(STEPS))  # both layouts were tried


def test_the_host_sync_detector_sees_item_and_boolean_masks_in_forward_and_backward():
    """NoHostSync is what the two-rank test relies on: it must catch the usual ways to sync."""
    x = torch.randn(4, 3, requires_grad=True)
    for sync in (lambda t: t.sum().item(), lambda t: float(t.max()), lambda t: t[t > 0], lambda t: t.nonzero(),
                 lambda t: t.tolist(), lambda t: bool(t.sum() > 0)):
        with pytest.raises(HostSyncError), no_host_sync():
            sync(x.detach())

    class SyncInBackward(torch.autograd.Function):
        forward = staticmethod(lambda ctx, t: t * 2)
        backward = staticmethod(lambda ctx, g: g * g.abs().max().item())

    with pytest.raises(HostSyncError), no_host_sync():
        SyncInBackward.apply(x).sum().backward()


@pytest.mark.parametrize("network", [Generator(8, 4, 3, 16), Discriminator(4, 3, 16)], ids=["G", "D"])
def test_convert_keeps_the_state_dict_and_the_parameters_the_optimizers_hold(network):
    network.apply(init_weights)
    plain = {k: v.clone() for k, v in network.state_dict().items()}
    parameters = list(network.parameters())
    converted = syncbn.convert(network)
    assert converted is network  # replaced in place: the loop's netG/netD are the ones the step trains
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert any(isinstance(m, syncbn.SyncBatchNorm2d) for m in converted.modules())
    assert list(converted.state_dict()) == list(plain)  # pytorch/examples' keys, in its order
    for name, value in converted.state_dict().items():
        assert torch.equal(value, plain[name]), name
    assert all(a is b for a, b in zip(converted.parameters(), parameters, strict=True))


def test_one_process_is_plain_batchnorm():
    """Without a process group the module is nn.BatchNorm2d, bit for bit."""
    x = torch.randn(8, CHANNELS, SIZE, SIZE) * 3 + 2
    plain, ours = affine(nn.BatchNorm2d(CHANNELS)), syncbn.convert(affine(nn.BatchNorm2d(CHANNELS)))
    torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, plain.running_var, rtol=0, atol=0)


# ---- --sync-bn under torchrun -------------------------------------------------------------------------------

TINY = ["--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "8", "--workers", "0",
        "--quiet", "--log-every", "3", "--sample-every", "100", "--device", "cpu", "--epochs", "2"]

# Measured on a 2-core CPU after 6 steps (2 epochs of 24 images, global batch 8): the largest difference between
# the two runs' weights is 3.7e-9 (weights of order 0.02) and between running statistics 1.2e-7 (of order 1):
# float rounding, the gradient all-reduce and the statistics add in another order. 1e-6 leaves 8x over the
# largest. BatchNorm over each rank's half batch instead (the same torchrun run without --sync-bn) is off by
# 1.5e-3 in the weights and 1.3e-3 in the running statistics.
RUN_TOLERANCE = dict(rtol=1e-6, atol=1e-6)


def test_sync_bn_under_torchrun_on_the_cpu_trains_like_one_process_with_the_whole_batch(tmp_path, monkeypatch):
    from conftest import write_images
    write_images(tmp_path / "data" / "faces", 24)
    common = [*TINY, "--root", str(tmp_path / "data")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
               "-m", "fastgan", "train", *common, "--out", str(tmp_path / "ddp"), "--sync-bn"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 processes (gloo)" in done.stdout + done.stderr
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    assert main(["train", *common, "--out", str(tmp_path / "one")]) == 0
    for run in ("ddp", "one"):
        assert torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)["step"] == 6
    for net in ("netG", "netD"):
        ddp, one = (torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)[net]
                    for run in ("ddp", "one"))
        assert list(ddp) == list(one)
        for name, value in one.items():
            torch.testing.assert_close(ddp[name], value, **RUN_TOLERANCE, msg=lambda m: f"{net} {name}: {m}")


# ---- on a GPU (skipped without one) -----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_under_fp16_autocast_without_a_host_sync(tmp_path):
    """The synced function itself, in an NCCL group of one (the module would take the plain path), against
    nn.BatchNorm2d: fp16 input from an autocast convolution, channels_last, and no host sync in the
    forward and backward passes, as torch.cuda's sync debug mode sees it."""
    import torch.distributed as dist
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 16, 3).to(device, memory_format=torch.channels_last)
        images = torch.randn(32, 3, 18, 18, device=device).contiguous(memory_format=torch.channels_last) * 3 + 1
        probe = torch.randn(32, 16, 16, 16, device=device)
        plain = affine(nn.BatchNorm2d(16).to(device))
        ours = affine(syncbn.SyncBatchNorm2d(16).to(device))

        def ours_forward(h):
            return syncbn.SyncBatchNormFunction.apply(h, ours.weight, ours.bias, ours.running_mean,
                                                      ours.running_var, ours.eps, ours.momentum, None, 1)

        def pass_of(bn_forward, bn):
            conv.zero_grad(set_to_none=True)
            bn.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16):
                h = conv(images)
                h.retain_grad()
                output = bn_forward(h)
            (output.float() * probe).sum().backward()
            return output, h

        pass_of(ours_forward, ours)  # the first collective builds the NCCL communicator (not the hot path)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            output, h = pass_of(ours_forward, ours)
            grads = (h.grad, ours.weight.grad.clone(), ours.bias.grad.clone())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        pass_of(plain, plain)
        expected, h_plain = pass_of(plain, plain)
        assert output.dtype == torch.float16 and output.is_contiguous(memory_format=torch.channels_last)
        # Not yet measured (written without a GPU): both sides compute in float32 and round to fp16 once, so
        # they may differ by an fp16 ulp, 2^-10 ~ 1e-3 relative; the parameter gradients are float32 sums of
        # 8192 fp16 products, added in another order
        torch.testing.assert_close(output, expected, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(grads[0], h_plain.grad, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(grads[1], plain.weight.grad, rtol=1e-3, atol=1e-2)
        torch.testing.assert_close(grads[2], plain.bias.grad, rtol=1e-3, atol=1e-2)
        # both saw the same two batches
        torch.testing.assert_close(ours.running_mean, plain.running_mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.running_var, plain.running_var, rtol=1e-4, atol=1e-4)
    finally:
        dist.destroy_process_group()

