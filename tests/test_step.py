"""fastgan's step against the tutorial's, and every speed variant against eager fp32.

Tolerances were measured (see each test) and carry a margin of about 3-10x, not more.
"""
import copy
import os
import platform

import pytest
import torch

from fastgan.config import Config
from fastgan.trainer import build_models, build_optimizers, build_trainer, resolve_precision
from fastgan.step import train_step
from fastgan.tutorial import TutorialDiscriminator, TutorialGenerator, tutorial_step

DEVICE = torch.device("cpu")


# ---- helpers ---------------------------------------------------------------------------------------------

def small_config(**overrides) -> Config:
    return Config(**{**dict(image_size=64, ngf=8, ndf=8, nz=16, batch_size=8, device="cpu"), **overrides})


def batches(cfg, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(cfg.batch_size, cfg.nc, cfg.image_size, cfg.image_size, generator=g) * 2 - 1,
             torch.randn(cfg.batch_size, cfg.nz, 1, 1, generator=g)) for _ in range(steps)]


def run_fastgan(cfg, data, compile=False):
    """(stats per step, G state, D state) after running fastgan's step over `data`."""
    torch.manual_seed(cfg.seed)
    netG, netD = build_models(cfg, DEVICE)
    optG, optD = build_optimizers(cfg, netG, netD)
    precision = resolve_precision(cfg.amp, DEVICE)
    stepG, stepD = (torch.compile(netG), torch.compile(netD)) if compile else (netG, netD)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    stats = [train_step(stepG, stepD, optG, optD, real.contiguous(memory_format=memory_format), noise,
                        precision.autocast, precision.scaler) for real, noise in data]
    return torch.stack(stats), netG.state_dict(), netD.state_dict()


def max_abs_diff(a: dict, b: dict, buffers: bool = True) -> float:
    """Largest elementwise difference over the weights (and BatchNorm running statistics if buffers)."""
    keys = [k for k in a if buffers or not ("running_" in k or "num_batches" in k)]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


# ---- tests -----------------------------------------------------------------------------------------------

def test_steps_equal_the_tutorials_steps():
    """Five steps, not one: a bug that builds up over steps (Adam's moments, the step count, BatchNorm's running
    statistics, a stale gradient) passes a one-step comparison."""
    cfg = small_config()
    data = batches(cfg, 5)
    stats, g_state, d_state = run_fastgan(cfg, data)

    torch.manual_seed(cfg.seed)
    ours_g, ours_d = build_models(cfg, DEVICE)  # same initial weights, loaded into the tutorial's modules
    netG, netD = TutorialGenerator(cfg.nz, cfg.ngf, cfg.nc), TutorialDiscriminator(cfg.ndf, cfg.nc)
    netG.load_state_dict(ours_g.state_dict())
    netD.load_state_dict(ours_d.state_dict())
    optimizerD = torch.optim.Adam(netD.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    expected = torch.stack([tutorial_step(netG, netD, optimizerG, optimizerD, real, noise)
                            for real, noise in data])

    # Measured over 5 steps: stats agree to 7.2e-7, weights and running statistics to 1.3e-5 (G) and 2.6e-6 (D)
    # (logits + BCE-with-logits and Sigmoid + BCELoss round differently, fused Adam orders its arithmetic
    # differently from the default Adam, and Adam divides by |grad|, which amplifies that where a gradient is
    # tiny). The weight bound 5e-5 is 4x the measured G and a quarter of one Adam step (lr = 2e-4 per element),
    # so one step wrong anywhere in the five fails it.
    torch.testing.assert_close(stats, expected, rtol=1e-5, atol=1e-5)
    assert max_abs_diff(g_state, netG.state_dict()) < 5e-5
    assert max_abs_diff(d_state, netD.state_dict()) < 5e-5
    # and the steps did change the weights by at least Adam's first-step size (lr per element): it can fail
    moved = max((g_state[k] - p).abs().max().item() for k, p in ours_g.named_parameters())
    assert moved > 0.9 * cfg.lr


def test_G_update_leaves_D_gradients_alone():
    cfg = small_config(image_size=16, ngf=4, ndf=4)
    torch.manual_seed(cfg.seed)
    netG, netD = build_models(cfg, DEVICE)
    before_G, before_D = copy.deepcopy(netG), copy.deepcopy(netD)
    optG, optD = build_optimizers(cfg, netG, netD)
    precision = resolve_precision("off", DEVICE)
    (real, noise), = batches(cfg, 1)
    train_step(netG, netD, optG, optD, real, noise, precision.autocast, precision.scaler)
    assert all(p.requires_grad for p in [*netG.parameters(), *netD.parameters()])
    # D's gradients after the step are those of D's own loss alone: the G pass added nothing to them
    from fastgan.step import bce
    fake = before_G(noise)
    (bce(before_D(real), 1.0) + bce(before_D(fake.detach()), 0.0)).backward()
    for ours, reference in zip(netD.parameters(), before_D.parameters()):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-5, atol=1e-7)


