"""`dcgan train`: train or resume a run on Ray Train (local, or the cluster RAY_ADDRESS names)."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) the DCGAN on a sharded dataset with Ray Train")
    p.add_argument("--config", help="YAML config (default: the paper's 64x64 model and training)")
    p.add_argument("--data", help="dataset URI (a directory or s3:// prefix holding manifest.json)")
    p.add_argument("--run", help="run URI: checkpoints, samples and metrics go here")
    p.add_argument("--workers", type=int, help="Ray Train workers (one per GPU)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="one GPU per worker, or none (default: cluster.use_gpu of the config)")
    p.add_argument("--steps", type=int, help="total training steps")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dcgan.config import load_config
    from dcgan.train import train

    cfg = load_config(args.config, {
        "data": args.data, "run": args.run, "cluster.workers": args.workers, "cluster.use_gpu": args.gpu,
        "train.steps": args.steps, "cluster.address": args.address,
    })
    summary = train(cfg)
    print(json.dumps(summary, indent=2, default=str))
    return 0
