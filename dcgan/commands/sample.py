"""`dcgan sample`: a grid of samples from a run's checkpoint."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("sample", help="write a PNG grid of samples from a checkpoint")
    p.add_argument("--run", required=True, help="run URI")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bn", choices=["batch", "running"], default="batch",
                   help="BatchNorm statistics: the batch's own (authors' code) or the running averages")
    p.add_argument("--out", default="samples.png", help="PNG path or URI")
    p.set_defaults(func=run)


def run(args) -> int:
    import math

    import torch

    from dcgan.checkpoints import load_models
    from dcgan.networks import sample_z
    from dcgan.sampling import generate, save_grid

    loaded = load_models(args.run, args.step)
    z = sample_z(loaded.config.model, args.n, generator=torch.Generator().manual_seed(args.seed))
    images = generate(loaded.generator, z, bn=args.bn)
    save_grid(images, args.out, nrow=max(1, math.isqrt(args.n - 1) + 1) if args.n > 1 else 1)
    print(f"{args.n} samples from {args.run} step {loaded.step} -> {args.out}")
    return 0