def test_step_moves_the_statistics_the_right_way():
    cfg = small_config(image_size=16, ngf=4, ndf=4)
    data = batches(cfg, 1) * 30  # one real batch, seen 30 times: D must learn to call it real
    stats, _, _ = run_fastgan(cfg, data)
    assert torch.isfinite(stats).all()
    assert stats[-1, 2] > stats[0, 2]  # D(x) rises


def test_channels_last_matches_eager_fp32():
    cfg = small_config()
    data = batches(cfg, 3)
    ref_stats, ref_g, ref_d = run_fastgan(cfg, data)
    stats, g, d = run_fastgan(small_config(channels_last=True), data)
    # Measured: stats to 1e-6, weights and running statistics to 4e-6 (other conv kernels, same fp32 maths)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-5)
    assert max_abs_diff(g, ref_g) < 2e-5 and max_abs_diff(d, ref_d) < 2e-5


def update(after: dict, before: dict) -> torch.Tensor:
    """All weight changes of a run as one vector."""
    return torch.cat([(after[k] - before[k]).flatten() for k in after
                      if "running_" not in k and "num_batches" not in k])


@pytest.mark.parametrize("channels_last", [False, True])
def test_amp_bf16_matches_eager_fp32(channels_last):
    cfg = small_config()
    data = batches(cfg, 3)
    torch.manual_seed(cfg.seed)
    g0, d0 = (m.state_dict() for m in build_models(cfg, DEVICE))
    ref_stats, ref_g, ref_d = run_fastgan(cfg, data)
    stats, g, d = run_fastgan(small_config(amp="bf16", channels_last=channels_last), data)
    # bf16 keeps 8 bits of mantissa. Measured over 3 steps: stats differ by 3.8e-3 (0.3% relative).
    torch.testing.assert_close(stats, ref_stats, rtol=0.02, atol=0.02)
    assert (stats[:, :2] - ref_stats[:, :2]).abs().max() > 1e-5  # it really ran in bf16
    # Adam moves every weight by about lr per step whatever its gradient's size, so where a tiny gradient's
    # sign flips in bf16 a weight differs by up to ~2 lr per step (measured max 1.2e-3 after 3 steps, more than
    # 3 steps move a weight, 6.4e-4): a max bound cannot tell an untrained net. The mean is what bf16 keeps:
    # measured mean |difference| 7.6e-5 (G) and 2.5e-5 (D); leaving out one of the three steps gives 1.4e-4
    # (G) and 1.3e-4 (D), an untrained net 3.3e-4 and 3.6e-4. Bounds: below the one-step-missing figures.
    assert update(g, ref_g).abs().mean() < 1.1e-4 and update(d, ref_d).abs().mean() < 6e-5
    # and the updates point the same way: measured cosine 0.93 for G, 0.99 for D
    cos = torch.nn.functional.cosine_similarity
    assert cos(update(g, g0), update(ref_g, g0), 0) > 0.85
    assert cos(update(d, d0), update(ref_d, d0), 0) > 0.95


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("off", torch.float32)])
def test_the_step_computes_in_the_dtype_asked_for(amp, dtype):
    """The dtype that really ran, seen by hooks on each network's first layer during a step of the trainer a run
    builds: --amp bf16 that autocast to float16 would pass every tolerance above (fp16 is closer to fp32)."""
    cfg = small_config(image_size=16, ngf=4, ndf=4, amp=amp)
    precision = resolve_precision(amp, DEVICE)
    trainer = build_trainer(cfg, DEVICE, precision)
    seen = []
    for layer in (trainer.netG.main[0], trainer.netD.main[0]):
        layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    (real, _), = batches(cfg, 1)
    trainer(real)
    assert len(seen) == 4 and set(seen) == {dtype}  # G once; D on real, on fake for D's update, on fake for G's
    assert precision.dtype == dtype  # and the batches the loaders deliver are in that dtype too


