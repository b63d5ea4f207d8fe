"""Sample quality: FID and KID between generated samples and a dataset's images.

Numbers match the reference implementations on the same features:
- FID: pytorch-fid's `calculate_frechet_distance` (mean and `np.cov(rowvar=False)` of the activations in float64,
  scipy.linalg.sqrtm of sigma1 @ sigma2, eps*I added to both when the root is not finite, imaginary parts dropped
  when negligible), on the 2048-d pool features of the FID Inception (dcgan.evaluation.inception).
- KID: torch-fidelity's `kid` (Binkowski et al. 2018): unbiased MMD^2 with the polynomial kernel
  (x.y / d + 1)^3, averaged over `subsets` random subsets of `subset_size` per set (defaults 100 and 1000, seed 2020);
  the subset size shrinks to the smaller set when fewer images exist, and the size used is reported.
Any feature function can stand in for Inception (the tests use a small network), via `feature_fn`.

Layer: dcgan.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from dcgan.evaluation.features import resolve_device


def activation_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as pytorch-fid computes them."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"FID needs at least 2 feature vectors, got shape {f.shape}")
    return np.mean(f, axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), pytorch-fid's calculate_frechet_distance."""
    from scipy import linalg  # here, not at import: ~0.09 s of every evaluation's start, and only this needs it

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics differ in shape: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in the matrix square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    return frechet_distance(*activation_statistics(f1), *activation_statistics(f2))


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                             coef0: float = 1.0) -> float:
    """Unbiased MMD^2 with k(a, b) = (gamma a.b + coef0)^degree, gamma = 1/d by default (torch-fidelity's mmd2)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    k_xx = (x @ x.T * gamma + coef0) ** degree
    k_yy = (y @ y.T * gamma + coef0) ** degree
    k_xy = (x @ y.T * gamma + coef0) ** degree
    m = len(x)
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid_from_features(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 2020) -> dict:
    """{"kid_mean", "kid_std", "kid_subset_size", "kid_subsets"} as torch-fidelity computes them."""
    size = min(subset_size, len(f1), len(f2))
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {len(f1)} and {len(f2)}")
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        a = f1[rng.choice(len(f1), size, replace=False)]
        b = f2[rng.choice(len(f2), size, replace=False)]
        mmds[i] = polynomial_mmd2_unbiased(a, b)
    return {"kid_mean": float(mmds.mean()), "kid_std": float(mmds.std()), "kid_subset_size": size,
            "kid_subsets": subsets}


@torch.no_grad()
def network_features(net: torch.nn.Module, images: np.ndarray, batch_size: int = 64,
                     device: str | torch.device | None = None) -> np.ndarray:
    """(N, F) float64 features of uint8 NHWC images through `net` (which takes uint8 NHWC tensors)."""
    device = resolve_device(device)
    net = net.to(device).eval()
    out = [net(torch.as_tensor(images[i : i + batch_size]).to(device)).double().cpu().numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def sample_quality(samples: np.ndarray, reference: np.ndarray, feature_fn: Callable[[np.ndarray], np.ndarray],
                   kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
    """FID and KID of uint8 NHWC `samples` against `reference` images through `feature_fn`."""
    fs, fr = feature_fn(samples), feature_fn(reference)
    out = {"fid": fid_from_features(fs, fr), "n_samples": int(len(samples)), "n_reference": int(len(reference))}
    out.update(kid_from_features(fs, fr, kid_subsets, kid_subset_size))
    return out
