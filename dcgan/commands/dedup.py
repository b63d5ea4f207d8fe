"""`dcgan dedup URI [--out URI] [--radius r]`: de-duplicate an existing dataset into a new version beside it.

The source is never modified: the result is a new dataset (default `<URI>-dedup`, a sibling version directory such as
`datasets/lsun-bedroom/v1-dedup`) whose manifest copies the source's kind, resolution, counts of inputs, rejects and
build parameters and adds the dedup figures. Reject files are copied, so the new version stands on its own.
"""

from __future__ import annotations


from preprocessing import storage


def register(sub) -> None:
    p = sub.add_parser("dedup", help="de-duplicate a dataset with the paper's autoencoder semantic hash")
    p.add_argument("uri", help="dataset to de-duplicate (local path or s3://)")
    p.add_argument("--out", help="where the de-duplicated version goes (default: <URI>-dedup)")
    p.add_argument("--config", help="YAML config whose `dedup:` section sets the hashing model (default: paper's)")
    p.add_argument("--radius", type=int, help="Hamming radius: 0 = identical codes only (linear time)")
    p.add_argument("--epochs", type=int, help="autoencoder training epochs")
    p.add_argument("--seed", type=int, help="seed of the autoencoder's training")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.set_defaults(func=run)


def default_out(uri: str) -> str:
    return storage.normalize(uri) + "-dedup"


def run(args) -> int:
    from dcgan.config import load_config
    from preprocessing.dedup import dedup_dataset

    cfg = load_config(args.config, {"dedup.radius": args.radius, "dedup.epochs": args.epochs,
                                    "dedup.seed": args.seed}).dedup
    src = storage.normalize(args.uri)
    out = storage.normalize(args.out) if args.out else default_out(src)
    new = dedup_dataset(src, out, cfg, overwrite=args.overwrite)
    info = new["dedup"]
    print(f"{src}: {info['rows_in']} rows -> {out}: {new['counts']['rows']} rows "
          f"({info['removed']} near duplicates removed in {info['groups']} groups; "
          f"report {storage.join(out, info['report'])}, picture {storage.join(out, info['picture'])})")
    return 0
