"""The training step in one process: what it updates, and that it learns."""

import numpy as np
import pytest
import torch

from dcgan.config import ModelConfig, TrainConfig
from dcgan.networks import Discriminator, Generator
from dcgan.sampling import batch_statistics, generate, grid, to_uint8
from dcgan.step import GANStep, StepOptions, make_optimizers, to_model_input
from tests.realdata import mnist_rgb32

MODEL = ModelConfig(resolution=32, ngf=16, ndf=16, z_dim=32, kernel_size=4)


def make_step(train=TrainConfig(batch_size=64), options=None):
    torch.manual_seed(0)
    g, d = Generator(MODEL), Discriminator(MODEL)
    opt_g, opt_d = make_optimizers(g, d, train)
    return GANStep(g, d, opt_g, opt_d, MODEL, train, torch.device("cpu"), options or StepOptions()), g, d


def three_steps(**train) -> tuple[torch.Tensor, torch.Tensor]:
    """Metrics of 3 steps on fixed real digits (z is fixed by the seed and step) and the update of all weights,
    with the step options that the `train` config fields resolve to on the CPU."""
    cfg = TrainConfig(batch_size=32, **train)
    step, g, d = make_step(cfg, StepOptions.resolve(cfg, torch.device("cpu")))
    params = list(g.parameters()) + list(d.parameters())
    w0 = torch.cat([p.detach().flatten() for p in params])
    x = torch.from_numpy(mnist_rgb32(96))
    metrics = torch.stack([step(x[i * 32 : (i + 1) * 32]) for i in range(3)])
    return metrics, torch.cat([p.detach().flatten() for p in params]) - w0


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_bf16_autocast_agrees_with_fp32():
    """bf16 keeps 8 bits of mantissa (rounding 2^-9 ~ 2e-3) in every conv and matmul. Over 3 steps the losses and
    D outputs stay within 5e-3 of fp32 (measured 1.4e-3). Weights cannot be compared element by element: Adam moves
    each one by about lr * sign(g), so a gradient that bf16 rounds across zero moves 2 lr the other way; the update
    as a whole must point the same way: its difference from fp32's under 35% of its norm (measured 19%)."""
    ref_m, ref_dw = three_steps(precision="fp32")
    m, dw = three_steps(precision="bf16")
    assert not torch.equal(m, ref_m)  # autocast did run in bf16
    torch.testing.assert_close(m, ref_m, rtol=0, atol=5e-3)
    assert relative(dw, ref_dw) < 0.35


@pytest.mark.slow
def test_compile_agrees_with_eager():
    """torch.compile (inductor, C++ on CPU) fuses and reorders float32 arithmetic: metrics within 1e-4 of eager
    (measured 1.4e-5); the 3-step update within 2% of its norm (measured 0.4%; a few weights whose gradient is
    near Adam's eps differ by up to ~2e-4, as any change of summation order does)."""
    ref_m, ref_dw = three_steps(compile=False)
    m, dw = three_steps(compile=True)
    torch.testing.assert_close(m, ref_m, rtol=0, atol=1e-4)
    assert relative(dw, ref_dw) < 0.02


def test_uint8_input_scaling():
    x = torch.tensor([[[[0, 255, 128]]]], dtype=torch.uint8)  # 1x1x1x3 NHWC
    y = to_model_input(x, torch.device("cpu"))
    assert y.shape == (1, 3, 1, 1)
    assert torch.allclose(y.flatten(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)


def test_step_updates_both_networks_and_returns_device_metrics():
    step, g, d = make_step()
    g0 = [p.detach().clone() for p in g.parameters()]
    d0 = [p.detach().clone() for p in d.parameters()]
    m = step(torch.from_numpy(mnist_rgb32(64)))
    assert m.shape == (4,) and torch.isfinite(m).all()
    assert all(not torch.equal(a, b) for a, b in zip(g0, g.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, d.parameters()))
    loss_d, loss_g, d_x, d_gz = m.tolist()
    assert 0 < d_x < 1 and 0 < d_gz < 1 and loss_d > 0 and loss_g > 0


def test_alternate_updates_quirk():
    step, g, d = make_step(TrainConfig(batch_size=32, alternate_updates=True))
    batch = torch.from_numpy(mnist_rgb32(32))
    g0 = [p.detach().clone() for p in g.parameters()]
    step(batch)  # iteration 0: D only
    assert all(torch.equal(a, b) for a, b in zip(g0, g.parameters()))
    d1 = [p.detach().clone() for p in d.parameters()]
    step(batch)  # iteration 1: G only
    assert all(torch.equal(a, b) for a, b in zip(d1, d.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(g0, g.parameters()))


def test_discriminator_learns_real_from_fake_on_digits():
    step, g, d = make_step()
    x = torch.from_numpy(mnist_rgb32(640))
    first = step(x[:64])
    for i in range(1, 10):
        last = step(x[i * 64 : (i + 1) * 64])
    assert last[2] > 0.6 and last[2] > first[2]  # D(x) rises on real digits


def test_batch_statistics_sampling_leaves_running_stats():
    g = Generator(MODEL)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    with batch_statistics(g):
        g(torch.rand(16, 32))
    after = g.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    out = generate(g, torch.rand(10, 32), bn="running")
    assert out.shape == (10, 3, 32, 32)


def test_grid_layout():
    imgs = to_uint8(torch.zeros(10, 3, 8, 8))
    assert imgs.dtype == np.uint8 and imgs.shape == (10, 8, 8, 3) and (imgs == 128).all()
    assert grid(imgs, nrow=4, pad=2).shape == (3 * 10 + 2, 4 * 10 + 2, 3)


def test_gpu_flag_turns_cluster_use_gpu_on_and_off(tmp_path):
    from dcgan.cli import build_parser
    from dcgan.commands import config_of

    gpu_config = tmp_path / "gpu.yaml"
    gpu_config.write_text("cluster: {use_gpu: true}\n")
    for flag, expected in (["--gpu"], True), (["--no-gpu"], False), ([], True):
        args = build_parser().parse_args(["train", "--config", str(gpu_config), *flag])
        assert config_of(args).cluster.use_gpu is expected