def dtypes_seen(precision, amp) -> set:
    """The dtypes that really ran in each network's first layer during one step of a run's trainer."""
    cfg = small_config(image_size=16, ngf=4, ndf=4, amp=amp)
    trainer = build_trainer(cfg, DEVICE, precision)
    seen = set()
    for layer in (trainer.netG.main[0], trainer.netD.main[0]):
        layer.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    (real, _), = batches(cfg, 1)
    trainer(real)
    return seen


# CPUs as /proc/cpuinfo lists them, with whether bf16 runs on their own instructions there
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile"}
ZEN4 = {"avx2", "avx512f", "avx512bw", "avx512_bf16"}
SKYLAKE_X = {"avx2", "avx512f", "avx512bw", "avx512_vnni"}  # AVX-512 without bf16: emulated, measured 2x slower
ZEN3 = {"avx2", "fma"}  # AVX2 only: emulated, measured 10x slower


@pytest.mark.parametrize("flags, native", [(SAPPHIRE_RAPIDS, True), (ZEN4, True), (SKYLAKE_X, False), (ZEN3, False)])
def test_amp_auto_on_cpu_is_bf16_where_the_cpu_has_bf16_instructions_else_fp32(monkeypatch, flags, native):
    """--amp alone means the fastest mixed precision the CPU really has: bf16 (no scaler) on bf16 instructions,
    fp32 where bf16 would be emulated (slower than fp32), with a note saying so; the step computes in it."""
    import fastgan.cpu
    monkeypatch.setattr(fastgan.cpu, "cpu_flags", lambda: flags)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    precision = resolve_precision("auto", DEVICE)
    assert precision.name == ("bf16" if native else "fp32") and not precision.scaler.is_enabled()
    assert dtypes_seen(precision, "auto") == {torch.bfloat16 if native else torch.float32}
    assert bool(precision.note) == (not native)
    # asked for by name, each precision is obeyed, emulated or not; emulated bf16 gets the note
    explicit = resolve_precision("bf16", DEVICE)
    assert explicit.name == "bf16" and dtypes_seen(explicit, "bf16") == {torch.bfloat16}
    assert bool(explicit.note) == (not native)
    assert resolve_precision("fp16", DEVICE).scaler.is_enabled()
    assert resolve_precision("off", DEVICE).name == "fp32" and not resolve_precision("off", DEVICE).note


@pytest.mark.parametrize("cap, native", [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True),
                                         ("AVX512_CORE_AMX", True), ("ALL", True)])
def test_amp_auto_on_cpu_follows_onednn_isa_cap(monkeypatch, cap, native):
    """ONEDNN_MAX_CPU_ISA below the ISAs with bf16 instructions makes oneDNN emulate bf16 on a CPU that has them
    (measured: 10x slower than fp32 under AVX2): --amp then trains in fp32."""
    import fastgan.cpu
    monkeypatch.setattr(fastgan.cpu, "cpu_flags", lambda: SAPPHIRE_RAPIDS)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert resolve_precision("auto", DEVICE).name == ("bf16" if native else "fp32")


@pytest.mark.parametrize("probe, native", [(True, True), (False, False)])
def test_amp_auto_without_proc_cpuinfo_asks_torch(monkeypatch, probe, native):
    """Without /proc/cpuinfo (macOS, Windows) the bf16 instructions are torch's own probe's."""
    import fastgan.cpu
    monkeypatch.setattr(fastgan.cpu, "cpu_flags", lambda: None)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: probe, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert resolve_precision("auto", DEVICE).name == ("bf16" if native else "fp32")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not os.path.exists("/proc/cpuinfo"),
                    reason="reads an x86 CPU's /proc/cpuinfo")
def test_cpu_flags_are_read_from_proc_cpuinfo():
    from fastgan.cpu import cpu_flags
    assert {"fpu", "sse2"} <= cpu_flags()  # every x86-64 CPU lists them


def test_amp_fp16_with_scaler_runs_on_cpu():
    cfg = small_config(amp="fp16")
    data = batches(cfg, 4)
    torch.manual_seed(cfg.seed)
    g0, d0 = (m.state_dict() for m in build_models(cfg, DEVICE))
    stats, g, d = run_fastgan(cfg, data)
    ref, _, _ = run_fastgan(small_config(), data)
    assert torch.isfinite(stats).all()
    # The first step's D pass comes before any update: fp16 rounding only (measured 1e-3). Later steps differ
    # more because the GradScaler skips the first updates while it backs off from its initial 2**16 scale.
    torch.testing.assert_close(stats[0, [0, 2, 3]], ref[0, [0, 2, 3]], rtol=0.01, atol=0.01)
    # it did train: measured, G's weights moved up to 4.1e-4 from the start (two Adam steps of lr = 2e-4 each;
    # the scaler skipped the others) and D's 2.0e-4 (one step). A scaler that skipped every step moves none.
    assert update(g, g0).abs().max() > 0.9 * cfg.lr and update(d, d0).abs().max() > 0.9 * cfg.lr


