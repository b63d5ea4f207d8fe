"""`dcgan sample`: a grid of samples from a run's checkpoint.

Layer: dcgan.
"""

from __future__ import annotations

import argparse


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(sub) -> None:
    p = sub.add_parser("sample", help="write a PNG grid of samples from a checkpoint",
                       description="Draw z from the run's prior and write G's samples as one PNG grid.")
    p.add_argument("--run", required=True, help="run URI")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest valid one)")
    p.add_argument("--n", type=positive, default=64, help="number of samples (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the z drawn (default 0)")
    p.add_argument("--bn", choices=["batch", "running"], default="batch",
                   help="BatchNorm statistics: the batch's own (authors' code) or the running averages")
    p.add_argument("--out", help="PNG path or URI (default: <run>/samples/sample-step-NNNNNNN-seed-S.png)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    import math

    import torch

    from dcgan import run_layout
    from dcgan.checkpoints import load_models
    from dcgan.networks import sample_z
    from dcgan.sampling import generate, save_grid
    from preprocessing import storage
    from preprocessing.errors import InputError

    from dcgan.commands import given_location

    run_uri = given_location(args.run, "--run")
    out = given_location(args.out, "--out")
    if out and storage.exists(out) and not args.overwrite:
        raise InputError(f"--out {args.out} exists; pass --overwrite to replace it, or choose another file")
    loaded = load_models(run_uri, args.step)
    out = out or run_layout.sample_grid(run_uri, loaded.step, args.seed)
    z = sample_z(loaded.config.model, args.n, generator=torch.Generator().manual_seed(args.seed))
    images = generate(loaded.generator, z, bn=args.bn)
    save_grid(images, out, nrow=max(1, math.isqrt(args.n - 1) + 1) if args.n > 1 else 1)
    print(f"{args.n} samples from {run_uri} step {loaded.step} -> {out}")
    return 0
