"""The verified group stage on its own, on a built dataset: what goes through its shuffles, and whether the number of
code partitions changes its answer, for each `--probes` value (what probing costs here).

Reads the dataset's crops, hashes them with a saved dedup model (the `dedup/model.pt` a `dcgan dedup` of the same
dataset wrote), then runs `dataset._verified_groups` once per `--partitions` value on a local Ray and prints, for each:
wall seconds, the (image, code) rows, those whose code another image has too (what goes through the code shuffle
now: `dataset._shared_rows`), the bucket members (images sharing a code, capped: what went on to the pixel shuffle
before checks did), the check rows that go on now (two per check), checks, verified edges, grouped images; and
whether every partition count gave the same groups as the first. `--baseline` also runs the stage with every (image,
code) row through the code shuffle (before 2026-12-04), in turn with the default path, and prints the ratio.

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
    ap.add_argument("--baseline", action="store_true", help="also every code row through the shuffle, for the ratio")
    args = ap.parse_args()

    import ray
    from ray.data import DataContext
    from ray.data.expressions import col

    from preprocessing import shards as shard_format
    from preprocessing.config import DedupConfig
    from preprocessing.dedup import dataset as dedup
    from preprocessing.dedup.groups import view_rows
    from preprocessing.dedup.model import load_state
    from preprocessing.dedup.verify import bucket_members

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    entries = shard_format.read_manifest(args.data)["shards"]
    rows_in = sum(e["rows"] for e in entries)
    for probes in args.probes:
        cfg = DedupConfig(probes=probes)
        crops, _ = dedup._crops(args.data, entries, cfg, rows_in)
        coded = dedup._encode(crops, load_state(args.model), cfg, args.data, entries).materialize()
        code_bytes = (cfg.code_bits + 7) // 8
        print(f"{args.data}: {rows_in} images, views {cfg.views}, probes {probes}")
        print(f"{'partitions':>10} {'path':>8} {'wall s':>7} {'code rows':>10} {'shared':>8} {'members':>8} "
              f"{'check rows':>10} {'checks':>7} {'edges':>6} {'grouped':>7}")
        first = None
        for p in args.partitions:
            codes = coded.map_batches(view_rows, batch_format="numpy",
                                      fn_kwargs={"code_bytes": code_bytes, "partitions": p}).materialize()
            shared = dedup._shared_rows(coded, code_bytes, p).count()
            members = 0
            for part in range(p):  # bucket members per code partition, as member_rows finds them
                rows = codes.filter(expr=col("part") == part).select_columns(["key", "code"]).to_pandas()
                members += len(bucket_members(rows["key"].to_numpy(object), rows["code"].to_numpy(object))[0])
            walls: dict[str, list[float]] = {}
            paths = ["shared", "every", "shared"] if args.baseline else ["shared"]
            for path in paths:
                t = time.perf_counter()
                groups, figures = dedup._verified_groups(coded, args.data, entries, cfg, code_bytes, p,
                                                         shared_only=path == "shared")
                walls.setdefault(path, []).append(time.perf_counter() - t)
                print(f"{p:>10} {path:>8} {walls[path][-1]:>7.1f} {codes.count():>10} {shared:>8} {members:>8} "
                      f"{2 * figures['candidates_checked']:>10} {figures['candidates_checked']:>7} "
                      f"{figures['verified_edges']:>6} {len(groups):>7}", flush=True)
                first = groups if first is None else first
                print(f"{'':>10} same groups as the first run ({args.partitions[0]} partition(s)): {groups == first}")
            if args.baseline:
                now = sum(walls["shared"]) / len(walls["shared"])
                print(f"{'':>10} every code row / shared rows only: {walls['every'][0] / now:.2f}x the wall time "
                      f"(shared: mean of {len(walls['shared'])} runs around the baseline)")


if __name__ == "__main__":
    main()
