"""Turning generator output into pictures: uint8 conversion, image grids, PNG files on any storage URI.

Layer: dcgan.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import cv2
import numpy as np
import torch
from torch import nn

from preprocessing import storage


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """NCHW floats in [-1, 1] (or NHWC uint8, returned as is) -> NHWC uint8."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        return images if images.ndim == 4 else images[None]
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim == 3:
        x = x[None]
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def grid(images: torch.Tensor | np.ndarray, nrow: int = 8, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile N images into one HxWxC uint8 picture, `nrow` per row, separated by `pad` pixels of `fill`."""
    imgs = to_uint8(images)
    n, h, w, c = imgs.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    out = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[y : y + h, x : x + w] = imgs[i]
    return out


def encode_png(image: np.ndarray) -> bytes:
    """HxWx{1,3} uint8 RGB -> PNG bytes."""
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def save_png(image: np.ndarray, uri: str) -> str:
    storage.write_bytes(uri, encode_png(image))
    return uri


def save_grid(images: torch.Tensor | np.ndarray, uri: str, nrow: int = 8, pad: int = 2) -> str:
    """Write images as one PNG grid to a local path or s3:// URI; returns the URI."""
    return save_png(grid(images, nrow=nrow, pad=pad), uri)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Run BatchNorm on the batch's own statistics without touching the running averages.

    The authors' code always sampled with batch statistics; a short run's running averages can lag the weights.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.train()
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield model
    finally:
        model.train(was_training)
        for m, (training, momentum, tracked) in zip(bns, saved):
            m.train(training)
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


@torch.no_grad()
def generate(generator: nn.Module, z: torch.Tensor, bn: str = "batch", batch_size: int = 256) -> torch.Tensor:
    """G(z) in chunks; `bn` = "batch" (authors' sampling) or "running" (eval-mode BatchNorm)."""
    param = next(generator.parameters())
    ctx = batch_statistics(generator) if bn == "batch" else _eval_mode(generator)
    outs = []
    with ctx:
        for i in range(0, len(z), batch_size):  # z in the weights' dtype (a float64 check run's too)
            outs.append(generator(z[i : i + batch_size].to(param.device, param.dtype)).float().cpu())
    return torch.cat(outs)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
