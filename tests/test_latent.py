"""The latent-space experiments on a G trained briefly on real MNIST digits (in-process, plain torch)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from dcgan.config import ModelConfig
from dcgan.evaluation import forgetting, guided_backprop, latent, memorisation
from dcgan.networks import Discriminator, Generator, sample_z
from dcgan.sampling import to_uint8
from realdata import mnist_rgb32

SMALL = dict(resolution=32, channels=1, z_dim=32, ngf=32, ndf=32, kernel_size=4)


@functools.lru_cache(maxsize=1)
def trained_small_gan(steps: int = 100, batch: int = 64, seed: int = 0) -> tuple[Generator, Discriminator]:
    """A 32x32 grey DCGAN after `steps` updates on 2000 MNIST digits: blurry digit-like samples (~20 s on 1 core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs on a shared 2-core box: more threads only contend
    try:
        torch.manual_seed(seed)
        cfg = ModelConfig(**SMALL)
        g, d = Generator(cfg), Discriminator(cfg)
        real = torch.as_tensor(mnist_rgb32(2000)[..., :1]).permute(0, 3, 1, 2).float() / 127.5 - 1
        opt_g = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999))
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = real[torch.randint(len(real), (batch,), generator=gen)]
            fake = g(sample_z(cfg, batch, generator=gen))
            loss_d = F.softplus(-d(x)).mean() + F.softplus(d(fake.detach())).mean()
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            loss_g = F.softplus(-d(fake)).mean()
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
        return g.eval(), d.eval()
    finally:
        torch.set_num_threads(threads)


def test_parse_arithmetic():
    assert latent.parse_arithmetic("1,2,3 - 4,5,6 + 7,8,9", 64) == [(1, [1, 2, 3]), (-1, [4, 5, 6]), (1, [7, 8, 9])]
    assert latent.parse_arithmetic(" 10 , 11 -12", 64) == [(1, [10, 11]), (-1, [12])]
    with pytest.raises(ValueError, match=r"sample indices \[64\] are not on the sheet \(0..63\)"):
        latent.parse_arithmetic("1,2,64 - 3", 64)
    with pytest.raises(ValueError, match="'a' is not a comma-separated list"):
        latent.parse_arithmetic("1,2 - a", 64)
    with pytest.raises(ValueError, match="needs at least two terms"):
        latent.parse_arithmetic("1,2,3", 64)


@pytest.mark.slow  # trains the shared small GAN (~20 s alone, more on a busy box)
def test_arithmetic_walks_and_sheet_on_a_trained_generator():
    g, _ = trained_small_gan()
    z = latent.sheet_z(g, 16)
    torch.testing.assert_close(z, latent.sheet_z(g, 16))  # the sheet is reproducible
    sheet = latent.numbered_sheet(latent.render(g, z), nrow=4)
    assert sheet.shape == (4 * 98 + 2, 4 * 98 + 2, 3)  # tiles enlarged to 96 px for legible labels
    out = latent.vector_arithmetic(g, z, latent.parse_arithmetic("0,1,2 - 3,4,5 + 6,7,8", 16))
    assert out["terms"].shape == (12, 1, 32, 32) and out["terms_nrow"] == 4
    assert out["result"].shape == (9, 1, 32, 32)
    expected = z[[0, 1, 2]].mean(0) - z[[3, 4, 5]].mean(0) + z[[6, 7, 8]].mean(0)
    torch.testing.assert_close(out["result_z"], expected)
    res = out["result"]
    assert (res[4] - res[0]).abs().mean() > 0.01  # noisy neighbours differ from the centre...
    assert (res[4] - res[0]).abs().mean() < (res[4] - latent.render(g, sample_z(g.cfg, 1))[0]).abs().mean()  # ...but less than a random z
    walk, nrow = latent.latent_walk(g, points=3, steps=5)
    assert walk.shape == (10, 1, 32, 32) and nrow == 5
    torch.testing.assert_close(walk[4], walk[5])  # consecutive legs share their end point


@pytest.mark.slow  # ~15 s of CPU
def test_rendering_does_not_depend_on_batch_companions():
    g, _ = trained_small_gan()
    z = latent.sheet_z(g, 8)
    torch.testing.assert_close(latent.render(g, z)[:2], latent.render(g, z[:2]), atol=1e-2, rtol=0)


def test_forgetting_drops_the_object_maps(tmp_path):
    g, _ = trained_small_gan()
    z = latent.sheet_z(g, 16)
    boxes = {"boxes": {str(i): [[8, 8, 24, 24]] for i in range(8)}}  # the digit stroke area
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(boxes))
    parsed = forgetting.load_boxes(str(path), 16, 32)
    fit = forgetting.fit_object_maps(g, z, parsed)
    assert fit["n_maps"] == 64 and fit["side"] == 8  # second-highest layer of the 32px G: 64 x 8x8
    assert 0 < len(fit["maps"]) < 64 and fit["train_accuracy"] > 0.7 and fit["positives"] == 8 * 16
    pairs = forgetting.forgetting_pairs(g, z[:4], fit["maps"])
    assert pairs.shape == (8, 1, 32, 32)
    assert (pairs[:4] - pairs[4:]).abs().mean() > 0.02
    with forgetting.dropped_maps(g, fit["maps"]):
        h = g.forward_features(z[:2])[forgetting.LAYER]
    assert h[:, fit["maps"]].abs().max() == 0
    assert len(g.blocks[0]._forward_hooks) == 0  # the hook is gone afterwards


@pytest.mark.parametrize("content, message", [
    ({"boxes": {"99": [[0, 0, 4, 4]]}}, "sample index '99' is not on the sheet"),
    ({"boxes": {"1": [[10, 0, 4, 4]]}}, r"box \[10, 0, 4, 4\] is empty or outside the 32x32 image"),
    ({"boxes": {"1": [[0, 0, 4]]}}, "is not \\[x0, y0, x1, y1\\]"),
    ({"windows": []}, "expected"),
])
def test_bad_boxes_are_named(tmp_path, content, message):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as err:
        forgetting.load_boxes(str(path), 16, 32)
    assert "boxes.json" in str(err.value)


def test_guided_backprop_and_memorisation():
    g, d = trained_small_gan()
    real = mnist_rgb32(300)[..., :1]
    channels = guided_backprop.top_channels(d, real, k=3)
    tiles, nrow = guided_backprop.guided_maps(d, real, channels, per_channel=2)
    assert tiles.shape == (12, 1, 32, 32) and nrow == 2
    assert tiles[2:4].abs().sum() > 0 and tiles[2:4].min() >= -1
    # samples that are training images are found at distance 0, in pixels and in D features
    out = memorisation.memorisation(real[[5, 17, 42]], real, d, show=3)
    assert out["pixel_nn_distance"]["max"] < 1e-3 and out["feature_nn_distance"]["max"] < 1e-2
    assert out["feature_nn_same_as_pixel_nn"] == 1.0 and out["grid"].shape == (9, 32, 32, 1)
    fake = to_uint8(latent.render(g, latent.sheet_z(g, 32)))
    gen = memorisation.memorisation(fake, real, d)
    assert gen["nnd_samples_to_real"] > 1.0 and gen["nnd_real_to_samples"] > 1.0
