"""--cuda-graphs and the prepared loader's in-graph gather: what can be shown on the CPU, and GPU tests that
compare the graphed step with the eager one through the same builder `fastgan train` uses."""
import dataclasses

import pytest
import torch

from fastgan.config import Config
from fastgan.errors import FastganError
from fastgan.graphs import GraphedStep
from fastgan.data.prepared import PreparedLoader
from fastgan.trainer import build_trainer, resolve_precision

CPU = torch.device("cpu")


def pixels(n=40, size=8, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---- the in-graph gather, on the CPU ----------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(), dict(mirror=True), dict(rank=1, world_size=2), dict(channels_last=True)])
def test_the_in_graph_feed_gathers_the_batches_iteration_gives(options):
    data = pixels()
    plain = PreparedLoader(data, 4, CPU, seed=3, **options)
    graphed = PreparedLoader(data, 4, CPU, seed=3, **options)
    feed = graphed.in_graph()
    for epoch, start in [(0, 0), (1, 0), (2, 3)]:  # epoch after epoch, then a resumed epoch mid-way
        plain.set_epoch(epoch, start)
        graphed.set_epoch(epoch, start)
        expected = list(plain)
        placeholders = list(graphed)
        assert placeholders == [None] * len(expected)  # the graph gathers: the loop only counts steps
        got = [feed() for _ in expected]
        assert len(expected) == plain.steps - start
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
            assert a.is_contiguous(memory_format=plain.memory_format)
        assert feed.position.item() == plain.steps
    # past the epoch's end (a graph's warm-up on a short epoch): wraps around instead of reading outside the order
    plain.set_epoch(2, 0)
    assert torch.equal(feed(), next(iter(plain)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_batches_are_the_float32_batches_rounded_once(dtype):
    """The loader hands the model its compute dtype directly; each value must be what autocast's cast of the
    float32 batch gives (one rounding), not a value computed in half precision (two roundings, off by an ulp)."""
    data = torch.arange(256).to(torch.uint8).reshape(16, 4, 4, 1)  # every pixel value once
    full = next(iter(PreparedLoader(data, 16, CPU, seed=0)))
    half = next(iter(PreparedLoader(data, 16, CPU, seed=0, dtype=dtype)))
    assert half.dtype == dtype
    assert torch.equal(half, full.to(dtype))
    computed_in_half = data.to(dtype).div(127.5).sub(1)  # what a naive conversion gives: differs somewhere
    assert not torch.equal(computed_in_half.permute(0, 3, 1, 2).sort().values.unique(),
                           full.to(dtype).sort().values.unique())


def test_the_run_feeds_prepared_batches_in_the_precisions_dtype(tmp_path, monkeypatch):
    """data.open_data builds the prepared loader with the precision's dtype (bf16 on the CPU under --amp)."""
    from fastgan import data as run_data
    seen = {}
    real_init = PreparedLoader.__init__

    def spy(self, *args, **kwargs):
        seen["dtype"] = kwargs.get("dtype")
        real_init(self, *args, **kwargs)
    monkeypatch.setattr(PreparedLoader, "__init__", spy)
    from fastgan.data.prepared import prepare
    from fastgan.data.files import index_images
    from conftest import write_images
    write_images(tmp_path / "imgs", 8)
    data_file = prepare(index_images(tmp_path / "imgs", 0), tmp_path / "d.fgd", 16, 3, workers=0)
    cfg = Config(data=str(data_file), image_size=16, batch_size=4, amp="bf16", device="cpu")
    precision = resolve_precision(cfg.amp, CPU)
    run_data.open_data(cfg, CPU, precision.dtype, "prepared", "")
    assert seen["dtype"] == torch.bfloat16


def test_graphed_step_refuses_what_it_cannot_capture():
    weight = torch.zeros(1, requires_grad=True)
    plain_adam = torch.optim.Adam([weight], fused=False)
    with pytest.raises(FastganError, match="needs fused Adam"):
        GraphedStep(lambda real, noise: None, lambda: (None, None), (), (plain_adam,),
                    torch.amp.GradScaler("cpu", enabled=True))
    not_capturable = torch.optim.Adam([weight], fused=True, capturable=False)
    with pytest.raises(FastganError, match="capturable"):
        GraphedStep(lambda real, noise: None, lambda: (None, None), (), (not_capturable,),
                    torch.amp.GradScaler("cpu", enabled=False))


# ---- on a GPU ----------------------------------------------------------------------------------------------------

def train_some(cfg: Config, data: torch.Tensor, epochs: int, in_graph_loader: bool):
    """(stats per step, trainer) after `epochs` epochs of prepared data, built as `fastgan train` builds it."""
    device = torch.device(cfg.device)
    precision = resolve_precision(cfg.amp, device, cfg.cuda_graphs)
    loader = PreparedLoader(data, cfg.batch_size, device, channels_last=cfg.channels_last, seed=cfg.seed,
                            mirror=True, dtype=precision.dtype)
    # without the in-graph gather the graph takes each batch through its static input, as torch/DALI batches go
    trainer = build_trainer(cfg, device, precision, graph_feed=loader.in_graph if in_graph_loader else None)
    stats = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        stats += [trainer(batch).clone() for batch in loader]
    return torch.stack(stats).cpu(), trainer


def weights(module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in module.parameters()])


def adam_steps(trainer) -> set:
    return {float(s["step"]) for opt in (trainer.optimizerG, trainer.optimizerD) for s in opt.state.values()}


def assert_the_same_steps(eager, graphed, steps: int, amp: str) -> None:
    """Both runs took the same steps: Adam's step counts, and D's BatchNorm batch count, three a step (D sees the
    real batch, the detached fake batch, and the fake batch again in G's update, all in training mode)."""
    assert adam_steps(graphed) == adam_steps(eager)
    if amp != "fp16":
        assert adam_steps(eager) == {float(steps)}
    else:  # fused Adam does not count a step whose gradients overflowed (the GradScaler skipped it)
        assert len(adam_steps(eager)) == 1 and 0 < adam_steps(eager).pop() <= steps
    for trainer in (eager, graphed):
        counts = {int(m.num_batches_tracked) for m in trainer.netD.modules() if isinstance(m, torch.nn.BatchNorm2d)}
        assert counts == {3 * steps}


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_what_the_gpu_comparison_counts_holds_for_two_eager_runs_on_the_cpu(amp):
    """The GPU test below compares counts that only a GPU run fills in; here the same check runs on two eager CPU
    runs of 12 steps, so a wrong expectation in it (D's batch count, fp16's skipped steps) fails on the CPU too."""
    cfg = Config(image_size=16, ngf=8, ndf=8, nz=16, batch_size=8, amp=amp, channels_last=True, device="cpu")
    data = pixels(n=48, size=16)
    _, first = train_some(cfg, data, 2, in_graph_loader=False)
    _, second = train_some(cfg, data, 2, in_graph_loader=True)
    assert_the_same_steps(first, second, 12, amp)
    if amp == "fp16":  # the tiny model overflows at the GradScaler's first scale: a step is skipped
        assert max(adam_steps(first)) < 12


class FakeFeed:
    """A graph feed as PreparedLoader.in_graph gives one: a device-side position and a capturable gather."""

    def __init__(self):
        self.position = torch.zeros((), dtype=torch.int64)

    def __call__(self):
        return torch.zeros(8, 3, 16, 16)


@pytest.mark.parametrize("ema", [False, True])
def test_the_step_is_assembled_once_for_each_kind_of_batch_source(monkeypatch, ema):
    """Which step build_trainer assembles, checked on the CPU with the graph faked (a CUDA graph needs a GPU
    only when captured): eager without --cuda-graphs (the feed never asked for, so the loader keeps yielding
    batches); under --cuda-graphs the data's in-graph gather where there is one, captured with the step and its
    position put back after the warm-up with the EMA's state; else each batch copied into the graph."""
    import fastgan.graphs
    made = []

    class Recorded:
        def __init__(self, step, inputs, **parts):
            made.append({"inputs": inputs, **parts})
    monkeypatch.setattr(fastgan.graphs, "GraphedStep", Recorded)
    cpu = torch.device("cpu")
    cfg = Config(image_size=16, ngf=4, ndf=4, nz=8, batch_size=8, device="cpu", ema_kimg=0.05 if ema else None)
    asked = []

    def graph_feed():
        asked.append(FakeFeed())
        return asked[-1]
    eager = build_trainer(cfg, cpu, resolve_precision("off", cpu), graph_feed=graph_feed)
    assert eager.description == "eager" and not asked and not made
    graphed = dataclasses.replace(cfg, cuda_graphs=True)
    inside = build_trainer(graphed, cpu, resolve_precision("off", cpu, True), graph_feed=graph_feed)
    assert inside.description == "one CUDA graph per step, the batch gathered inside it" and len(asked) == 1
    state = made[-1]["state"]
    assert state[0] is asked[0].position
    assert len(state) == 1 + (len(inside.ema.tensors()) if ema else 0)
    copied = build_trainer(graphed, cpu, resolve_precision("off", cpu, True))
    assert copied.description == "one CUDA graph per step, each batch copied into it" and len(asked) == 1
    assert len(made[-1]["state"]) == (len(copied.ema.tensors()) if ema else 0)
    assert made[-1]["generators"] == [copied.noise_generator]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
@pytest.mark.parametrize("in_graph", [True, False])
def test_cuda_graph_training_equals_eager_training(amp, in_graph, deterministic_cuda):
    cfg = Config(image_size=16, ngf=8, ndf=8, nz=16, batch_size=8, amp=amp, channels_last=True, device="cuda")
    data = pixels(n=48, size=16)  # 6 steps an epoch; 2 epochs cross an epoch boundary (the graph feed reloads)
    start = [p.detach().clone() for p in build_trainer(cfg, torch.device("cuda"),
                                                       resolve_precision(amp, torch.device("cuda"))).netG.parameters()]
    eager_stats, eager = train_some(cfg, data, 2, in_graph)
    graph_stats, graphed = train_some(dataclasses.replace(cfg, cuda_graphs=True), data, 2, in_graph)
    assert_the_same_steps(eager, graphed, 12, amp)
    # The same noise: the generator registered with the graph advanced exactly as the eager draws did
    assert torch.equal(graphed.noise_generator.get_state(), eager.noise_generator.get_state())
    moved = (weights(eager.netG) - torch.cat([p.float().flatten().cpu() for p in start])).abs()
    diff_g = (weights(graphed.netG) - weights(eager.netG)).abs()
    diff_d = (weights(graphed.netD) - weights(eager.netD)).abs()
    if amp == "off":
        # fp32 without TF32, cuDNN deterministic and not autotuned: the same algorithms in both builds, so the
        # graph replays eager's kernels and only fused or reordered arithmetic could differ (~1e-7 per op). One
        # Adam step more or fewer moves weights by ~lr = 2e-4, and the typical weight here has moved by
        # `moved.median()` over 12 steps: the bound sits 10x below one step
        torch.testing.assert_close(graph_stats, eager_stats, rtol=1e-4, atol=1e-5)
        assert diff_g.max() < 2e-5 and diff_d.max() < 2e-5
    else:
        # Half precision: an element whose gradient is ~0 can flip Adam's sign under other rounding (a jump of up
        # to 2 lr), so compare whole updates: a step more or fewer in 12 changes the update by ~1/12 of its norm
        assert diff_g.norm() < 0.02 * moved.norm()
        torch.testing.assert_close(graph_stats, eager_stats, rtol=0.05, atol=0.02)
    assert moved.median() > 1e-4  # and they did train


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("in_graph", [True, False])
def test_the_ema_update_inside_the_graph_equals_eager(in_graph, deterministic_cuda):
    """--ema under --cuda-graphs: the average's update is captured with the step (its images counter on the
    device), undone after the warm-up like the weights, and replayed once per step."""
    cfg = Config(image_size=16, ngf=8, ndf=8, nz=16, batch_size=8, channels_last=True, device="cuda",
                 ema_kimg=0.05)  # a 50-image half-life: after its ramp-up it moves visibly in 12 steps
    data = pixels(n=48, size=16)
    _, eager = train_some(cfg, data, 2, in_graph)
    _, graphed = train_some(dataclasses.replace(cfg, cuda_graphs=True), data, 2, in_graph)
    assert float(eager.ema.images) == float(graphed.ema.images) == 12 * 8  # counted once per step, warm-up undone
    # fp32 as in the test above: float rounding only; a step's update more or fewer moves the average by ~lr/2
    diff = (weights(graphed.ema.model) - weights(eager.ema.model)).abs()
    assert diff.max() < 2e-5
    assert (weights(eager.ema.model) - weights(eager.netG)).abs().max() > 1e-4  # an average, not G


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_graphed_steps_on_prepared_data_never_sync(amp):
    """After capture, a graphed step on prepared data is one replay: no host sync at all, for 20 steps, with the
    loop's per-step work (the loader's placeholder, the statistics copied into the interval's history)."""
    from fastgan.distributed import Ranks
    from fastgan.interval import IntervalStats
    cuda = torch.device("cuda")
    cfg = Config(image_size=32, ngf=16, ndf=16, batch_size=16, amp=amp, channels_last=True, cuda_graphs=True,
                 device="cuda")
    precision = resolve_precision(amp, cuda, cuda_graphs=True)
    loader = PreparedLoader(pixels(n=16 * 30, size=32), 16, cuda, channels_last=True, seed=1, mirror=True,
                            dtype=precision.dtype)
    trainer = build_trainer(cfg, cuda, precision, graph_feed=loader.in_graph)
    stats = IntervalStats(50, trainer, Ranks(), 16, None, torch.zeros(0, 2))
    batches = iter(loader)
    stats.add(trainer(next(batches)))  # capture (warm-up, cuDNN autotuning) happens here, allowed to sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _, batch in zip(range(20), batches):
            stats.add(trainer(batch))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    values = stats.history[:21].cpu()
    assert torch.isfinite(values).all() and stats.pending == 21