def test_amp_fp16_steps_on_the_true_gradients():
    """Every backward of the fp16 step goes through the GradScaler, so that its step divides the same scale back
    out. A loss backpropagated unscaled leaves its gradients `scale` times too small; Adam, which divides by the
    gradients' size, hides that in the weights, so the gradients left after the step are compared directly."""
    def gradients_after_one_step(amp):
        cfg = small_config(amp=amp)
        torch.manual_seed(cfg.seed)
        netG, netD = build_models(cfg, DEVICE)
        optG, optD = build_optimizers(cfg, netG, netD)
        # 2**8, not the default 2**16, which overflows fp16 in this first step and makes the scaler skip it
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, enabled=amp == "fp16")
        (real, noise), = batches(cfg, 1)
        train_step(netG, netD, optG, optD, real, noise, resolve_precision(amp, DEVICE).autocast, scaler)
        assert scaler.get_scale() == (2.0 ** 8 if amp == "fp16" else 1.0)  # no step was skipped
        return [torch.cat([p.grad.flatten() for p in net.parameters()]) for net in (netG, netD)]

    cos = torch.nn.functional.cosine_similarity
    for fp16, fp32 in zip(gradients_after_one_step("fp16"), gradients_after_one_step("off")):
        # measured: norm ratio 0.997 (G) and 1.005 (D), cosine 0.996 and 0.999 (fp16 rounding); a backward
        # left unscaled is off by the factor 256
        assert 0.9 < fp16.norm() / fp32.norm() < 1.1 and cos(fp16, fp32, 0) > 0.98


def test_compile_matches_eager_fp32():
    cfg = small_config(image_size=32)
    data = batches(cfg, 2)
    ref_stats, ref_g, ref_d = run_fastgan(cfg, data)
    stats, g, d = run_fastgan(cfg, data, compile=True)
    # Measured: 6e-8 everywhere (inductor fuses and reorders fp32 arithmetic)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-6)
    assert max_abs_diff(g, ref_g) < 1e-6 and max_abs_diff(d, ref_d) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp32_step_matches_the_cpu(deterministic_cuda):
    cfg = small_config()
    data = batches(cfg, 2)
    torch.manual_seed(cfg.seed)
    g0 = {k: v.clone() for k, v in build_models(cfg, DEVICE)[0].state_dict().items()}
    ref_stats, ref_g, _ = run_fastgan(cfg, data)
    torch.manual_seed(cfg.seed)
    cuda = torch.device("cuda")
    netG, netD = build_models(cfg, cuda)
    optG, optD = build_optimizers(cfg, netG, netD)
    precision = resolve_precision("off", cuda)
    stats = torch.stack([train_step(netG, netD, optG, optD, real.to(cuda), noise.to(cuda), precision.autocast,
                                    precision.scaler) for real, noise in data]).cpu()
    torch.testing.assert_close(stats, ref_stats, rtol=1e-4, atol=1e-4)
    # The GPU's kernels round otherwise than the CPU's: where a gradient is ~0 its sign may flip, and Adam then
    # moves that weight by up to 2 lr = 4e-4 the other way, so a bound on single weights could fail without a
    # bug. The whole update is compared by its norm: one flipped element changes it by under 1% here, one step
    # more or fewer (of 2) by about half
    g = {k: v.cpu() for k, v in netG.state_dict().items()}
    assert (update(g, ref_g).norm() / update(ref_g, g0).norm()) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_amp_auto_is_fp16_with_scaler():
    precision = resolve_precision("auto", torch.device("cuda"))
    assert precision.name == "fp16" and precision.scaler.is_enabled()


def test_cuda_graphs_need_a_cuda_device(image_folder, capsys):
    """(The graphed step itself is tested in tests/test_graphs.py, against eager training on the GPU.)"""
    from fastgan.cli import main
    assert main(["train", "--root", str(image_folder), "--cuda-graphs", "--device", "cpu"]) == 2  # GPU or not
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
