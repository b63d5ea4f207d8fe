"""The paper's D-feature protocol: dimensions of the released models, BN re-estimation, batching, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dcgan.config import ModelConfig, load_config
from dcgan.evaluation.features import (
    discriminator_features,
    extract_features,
    feature_dim,
    reestimate_batchnorm,
)
from dcgan.networks import Discriminator
from realdata import mnist_rgb32

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name, dim", [("imagenet-32.yaml", 28672), ("svhn-32.yaml", 7168)])
def test_paper_feature_dimensions(name, dim):
    d = Discriminator(load_config(CONFIGS / name).model)
    assert feature_dim(d) == dim
    f = extract_features(d, mnist_rgb32(3), device="cpu")
    assert f.shape == (3, dim) and f.dtype == np.float32


def test_imagenet32_discriminator_matches_the_released_model():
    m = load_config(CONFIGS / "imagenet-32.yaml").model
    d = Discriminator(m)
    convs = [b[0] for b in d.blocks]
    assert [c.out_channels for c in convs] == [128, 128, 256, 256, 512, 512]
    assert [c.stride[0] for c in convs] == [1, 2, 1, 2, 1, 2]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [any(isinstance(l, torch.nn.BatchNorm2d) for l in b) for b in d.blocks] == [False] + [True] * 5
    assert (m.z_dim, m.z_dist) == (256, "uniform")


def small_d() -> Discriminator:
    return Discriminator(ModelConfig(resolution=32, channels=3, d_channels=[16, 32, 64], d_strides=[2, 2, 2],
                                     d_kernel_size=5))


def test_batchnorm_statistics_are_the_training_images_average():
    torch.manual_seed(0)
    d = small_d()
    images = mnist_rgb32(256)
    reestimate_batchnorm(d, images, batch_size=256, device="cpu")  # one batch: running stats == its statistics
    assert not d.training
    bn = d.blocks[1][1]
    assert bn.momentum == 0.1  # restored
    with torch.no_grad():
        x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        pre = d.blocks[1][0](d.blocks[0](x))
    torch.testing.assert_close(bn.running_mean, pre.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, pre.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    # several batches: the cumulative average of the batch means
    reestimate_batchnorm(d, images, batch_size=64, device="cpu")
    means = [d.blocks[1][0](d.blocks[0](x[i : i + 64])).mean((0, 2, 3)) for i in range(0, 256, 64)]
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0).detach(), rtol=1e-4, atol=1e-5)


def test_features_do_not_depend_on_the_batch_and_are_max_pools():
    d = small_d()
    images = mnist_rgb32(50)
    (f,) = discriminator_features(d, images, batch_size=16, device="cpu")
    f7 = extract_features(d, images, batch_size=7, device="cpu")
    np.testing.assert_allclose(f, f7, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        first = d.features(torch.as_tensor(images[:1]).permute(0, 3, 1, 2).float() / 127.5 - 1)[0]  # 16x16x16
    assert np.isclose(f[0, :16].reshape(4, 4)[0, 0], first[0, 0, :4, :4].max().item(), atol=1e-6)


def test_mismatched_images_are_named():
    d = small_d()
    with pytest.raises(ValueError, match=r"cifar test: images are 28x28 but the discriminator takes 32x32"):
        extract_features(d, np.zeros((2, 28, 28, 3), np.uint8), name="cifar test")
    with pytest.raises(ValueError, match=r"svhn: images have 1 channels"):
        extract_features(d, np.zeros((2, 32, 32, 1), np.uint8), name="svhn")
    with pytest.raises(ValueError, match=r"expected \(N, H, W, C\) uint8"):
        extract_features(d, np.zeros((2, 32, 32, 3), np.float32))
