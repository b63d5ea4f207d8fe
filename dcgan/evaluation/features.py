"""The paper's discriminator features (section 5.1), as the authors' released evaluation script computes them.

1. BatchNorm population statistics are re-estimated on the labelled training images (the running averages of a GAN
   run describe a mix of real and generated batches, not the images being classified).
2. Pixels are scaled to [-1, 1], as in training.
3. The activation of every convolutional layer of D is max-pooled to a 4x4 grid, flattened, and all are concatenated:
   16 x (sum of D's widths) numbers per image; 28672 for the authors' 32x32 ImageNet model (configs/imagenet-32.yaml).

Extraction is batched, gradient-free, channels-last on GPU, and writes into one preallocated float32 matrix, so a
50,000 x 28,672 CIFAR-10 training set costs its 5.7 GB and nothing more.

Layer: dcgan.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcgan.step import to_model_input

POOL_GRID = 4  # every layer is max-pooled to POOL_GRID x POOL_GRID


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else the GPU when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def feature_dim(d: nn.Module, grid: int = POOL_GRID) -> int:
    """Length of the feature vector of `Discriminator` d: grid^2 per channel of every conv layer."""
    return int(sum(d.widths)) * grid * grid


def check_images(images: np.ndarray, d: nn.Module, name: str = "images") -> None:
    """(N, R, R, C) uint8 at D's resolution and channel count, or a ValueError naming `name` and the mismatch."""
    cfg = d.cfg
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"{name}: expected (N, H, W, C) uint8 images, got shape {shape} dtype {dtype}")
    _, h, w, c = images.shape
    if (h, w) != (cfg.resolution, cfg.resolution):
        raise ValueError(
            f"{name}: images are {h}x{w} but the discriminator takes {cfg.resolution}x{cfg.resolution} "
            f"(the paper's CIFAR-10/SVHN features use a 32x32 model, e.g. configs/imagenet-32.yaml)"
        )
    if c != cfg.channels:
        raise ValueError(f"{name}: images have {c} channels but the discriminator takes {cfg.channels}")


def to_input(batch: np.ndarray | torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] on `device`: training's conversion, for numpy batches too."""
    return to_model_input(torch.as_tensor(batch), device, channels_last)


def batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, len(images), batch_size):
        yield start, images[start : start + batch_size]


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_batchnorm(
    d: nn.Module, images: np.ndarray, batch_size: int = 128, device: str | torch.device | None = None
) -> nn.Module:
    """Replace D's BatchNorm running statistics by their average over `images`; leaves D in eval mode.

    The authors' script averages the per-batch means and variances over the training set; `momentum=None` makes
    PyTorch keep that cumulative average (of unbiased batch variances; theirs were biased, a factor
    (m-1)/m apart). D is changed in place (and returned).
    """
    device = resolve_device(device)
    d.to(device)
    bns = _batchnorms(d)
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    d.train()
    try:
        for _, batch in batches(images, batch_size):
            d.features(to_input(batch, device))
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum
        d.eval()
    return d


def pooled_features(d: nn.Module, x: torch.Tensor, grid: int = POOL_GRID) -> torch.Tensor:
    """(N, feature_dim) for a float batch in [-1, 1]: each conv layer max-pooled to grid x grid, concatenated."""
    return torch.cat([F.adaptive_max_pool2d(h, grid).flatten(1) for h in d.features(x)], dim=1)


@torch.no_grad()
def extract_features(
    d: nn.Module,
    images: np.ndarray,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    channels_last: bool | None = None,
    grid: int = POOL_GRID,
    name: str = "images",
) -> np.ndarray:
    """(N, feature_dim) float32 features of uint8 NHWC images with D in eval mode (call reestimate_batchnorm first)."""
    check_images(images, d, name)
    device = resolve_device(device)
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    d.to(device).eval()
    if channels_last:
        d.to(memory_format=torch.channels_last)
    out = np.empty((len(images), feature_dim(d, grid)), dtype=np.float32)
    for start, batch in batches(images, batch_size):
        f = pooled_features(d, to_input(batch, device, channels_last), grid)
        out[start : start + len(batch)] = f.float().cpu().numpy()
    return out


def discriminator_features(
    d: nn.Module,
    labelled: np.ndarray,
    *others: np.ndarray,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    names: tuple[str, ...] = (),
) -> list[np.ndarray]:
    """The whole protocol: re-estimate BN on `labelled`, then features of `labelled` and of every other set."""
    names = names or tuple(f"set {i}" for i in range(1 + len(others)))
    check_images(labelled, d, names[0])
    for arr, nm in zip(others, names[1:]):
        check_images(arr, d, nm)
    reestimate_batchnorm(d, labelled, batch_size=128, device=device)  # the authors' minibatch
    return [extract_features(d, arr, batch_size, device, name=nm) for arr, nm in zip((labelled, *others), names)]
