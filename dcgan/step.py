"""One DCGAN training step (paper section 4): D on a real and a fake batch, then G, non-saturating losses.

Written for throughput: the losses are BCE-with-logits (safe under autocast), images arrive as uint8 NHWC and are
scaled on the device (permuting NHWC gives channels_last for free), metrics stay on the device until the caller asks
(no per-step host syncs), optional bf16 autocast, channels_last, torch.compile and fused Adam. With several workers the
gradients are averaged by one flat all-reduce per network: a GAN step runs D forward three times per backward pair,
which DDP's one-forward-one-backward contract does not fit (StyleGAN2-ADA averages gradients the same way). BatchNorm
then normalises over the global batch (dcgan.batchnorm) and z is drawn for the global batch from (seed, step), each
worker taking its slice: N workers train exactly as one worker with the same global batch.

Layer: dcgan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dcgan.batchnorm import convert_batchnorm
from dcgan.config import ModelConfig, TrainConfig
from dcgan.networks import sample_z

METRICS = ("loss_d", "loss_g", "d_x", "d_g_z")


@dataclass
class StepOptions:
    """How the step runs on this hardware; `resolve` picks the fast settings for the device."""

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    fused_adam: bool = False
    fp64: bool = False  # float64 weights and inputs: float32 rounding, amplified by Adam, cannot hide a real difference

    @classmethod
    def resolve(cls, train: TrainConfig, device: torch.device) -> "StepOptions":
        gpu = device.type == "cuda"
        bf16 = train.precision == "bf16" or (train.precision == "auto" and gpu)
        return cls(
            bf16=bf16,
            channels_last=gpu if train.channels_last is None else train.channels_last,
            compile=gpu if train.compile is None else train.compile,
            fused_adam=gpu,
            fp64=train.precision == "fp64",
        )


def make_optimizers(g: nn.Module, d: nn.Module, train: TrainConfig, fused: bool = False):
    """Adam(lr 2e-4, betas (0.5, 0.999)) for each network; L2 weight decay as the authors' code optionally had."""
    kw = dict(lr=train.lr, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay)
    if fused:
        kw["fused"] = True
    return torch.optim.Adam(g.parameters(), **kw), torch.optim.Adam(d.parameters(), **kw)


def to_model_input(batch: torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1] on `device` (paper: no other pre-processing)."""
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Logits for the losses in at least fp32 (bf16 under autocast; fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def step_z(cfg: ModelConfig, seed: int, step: int, n: int) -> torch.Tensor:
    """The global batch's z at `step`: a function of (seed, step) alone, so neither the number of workers nor a
    resume changes it. Drawn on the CPU (a few KB per step)."""
    gen = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + step) % 2**63)
    return sample_z(cfg, n, generator=gen)


def _allreduce_grads(params: list[nn.Parameter]) -> None:
    """Average gradients over the workers with one flat all-reduce."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


class GANStep:
    """Callable that trains G and D on one batch of real images and returns device-side metrics."""

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        device: torch.device,
        options: StepOptions | None = None,
        distributed: bool = False,
    ):
        self.options = options or StepOptions.resolve(train_cfg, device)
        self.rank, self.world = 0, 1
        if distributed:
            import torch.distributed as dist

            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            convert_batchnorm(generator)  # in place: the optimizers' parameters stay the same objects
            convert_batchnorm(discriminator)
        self.device = device
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        fmt = torch.channels_last if self.options.channels_last else torch.contiguous_format
        dtype = torch.float64 if self.options.fp64 else None
        self.g_module = generator.to(device=device, dtype=dtype, memory_format=fmt)  # the same Parameter objects
        self.d_module = discriminator.to(device=device, dtype=dtype, memory_format=fmt)
        self.g = torch.compile(self.g_module) if self.options.compile else self.g_module
        self.d = torch.compile(self.d_module) if self.options.compile else self.d_module
        self.opt_g, self.opt_d = opt_g, opt_d
        self.distributed = distributed
        self.g_params = list(self.g_module.parameters())
        self.d_params = list(self.d_module.parameters())
        self.iteration = 0

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.options.bf16)

    def __call__(self, real: torch.Tensor) -> torch.Tensor:
        """`real`: uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1]. Returns (loss_d, loss_g, D(x), D(G(z)))."""
        if real.dtype == torch.uint8:
            real = to_model_input(real, self.device, self.options.channels_last)
            if self.options.fp64:
                real = real.double()
        n = real.shape[0]
        z = step_z(self.model_cfg, self.train_cfg.seed, self.iteration, n * self.world)
        z = z[self.rank * n : (self.rank + 1) * n].to(self.device, real.dtype, non_blocking=True)  # this rank's slice
        alternate = self.train_cfg.alternate_updates
        update_d = not alternate or self.iteration % 2 == 0
        update_g = not alternate or self.iteration % 2 == 1
        self.iteration += 1
        zero = torch.zeros((), device=self.device)

        with self._autocast():
            fake = self.g(z)
        loss_d, d_x, d_gz = zero, zero, zero
        if update_d:
            self.opt_d.zero_grad(set_to_none=True)
            with self._autocast():
                logit_real = _wide(self.d(real))
                logit_fake = _wide(self.d(fake.detach()))
            # BCE with logits: -log D(x) - log(1 - D(G(z))) == softplus(-l_real) + softplus(l_fake)
            loss_d = F.softplus(-logit_real).mean() + F.softplus(logit_fake).mean()
            loss_d.backward()
            if self.distributed:
                _allreduce_grads(self.d_params)
            self.opt_d.step()
            d_x = torch.sigmoid(logit_real.detach()).mean()
        loss_g = zero
        if update_g:
            self.opt_g.zero_grad(set_to_none=True)
            with self._autocast():
                logit_gen = _wide(self.d(fake))
            loss_g = F.softplus(-logit_gen).mean()  # non-saturating: maximise log D(G(z))
            loss_g.backward(inputs=self.g_params)  # no D weight gradients in the G update
            if self.distributed:
                _allreduce_grads(self.g_params)
            self.opt_g.step()
            d_gz = torch.sigmoid(logit_gen.detach()).mean()
        return torch.stack([loss_d.detach(), loss_g.detach(), d_x, d_gz])
