"""FID/KID agree with independent formulas; FID separates real digit sets; the FID Inception loads pytorch-fid keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dcgan.evaluation import fid
from dcgan.evaluation.inception import FIDInceptionV3, InceptionWeightsError, load_inception
from realdata import mnist_rgb32


def independent_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Tr sqrt(S1 S2) through the symmetric form sqrt(S1) S2 sqrt(S1): eigenvalues only, no sqrtm of a product."""
    m1, m2 = a.mean(0), b.mean(0)
    s1 = (a - m1).T @ (a - m1) / (len(a) - 1)
    s2 = (b - m2).T @ (b - m2) / (len(b) - 1)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


def independent_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 by its definition, with explicit loops over distinct pairs."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return float(xx + yy - 2 * xy)


def test_fid_and_kid_match_independent_formulas():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 16))
    b = rng.normal(0.3, 1.2, size=(250, 16)) @ rng.normal(size=(16, 16)) * 0.5
    assert fid.fid_from_features(a, b) == pytest.approx(independent_fid(a, b), rel=1e-6)
    mu, sigma = fid.activation_statistics(a)
    np.testing.assert_allclose(sigma, np.cov(a.T), rtol=1e-12)
    x, y = a[:40], b[:40]
    assert fid.polynomial_mmd2_unbiased(x, y) == pytest.approx(independent_mmd2(x, y), rel=1e-9)
    k = fid.kid_from_features(a, b, subsets=5, subset_size=40)
    assert k["kid_subset_size"] == 40 and k["kid_mean"] > 0
    same = fid.kid_from_features(a, a[::-1].copy(), subsets=5, subset_size=40)["kid_mean"]
    assert abs(same) < k["kid_mean"] / 3  # unbiased: near zero (and possibly negative) for one distribution


class TinyNet(nn.Module):
    """A small fixed random conv net as the feature network (uint8 NHWC -> 64-d)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 32, 5, 2, 2), nn.ReLU(), nn.Conv2d(32, 64, 5, 2, 2), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.body(x.permute(0, 3, 1, 2).float() / 127.5 - 1)


def test_fid_of_real_digits_self_zero_shifted_larger():
    digits = mnist_rgb32(5000)[np.random.default_rng(0).permutation(5000)[:1200]]
    a, b = digits[:600], digits[600:]
    shifted = np.roll(b, 6, axis=2)  # the same digits moved 6 pixels right
    feats = lambda x: fid.network_features(TinyNet(), x, device="cpu")  # noqa: E731
    self_fid = fid.sample_quality(a, a, feats, kid_subsets=10, kid_subset_size=200)
    other_half = fid.sample_quality(a, b, feats, kid_subsets=10, kid_subset_size=200)
    moved = fid.sample_quality(a, shifted, feats, kid_subsets=10, kid_subset_size=200)
    assert abs(self_fid["fid"]) < 1e-6
    assert moved["fid"] > 5 * other_half["fid"] > 0, (other_half, moved)
    assert moved["kid_mean"] > other_half["kid_mean"]


def test_fid_inception_has_pytorch_fid_names_and_loads(tmp_path):
    net = FIDInceptionV3()
    keys = net.state_dict()
    for k in ("Conv2d_1a_3x3.conv.weight", "Mixed_5b.branch_pool.bn.running_var", "Mixed_6e.branch7x7dbl_5.conv.weight",
              "Mixed_7a.branch7x7x3_4.bn.bias", "Mixed_7c.branch3x3dbl_3b.conv.weight", "fc.weight"):
        assert k in keys
    assert keys["fc.weight"].shape == (1008, 2048)
    assert keys["Mixed_7b.branch3x3dbl_1.conv.weight"].shape == (448, 1280, 1, 1)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({k: v for k, v in keys.items() if not k.endswith("num_batches_tracked")}, path)  # like the real file
    loaded = load_inception(str(path))
    f = fid.network_features(loaded, mnist_rgb32(2), device="cpu")
    assert f.shape == (2, 2048) and np.isfinite(f).all()


def test_missing_or_wrong_inception_weights_say_what_to_do(tmp_path):
    with pytest.raises(InceptionWeightsError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_inception(str(tmp_path / "absent.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InceptionWeightsError, match=r"other.pth: not the FID Inception weights"):
        load_inception(str(tmp_path / "other.pth"))
