"""The paper's architecture guidelines, checked layer by layer."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dcgan.commands import info
from dcgan.config import ModelConfig, load_config
from dcgan.networks import Discriminator, Generator, layer_table, parameter_count


def layers(module, kind):
    return [m for m in module.modules() if isinstance(m, kind)]


def test_default_generator_is_the_paper_64px_model():
    g = Generator()
    assert g.project.in_features == 100 and g.project.out_features == 4 * 4 * 1024
    convs = layers(g, nn.ConvTranspose2d)
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1024, 512), (512, 256), (256, 128), (128, 3)]
    assert all(c.stride == (2, 2) and c.kernel_size == (5, 5) and c.bias is None for c in convs)
    z = torch.rand(4, 100) * 2 - 1
    shapes = [tuple(h.shape[1:]) for h in g.forward_features(z)]
    assert shapes == [(1024, 4, 4), (512, 8, 8), (256, 16, 16), (128, 32, 32), (3, 64, 64)]


def test_default_discriminator_mirrors_it():
    d = Discriminator()
    convs = layers(d, nn.Conv2d)
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 128), (128, 256), (256, 512), (512, 1024)]
    assert all(c.stride == (2, 2) and c.bias is None for c in convs)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    assert [tuple(f.shape[1:]) for f in d.features(x)] == [(128, 32, 32), (256, 16, 16), (512, 8, 8), (1024, 4, 4)]
    assert d(x).shape == (4,)
    assert isinstance(d.head, nn.Linear) and d.head.in_features == 1024 * 16 and d.head.out_features == 1


def test_batchnorm_placement_and_activations():
    g, d = Generator(), Discriminator()
    # G: BN after the projection and every conv but the output; output is Tanh.
    assert len(layers(g, nn.BatchNorm2d)) == 4
    assert isinstance(g.blocks[-1][-1], nn.Tanh) and not any(isinstance(m, nn.BatchNorm2d) for m in g.blocks[-1])
    assert len(layers(g, nn.ReLU)) == 3 and not layers(g, nn.LeakyReLU)
    # D: no BN on the input layer, BN on the other three; LeakyReLU(0.2) everywhere.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d.blocks[0])
    assert all(any(isinstance(m, nn.BatchNorm2d) for m in b) for b in d.blocks[1:])
    leaky = layers(d, nn.LeakyReLU)
    assert len(leaky) == 4 and all(m.negative_slope == 0.2 for m in leaky)
    # No pooling, no hidden fully connected layers.
    for net in (g, d):
        assert not layers(net, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
    assert len(layers(g, nn.Linear)) == 1 and len(layers(d, nn.Linear)) == 1


def test_output_range_is_tanh():
    out = Generator()(torch.rand(8, 100) * 2 - 1)
    assert out.min() >= -1 and out.max() <= 1


def test_initialisation_statistics():
    torch.manual_seed(0)
    g, d = Generator(), Discriminator()
    for net in (g, d):
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.weight.numel() > 10_000:
                assert abs(m.weight.mean().item()) < 2e-3
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.05)
            if isinstance(m, nn.BatchNorm2d):
                assert m.weight.mean().item() == pytest.approx(1.0, abs=0.01)
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.5)
                assert torch.all(m.bias == 0)


@pytest.mark.parametrize("res", [32, 64, 128])
def test_resolutions_from_config(res):
    cfg = ModelConfig(resolution=res, ngf=16, ndf=16, z_dim=20)
    g, d = Generator(cfg), Discriminator(cfg)
    x = g(torch.rand(2, 20))
    assert x.shape == (2, 3, res, res)
    assert d(x).shape == (2,)
    assert len(layers(g, nn.ConvTranspose2d)) == int(math.log2(res // 4))


def test_kernel_4_matches_pytorch_examples_geometry():
    cfg = ModelConfig(kernel_size=4, ngf=8, ndf=8)
    assert Generator(cfg)(torch.rand(2, 100)).shape == (2, 3, 64, 64)


def test_parameter_counts_and_layer_table():
    g = Generator()
    rows = layer_table(g, torch.zeros(2, 100))
    assert sum(r[3] for r in rows) == parameter_count(g)
    # dense 100 -> 16384 (no bias) + BN(1024) + convT 5x5: 1024*512 + 512*256 + 256*128 + 128*3, + BN 512/256/128
    expected = 100 * 16384 + 2 * 1024 + 25 * (1024 * 512 + 512 * 256 + 256 * 128 + 128 * 3) + 2 * (512 + 256 + 128)
    assert parameter_count(g) == expected
    # checkpoints of existing runs load: the same state_dict keys as before explicit G stacks existed
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["project.weight"] + [f"project_bn.{k}" for k in bn]
    keys += [k for i in range(3) for k in [f"blocks.{i}.0.weight"] + [f"blocks.{i}.1.{b}" for b in bn]]
    assert list(g.state_dict()) == keys + ["blocks.3.0.weight"]


def test_dcgan_info_cli_prints_table():
    out = subprocess.run([sys.executable, "-m", "dcgan.cli", "info"], capture_output=True, text=True, check=True).stdout
    assert "Generator: 18,855,040 parameters" in out
    assert "ConvTranspose2d" in out and "LeakyReLU" in out


def test_imagenet_32_generator_is_the_authors_released_model(capsys):
    """dcgan_code imagenet/load_pretrained.py: 3x3 transposed convs, stride-1 layers between (D: test_features.py)."""
    path = str(Path(__file__).resolve().parents[1] / "configs" / "imagenet-32.yaml")
    g = Generator(load_config(path).model)
    assert (g.project.in_features, g.project.out_features) == (256, 512 * 16)
    released_g = [(512, 512, 2), (512, 256, 1), (256, 256, 2), (256, 128, 1), (128, 128, 2), (128, 3, 1)]
    convs = layers(g, nn.ConvTranspose2d)
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == released_g
    assert all(c.kernel_size == (3, 3) for c in convs)
    sides = [tuple(h.shape[1:]) for h in g.forward_features(torch.rand(2, 256) * 2 - 1)]
    assert sides[1:3] == [(512, 8, 8), (256, 8, 8)] and sides[-1] == (3, 32, 32)
    info.run(type("Args", (), {"config": path}))
    out = capsys.readouterr().out
    g_table = out.split("Discriminator:")[0]
    assert [line.split()[2:4] for line in g_table.splitlines() if "ConvTranspose2d" in line] == [
        ["3x3", f"s{s}"] for *_, s in released_g]
    assert "28,672-d" in out
