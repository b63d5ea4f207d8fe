"""`dcgan dedup URI [--out URI]`: de-duplicate an existing dataset into a new version beside it.

The source is never modified: the result is a new dataset (default `<URI>-dedup`, a sibling version such as
`datasets/lsun-bedroom/v1-dedup`); see `preprocessing.dedup.dedup_dataset`.

Layer: dcgan.
"""

from __future__ import annotations

from dcgan.commands import add_config_flags, config_of, finish, given_location


def register(sub) -> None:
    p = sub.add_parser("dedup", help="de-duplicate a dataset with the paper's autoencoder semantic hash",
                       description="Train the paper's 3072-128-3072 denoising autoencoder on the dataset's 32x32 "
                                   "center crops and remove images whose binarised codes collide (section 4.1), "
                                   "writing a new dataset; the source is never modified.")
    p.add_argument("uri", help="dataset to de-duplicate (local path or s3://)")
    p.add_argument("--out", help="where the de-duplicated version goes (default: <URI>-dedup)")
    add_config_flags(p)
    p.add_argument("--radius", type=int, dest="dedup.radius",
                   help="Hamming radius: 0 = identical codes only (linear time, the paper's)")
    p.add_argument("--views", type=int, dest="dedup.views",
                   help="crops hashed per image: 1 = the paper's single center-crop hash (default 135)")
    p.add_argument("--epochs", type=int, dest="dedup.epochs", help="autoencoder training epochs (default 10)")
    p.add_argument("--seed", type=int, dest="dedup.seed", help="seed of the autoencoder's training (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset this project wrote at --out")
    p.set_defaults(func=run)


def call_of(args):
    from dcgan.stages import StageCall

    source = given_location(args.uri, "URI")
    out = given_location(args.out, "--out") or source + "-dedup"
    return StageCall("dedup", config_of(args), {"source": source, "out": out, "overwrite": args.overwrite})


def summary(r: dict) -> str:
    c = r["counts"]
    return (f"{r['source']} -> {r['dataset']}: {c['rows']} rows ({c.get('duplicates_removed', 0)} near duplicates "
            f"removed; report {r['report']}, picture {r['picture']})")


def run(args) -> int:
    return finish(args, call_of(args), summary)
