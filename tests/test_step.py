"""The training step in one process: what it updates, and that it learns."""

import numpy as np
import torch

from dcgan.config import ModelConfig, TrainConfig
from dcgan.networks import Discriminator, Generator
from dcgan.sampling import batch_statistics, generate, grid, to_uint8
from dcgan.step import GANStep, StepOptions, make_optimizers, to_model_input
from tests.realdata import mnist_rgb32

MODEL = ModelConfig(resolution=32, ngf=16, ndf=16, z_dim=32, kernel_size=4)


def make_step(train=TrainConfig(batch_size=64)):
    torch.manual_seed(0)
    g, d = Generator(MODEL), Discriminator(MODEL)
    opt_g, opt_d = make_optimizers(g, d, train)
    return GANStep(g, d, opt_g, opt_d, MODEL, train, torch.device("cpu"), StepOptions()), g, d


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
