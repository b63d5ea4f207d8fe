"""`dcgan dedup URI [--out URI] [--radius r]`: de-duplicate an existing dataset into a new version beside it.

The source is never modified: the result is a new dataset (default `<URI>-dedup`, a sibling version directory such as
`datasets/lsun-bedroom/v1-dedup`) whose manifest copies the source's kind, resolution, counts of inputs, rejects and
build parameters and adds the dedup figures. Reject files are copied, so the new version stands on its own.
"""

from __future__ import annotations

from preprocessing.errors import InputError

from preprocessing import storage
from preprocessing.shards import read_manifest, verify, write_manifest


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
    from preprocessing.dedup import deduplicate

    cfg = load_config(args.config, {"dedup.radius": args.radius, "dedup.epochs": args.epochs,
                                    "dedup.seed": args.seed}).dedup
    src = storage.normalize(args.uri)
    out = storage.normalize(args.out) if args.out else default_out(src)
    if out == src:
        raise InputError("--out must differ from the source dataset (dedup never rewrites its input)")
    manifest = verify(src, read_manifest(src))
    if storage.exists(storage.join(out, "manifest.json")):
        if not args.overwrite:
            raise InputError(f"{out} already holds a dataset; pass --overwrite to replace it")
    storage.delete_prefix(out)  # no stale shards from an earlier, unfinished run
    storage.check_writable(out)

    entries, info = deduplicate(src, manifest["shards"], out, cfg)
    rejects = manifest.get("rejects", {})
    for r in rejects.get("shards", []):
        storage.write_bytes(storage.join(out, r["path"]), storage.read_bytes(storage.join(src, r["path"])))
    counts = manifest.get("counts", {})
    new = write_manifest(
        out, kind=manifest["kind"], resolution=manifest["resolution"], shards=entries,
        rejects=rejects.get("shards", []), reject_counts=rejects.get("by_reason", {}), inputs=counts.get("inputs"),
        dedup=info, inputs_fingerprint=manifest.get("inputs_fingerprint"), params=manifest.get("params", {}),
        channels=manifest.get("channels", 3), extra={"derived_from": {"uri": src, "content_hash": manifest.get("content_hash")}},
    )
    print(f"{src}: {info['rows_in']} rows -> {out}: {new['counts']['rows']} rows "
          f"({info['removed']} near duplicates removed in {info['groups']} groups; "
          f"report {storage.join(out, info['report'])}, picture {storage.join(out, info['picture'])})")
    return 0
