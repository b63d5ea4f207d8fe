"""The paper's generator and discriminator (section 3 guidelines).

G: z -> dense projection to 4x4xC (BN, ReLU) -> fractionally-strided convs, each doubling the side and halving the
width (BN, ReLU), the last one to RGB with Tanh and no BN. D mirrors it with strided convs and LeakyReLU(0.2), no BN on
its input layer, and one dense logit. No pooling, no hidden fully connected layers, no conv biases (BN carries them).
Weights N(0, 0.02), BN scale N(1, 0.02), biases 0. With no arguments both build the authors' 64x64 model; an explicit
conv stack in the config (g_channels/g_strides, d_channels/d_strides) adds stride-1 layers as in their 32x32 models.

Layer: dcgan.
"""

from __future__ import annotations

import torch
from torch import nn

from dcgan.config import ModelConfig


def _padding(kernel_size: int, stride: int = 2) -> tuple[int, int]:
    """(padding, output_padding) so that a stride-2 (transposed) conv exactly halves (doubles) the side and a stride-1
    one keeps it (odd kernels only; the config refuses even ones at stride 1)."""
    if stride == 1:
        return kernel_size // 2, 0
    return {5: (2, 1), 4: (1, 0), 3: (1, 1)}[kernel_size]


def generator_stack(cfg: ModelConfig) -> tuple[list[int], list[int], int]:
    """(widths, strides, kernel) of G's transposed convs: widths[0] is the projection's, widths[-1] the image's."""
    if cfg.g_channels is not None and cfg.g_strides is not None:
        return [*cfg.g_channels, cfg.channels], list(cfg.g_strides), cfg.g_kernel_size or cfg.kernel_size
    n = cfg.n_up
    return [cfg.ngf * 2 ** (n - 1 - i) for i in range(n)] + [cfg.channels], [2] * n, cfg.kernel_size  # 1024..128 3


def discriminator_stack(cfg: ModelConfig) -> tuple[list[int], list[int], int]:
    """(widths, strides, kernel) of D's convs: widths are the outputs, the image's channels go in."""
    if cfg.d_channels is not None and cfg.d_strides is not None:
        return list(cfg.d_channels), list(cfg.d_strides), cfg.d_kernel_size or cfg.kernel_size
    return [cfg.ndf * 2**i for i in range(cfg.n_up)], [2] * cfg.n_up, cfg.kernel_size  # 64px: 128 256 512 1024


def init_weights(module: nn.Module) -> None:
    """Paper section 4: all weights from N(0, 0.02); BN scale N(1, 0.02) as in the authors' code; biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z (N, z_dim) -> image (N, channels, resolution, resolution) in [-1, 1]."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        widths, strides, k = generator_stack(cfg)
        self.base_channels = widths[0]
        self.project = nn.Linear(cfg.z_dim, widths[0] * 16, bias=False)
        self.project_bn = nn.BatchNorm2d(widths[0])
        blocks = []
        for i, s in enumerate(strides):
            last = i == len(strides) - 1
            pad, out_pad = _padding(k, s)
            layers: list[nn.Module] = [nn.ConvTranspose2d(widths[i], widths[i + 1], k, s, pad, out_pad, bias=False)]
            layers += [nn.Tanh()] if last else [nn.BatchNorm2d(widths[i + 1]), nn.ReLU(inplace=True)]
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward_features(z)[-1]

    def forward_features(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Activations after the projection and after every block (the last one is the image)."""
        h = self.project(z.flatten(1)).view(z.shape[0], self.base_channels, 4, 4)
        h = torch.relu(self.project_bn(h))
        outs = [h]
        for block in self.blocks:
            h = block(h)
            outs.append(h)
        return outs


def sample_z(cfg: ModelConfig, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """The paper's prior: U[-1, 1]^z_dim (or N(0, 1) for the dcgan.torch convention)."""
    if cfg.z_dist == "uniform":
        z = torch.rand(n, cfg.z_dim, generator=generator) * 2 - 1
    else:
        z = torch.randn(n, cfg.z_dim, generator=generator)
    return z.to(device) if device is not None else z


class Discriminator(nn.Module):
    """image (N, channels, R, R) in [-1, 1] -> one logit per image (N,)."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        widths, strides, k = discriminator_stack(cfg)
        blocks, c_in, side = [], cfg.channels, cfg.resolution
        for i, (c_out, s) in enumerate(zip(widths, strides)):
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, s, _padding(k, s)[0], bias=False)]
            if i > 0:  # no BN on D's input layer (paper section 3)
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            blocks.append(nn.Sequential(*layers))
            c_in, side = c_out, side // s
        self.blocks = nn.ModuleList(blocks)
        self.widths, self.strides, self.final_side = widths, strides, side
        self.head = nn.Linear(c_in * side * side, 1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.blocks:
            h = block(h)
        return self.head(h.flatten(1)).squeeze(1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activation of every convolutional layer (after its nonlinearity), input layer first."""
        outs, h = [], x
        for block in self.blocks:
            h = block(h)
            outs.append(h)
        return outs


def layer_table(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, layer type, output shape without batch, parameter count) for every leaf module, in call order."""
    rows: list[tuple[str, str, tuple[int, ...], int]] = []
    hooks = []
    for name, m in model.named_modules():
        if len(list(m.children())) == 0:
            def hook(mod, _inp, out, name=name):
                n_params = sum(p.numel() for p in mod.parameters(recurse=False))
                rows.append((name, type(mod).__name__, tuple(out.shape[1:]), n_params))
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return rows


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
