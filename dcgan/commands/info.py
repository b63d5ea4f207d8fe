"""`dcgan info --config X`: the layer table, parameter counts and D feature dimension of a config's networks.

Layer: dcgan.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("info", help="print the networks' layer table and parameter counts",
                       description="Print G's and D's layers, output shapes and parameter counts for a config, and "
                                   "the size of D's feature vector used by the CIFAR-10/SVHN evaluation.")
    p.add_argument("--config", help="YAML config (default: the paper's 64x64 model)")
    p.set_defaults(func=run)


def _print_table(title: str, model, rows) -> None:
    """One line per layer; convolutions also show kernel and stride (`3x3 s2`), the rest of the released layer list."""
    modules = dict(model.named_modules())
    print(f"\n{title}")
    print(f"  {'layer':<22}{'type':<18}{'kernel':<10}{'output':<20}{'params':>12}")
    for name, kind, shape, n in rows:
        m = modules[name]
        kernel = f"{m.kernel_size[0]}x{m.kernel_size[1]} s{m.stride[0]}" if hasattr(m, "stride") else ""
        print(f"  {name:<22}{kind:<18}{kernel:<10}{'x'.join(map(str, shape)):<20}{n:>12,}")


def run(args) -> int:
    import torch

    from dcgan.config import load_config
    from dcgan.networks import Discriminator, Generator, layer_table, parameter_count

    cfg = load_config(args.config)
    m = cfg.model
    g, d = Generator(m), Discriminator(m)
    z = torch.zeros(2, m.z_dim)
    x = torch.zeros(2, m.channels, m.resolution, m.resolution)
    print(f"config: {args.config or '(paper defaults)'}  resolution {m.resolution}  z {m.z_dim}-d {m.z_dist}")
    _print_table(f"Generator: {parameter_count(g):,} parameters", g, layer_table(g, z))
    _print_table(f"Discriminator: {parameter_count(d):,} parameters", d, layer_table(d, x))
    from dcgan.evaluation.features import feature_dim

    print(f"\nD features (every conv layer max-pooled to 4x4, concatenated): {feature_dim(d):,}-d")
    return 0
