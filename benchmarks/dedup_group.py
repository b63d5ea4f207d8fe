"""The verified group stage on its own, on a built dataset: what goes through its shuffles, and whether the number of
code partitions changes its answer, for each `--probes` value (what probing costs here).

Reads the dataset's crops, hashes them with a saved dedup model (the `dedup/model.pt` a `dcgan dedup` of the same
dataset wrote), then runs `dataset._verified_groups` once per `--partitions` value on a local Ray and prints, for each:
wall seconds, the (image, code) rows, those whose code another image has too (what goes through the code shuffle
now: `dataset._shared_rows`), the bucket members (images sharing a code, capped: what went on to the pixel shuffle
before checks did), the check rows that go on now (two per check), checks, verified edges, grouped images; and
whether every partition count gave the same groups as the first. `--baseline` also runs an earlier path of the stage,
in turn with the default one, and prints the ratio: `every-row` sends every (image, code) row through the code shuffle
(before the ninth session); `ray-data` makes each of the stage's shuffles a Ray Data `groupby().map_groups()` (before
the tenth), with the same functions.

Run (the 25k LSUN-layout set of benchmarks/scale.py, built and de-duplicated once):
  .venv/bin/dcgan build-lsun /tmp/s22-cache/lsun-25000-0 --out /tmp/p25/built --no-dedup
  .venv/bin/dcgan dedup /tmp/p25/built --out /tmp/p25/dd
  .venv/bin/python benchmarks/dedup_group.py /tmp/p25/built --model /tmp/p25/dd/dedup/model.pt --partitions 1 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="a built dataset (local path or s3://)")
    ap.add_argument("--model", required=True, help="a dedup model.pt for it")
    ap.add_argument("--partitions", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--probes", type=int, nargs="+", default=[2], help="dedup.probes values to compare")
    ap.add_argument("--baseline", nargs="*", choices=["every-row", "ray-data"], default=[],
                    help="also an earlier path, in turn with the default one, for the ratio")
    args = ap.parse_args()

    import ray
    from ray.data import DataContext
    from ray.data.expressions import col

    from preprocessing import shards as shard_format
    from preprocessing.config import DedupConfig
    from preprocessing.dedup import dataset as dedup
    from preprocessing.dedup import exchange
    from preprocessing.dedup.groups import view_rows
    from preprocessing.dedup.model import load_state
    from preprocessing.dedup.verify import bucket_members

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    entries = shard_format.read_manifest(args.data)["shards"]
    rows_in = sum(e["rows"] for e in entries)
    for probes in args.probes:
        cfg = DedupConfig(probes=probes)
        # as `dataset.deduplicate` runs it: with views, encode reads the shards itself and phase 1's crops (the
        # training sample) are not needed
        crops = dedup._crops(args.data, entries, cfg, rows_in)[0] if cfg.views == 1 else None
        coded = dedup._encode(crops, load_state(args.model), cfg, args.data, entries).materialize()
        code_bytes = (cfg.code_bits + 7) // 8
        print(f"{args.data}: {rows_in} images, views {cfg.views}, probes {probes}")
        print(f"{'partitions':>10} {'path':>9} {'wall s':>7} {'code rows':>10} {'shared':>8} {'members':>8} "
              f"{'check rows':>10} {'checks':>7} {'edges':>6} {'grouped':>7}")
        first = None
        for p in args.partitions:
            codes = coded.map_batches(view_rows, batch_format="numpy",
                                      fn_kwargs={"code_bytes": code_bytes, "partitions": p}).materialize()
            blocks, step = dedup._code_rows(coded, code_bytes, p)
            shared = exchange.total(exchange.run(blocks, [step]))
            members = 0
            for part in range(p):  # bucket members per code partition, as member_rows finds them
                rows = codes.filter(expr=col("part") == part).select_columns(["key", "code"]).to_pandas()
                members += len(bucket_members(rows["key"].to_numpy(object), rows["code"].to_numpy(object))[0])
            walls: dict[str, list[float]] = {}
            for path in ["now"] + [x for b in args.baseline for x in (b, "now")]:
                t = time.perf_counter()
                if path == "ray-data":
                    groups, figures = _ray_data_groups(coded, args.data, entries, cfg, code_bytes, p)
                else:
                    lookup, figures = dedup._verified_groups(coded, args.data, entries, cfg, code_bytes, p,
                                                             shared_only=path != "every-row")
                    groups = lookup.as_dict()
                walls.setdefault(path, []).append(time.perf_counter() - t)
                print(f"{p:>10} {path:>9} {walls[path][-1]:>7.1f} {codes.count():>10} {shared:>8} {members:>8} "
                      f"{2 * figures['candidates_checked']:>10} {figures['candidates_checked']:>7} "
                      f"{figures['verified_edges']:>6} {len(groups):>7}", flush=True)
                first = groups if first is None else first
                print(f"{'':>10} same groups as the first run ({args.partitions[0]} partition(s)): {groups == first}")
            now = sum(walls["now"]) / len(walls["now"])
            for b in args.baseline:
                print(f"{'':>10} {b} / now: {walls[b][0] / now:.2f}x the wall time (now: mean of {len(walls['now'])} "
                      "runs around the baselines)")


def _ray_data_groups(coded, src_uri, shards, cfg, code_bytes, partitions):
    """The stage before the tenth session: the same functions, each shuffle a Ray Data groupby().map_groups()."""
    from preprocessing.dedup import dataset as dedup
    from preprocessing.dedup.groups import first_alignments, member_rows, verify_rows
    from preprocessing.dedup.verify import star_groups

    blocks, step = dedup._code_rows(coded, code_bytes, partitions)
    rows = coded.map_batches(step.fn, batch_format="numpy", fn_kwargs=step.kwargs)
    members = (rows.groupby("part", num_partitions=partitions)
               .map_groups(member_rows, batch_format="numpy", fn_kwargs={"partitions": partitions}).materialize())
    if not members.count():
        return {}, {"candidates_checked": 0, "verified_edges": 0, "unchecked_members": 0}
    [left] = dedup._totals(members, ("left",))
    checks = members
    if partitions > 1:
        checks = members.groupby("pair", num_partitions=partitions).map_groups(first_alignments, batch_format="numpy")
    edges = (checks.groupby("shard", num_partitions=dedup.shard_partitions(shards))
             .map_groups(dedup._pixels_task, batch_format="numpy",
                         fn_kwargs={"src_uri": src_uri, "shards": shards, "crop": cfg.crop})
             .groupby("part", num_partitions=partitions).map_groups(verify_rows, batch_format="numpy").to_pandas())
    a, b = edges["a"].to_numpy(object), edges["b"].to_numpy(object)
    real = a != ""
    return star_groups(a[real], b[real]), {"candidates_checked": int(edges["checked"].sum()),
                                           "verified_edges": int(real.sum()), "unchecked_members": left}


if __name__ == "__main__":
    main()
