"""Cross-replica BatchNorm (as BigGAN trains): batch statistics over the global batch of all workers.

With the global batch split over N workers, per-worker BatchNorm normalises over batch/N images, so a run's result
would depend on how many GPUs it had. Here a training-mode forward all-reduces each channel's sum, sum of squares and
count in one collective whose backward is its own (`_AllReduceSum`, as torch's SyncBatchNorm has its own autograd
function): the gradient of a sum over ranks is the sum of the ranks' gradients, so backward all-reduces too. Older
torch releases silently skip the backward of the functional all-reduce, so this does not rely on it: forward and
backward are those of one BatchNorm over the concatenated batch on every torch the project accepts, and the running
statistics are identical on every rank. torch.nn.SyncBatchNorm refuses CPU tensors; this works on gloo (the tests)
and NCCL alike. Not distributed, world size 1, or in
eval mode, it is exactly nn.BatchNorm2d; it adds no parameter or buffer, so state_dict keys stay those of
nn.BatchNorm2d and checkpoints load into the plain networks.

Layer: dcgan.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


def _world_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum of `t` over the ranks, out of place (the input stays as autograd saved it)."""
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x; dL/dx = sum over ranks of dL/dy (every rank's loss depends on every rank's x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce_sum(grad.contiguous(), ctx.group), None


class CrossReplicaBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics cover the batches of every rank in `process_group`."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group
        self.cross_replica = True  # False: this rank's batch only (see `local_statistics`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.cross_replica and _world_size(self.process_group) > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics also under bf16 autocast
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), xf.new_full((1,), x.numel() // c)])
        total = _AllReduceSum.apply(local, self.process_group or dist.group.WORLD)
        n = total[2 * c]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0)  # biased, for normalising (as nn.BatchNorm2d)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * (n / (n - 1)).detach())
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """nn.BatchNorm2d's rule: exponential average with `momentum`, or the cumulative mean when it is None."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def convert_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every nn.BatchNorm2d under `module` by CrossReplicaBatchNorm2d, in place, keeping the very same
    parameters and buffers (an optimizer built before still holds them; state_dict keys are unchanged)."""
    if type(module) is nn.BatchNorm2d:
        bn = CrossReplicaBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats, process_group=process_group)
        bn._parameters, bn._buffers = module._parameters, module._buffers
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        converted = convert_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module


@contextlib.contextmanager
def local_statistics(module: nn.Module) -> Iterator[nn.Module]:
    """Normalise over this rank's batch only, e.g. rank 0 drawing a sample grid while the other ranks do not run
    the network (a collective there would wait forever)."""
    bns = [m for m in module.modules() if isinstance(m, CrossReplicaBatchNorm2d)]
    saved = [m.cross_replica for m in bns]
    for m in bns:
        m.cross_replica = False
    try:
        yield module
    finally:
        for m, s in zip(bns, saved):
            m.cross_replica = s
