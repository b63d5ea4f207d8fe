"""`dcgan train`: train or resume a run on Ray Train (a local Ray, the cluster this machine is on, or a Ray Job).

Layer: dcgan.
"""

from __future__ import annotations

import argparse

from dcgan.commands import add_config_flags, config_of, finish


def register(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) the DCGAN on a sharded dataset with Ray Train",
                       description="Train the paper's DCGAN on a dataset with Ray Train (one worker per GPU), "
                                   "resuming the run from its newest valid checkpoint.")
    add_config_flags(p)
    p.add_argument("--data", help="dataset location (a folder or s3:// prefix holding manifest.json)")
    p.add_argument("--run", help="run location: checkpoints, samples and metrics go here")
    p.add_argument("--workers", type=int, dest="cluster.workers", help="Ray Train workers (one per GPU)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, dest="cluster.use_gpu",
                   help="one GPU per worker (default: the config's cluster.use_gpu)")
    p.add_argument("--steps", type=int, dest="train.steps", help="total training steps (generator updates)")
    p.set_defaults(func=run)


def summary(r: dict) -> str:
    m = r.get("metrics") or {}
    figures = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float) and k not in ("epoch", "step"))
    return f"run {r['run']} at step {r['step']}: checkpoint {r['checkpoint']}, samples {r['samples']}" + (
        f"\n{figures}" if figures else "")


def run(args) -> int:
    from dcgan.stages import StageCall

    return finish(args, StageCall("train", config_of(args)), summary)
