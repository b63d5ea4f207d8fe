"""Guided backpropagation of D's last convolutional features (paper section 6.2, figure 5; Springenberg et al.).

The gradient of one channel's strongest response with respect to the input image, where every rectifier passes a
gradient only where both its input and the incoming gradient are positive. D's LeakyReLUs are treated as ReLUs on
the way back (their negative slope would otherwise leak gradients the method is meant to cut). BatchNorm runs on
its running statistics, so each image's map does not depend on the rest of the batch.

Layer: dcgan.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from dcgan.evaluation.features import to_input


class _GuidedRectifier(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, slope):
        ctx.save_for_backward(x)
        return torch.where(x > 0, x, x * slope)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0).to(grad.dtype), None


class GuidedLeakyReLU(nn.Module):
    def __init__(self, slope: float):
        super().__init__()
        self.slope = slope

    def forward(self, x):
        return _GuidedRectifier.apply(x, self.slope)


def guided_copy(d: nn.Module) -> nn.Module:
    """A copy of D with every (Leaky)ReLU replaced by its guided version, in eval mode."""
    g = copy.deepcopy(d).eval()
    for module in list(g.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.LeakyReLU):
                setattr(module, name, GuidedLeakyReLU(child.negative_slope))
            elif isinstance(child, nn.ReLU):
                setattr(module, name, GuidedLeakyReLU(0.0))
    return g


def top_channels(d: nn.Module, images: np.ndarray, k: int = 6, batch_size: int = 128) -> list[int]:
    """The `k` channels of D's last conv layer with the largest mean (over images) spatial-max response."""
    device = next(d.parameters()).device
    d.eval()
    with torch.no_grad():
        peaks = torch.cat([d.features(to_input(images[i : i + batch_size], device))[-1].amax((2, 3)).cpu()
                           for i in range(0, len(images), batch_size)])
    return peaks.mean(0).topk(min(k, peaks.shape[1])).indices.tolist()


def guided_maps(d: nn.Module, images: np.ndarray, channels: list[int], per_channel: int = 4,
                batch_size: int = 128) -> tuple[torch.Tensor, int]:
    """(tiles, nrow): for each channel, its `per_channel` most activating images and, beneath, their guided maps.

    Maps are normalised per image to [-1, 1] (mean 0, 3 std clipped) so they render like images.
    """
    device = next(d.parameters()).device
    gd = guided_copy(d).to(device)
    with torch.no_grad():
        acts = torch.cat([gd.features(to_input(images[i : i + batch_size], device))[-1].amax((2, 3)).cpu()
                          for i in range(0, len(images), batch_size)])
    tiles = []
    for ch in channels:
        top = acts[:, ch].topk(min(per_channel, len(images))).indices
        x = to_input(images[top.numpy()], device).requires_grad_(True)
        response = gd.features(x)[-1][:, ch].amax((1, 2)).sum()
        (grad,) = torch.autograd.grad(response, x)
        grad = grad.detach().cpu()
        grad = grad - grad.mean(dim=(1, 2, 3), keepdim=True)
        grad = grad / (3 * grad.std(dim=(1, 2, 3), keepdim=True) + 1e-12)
        tiles += [x.detach().cpu(), grad.clamp(-1, 1)]
    return torch.cat(tiles), len(top)
