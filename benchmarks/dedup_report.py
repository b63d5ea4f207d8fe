"""The driver's bookkeeping of a dedup's collision groups: Arrow columns against a Python dict a row, in one run.

Why (issue 22, "driver memory that grows with N"): after the group stage the dedup's driver gathers every row of a
group of two or more for its report (the group sizes, the picture's groups, the largest groups' members). Rows that
collide grow with the dataset: the paper's de-duplication removed ~275k images of LSUN bedrooms (4.1), ~450k
colliding rows in groups of 2-5 (the default here: 177,000 groups). `benchmarks/scale.py` plants 2% + 2% copies, ~20k colliding rows at 300k, too few to show it.

  baseline  the driver's code before `report.CollisionGroups`: Ray Data's `take_all()` of the colliding rows (a dict a
            row), sorted by (group, key), grouped in a dict of lists, each group sorted kept member first, the group
            names sorted, the 1,000 largest groups picked
  ours      `dataset._colliding` (the rows' Arrow blocks, `CollisionGroups.of`: one table sorted by group, kept member
            first, then key) and the same reads: the group names, the 1,000 largest groups' members

Each runs in fresh processes with their own local Ray (2 CPUs), on the same colliding rows (40-hex keys, as LSUN's;
groups of 2 mostly, some of 3 and 5), written to a Parquet file first and read back as Arrow blocks of 20,000 rows:
one process times the bookkeeping and reports its peak RSS, another runs it again under tracemalloc for its peak
Python heap (Python objects and numpy, not Arrow's buffers; tracemalloc slows allocation, so it is not timed).
Printed: each figure and ours / baseline. Both must find the same groups (their count and the largest groups' names
are compared).

Then what each `decide` task (one a source shard: 1,465 at 3M images) pays to receive the groups and decide its
shard's 2,048 rows, in this process, best of 5: baseline, the dict of every member's key the tasks received before
`groups.GroupLookup` (pickled and unpickled, as Ray passes it) and the dict lookup `decide` made; ours, the
`GroupLookup` (pickled with its buffers out of band, as Ray passes them) and `decide`. Both must decide alike.
Run: `.venv/bin/python benchmarks/dedup_report.py [--groups 177000] [--rounds 2]` (~1 min a round).
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BLOCK_ROWS = 20_000
LARGEST = 1000


def colliding_rows(groups: int, seed: int = 0) -> pa.Table:
    """`groups` groups of colliding rows as `groups.decide` makes them, built as columns (no Python object a row, so
    the file's writer is not what is measured): each group's name is its kept member's key, its smallest."""
    rng = np.random.default_rng(seed)
    size = rng.choice(np.array([2, 2, 2, 2, 2, 2, 3, 3, 5]), groups)
    n = int(size.sum())
    raw = rng.integers(0, 256, (n, 20), dtype=np.uint8)
    hexes = np.frombuffer(b"0123456789abcdef", np.uint8)
    text = np.stack([hexes[raw >> 4], hexes[raw & 15]], axis=2).reshape(n, 40)
    keys = pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(np.arange(n + 1, dtype=np.int32) * 40),
                                                  pa.py_buffer(text.tobytes())])
    first = np.repeat(np.cumsum(size) - size, size)               # each row's group's first row
    order = np.lexsort((keys.to_numpy(zero_copy_only=False), first))  # keys sorted within each group
    keys = keys.take(pa.array(order))
    table = pa.table({"key": keys, "shard": rng.integers(0, 1500, n).astype(np.int32),
                      "row": rng.integers(0, 2048, n).astype(np.int32),
                      "keep": np.arange(n) == first, "group": keys.take(pa.array(first)),
                      "size": np.repeat(size, size).astype(np.int64)})
    return table.take(pa.array(rng.permutation(n)))


def baseline(ds) -> tuple[int, list[str]]:
    colliding = sorted(ds.take_all(), key=lambda r: (r["group"], str(r["key"])))
    by_group: dict[str, list[dict]] = {}
    for r in colliding:
        by_group.setdefault(str(r["group"]), []).append(r)
    for members in by_group.values():
        members.sort(key=lambda m: (not m["keep"], str(m["key"])))
    names = sorted(by_group)
    largest = sorted(by_group, key=lambda g: (-len(by_group[g]), g))[:LARGEST]
    detail = [by_group[g] for g in largest]
    return len(names), [d[0]["key"] for d in detail]


def ours(ds) -> tuple[int, list[str]]:
    from preprocessing.dedup.dataset import _colliding

    groups = _colliding(ds)
    detail = [groups.members(j) for j in groups.largest(LARGEST)]
    return len(groups), [d[0]["key"] for d in detail]


def decide_before(batch: dict, groups: dict) -> dict:
    """`groups.decide` before `GroupLookup`: a dict of every member's key."""
    keys = [str(k) for k in batch["key"]]
    found = [groups.get(k, (k, 1)) for k in keys]
    group = np.array([g for g, _ in found], dtype=object)
    return {**{k: batch[k] for k in ("key", "shard", "row", "hash")},
            "keep": np.array([g == k for g, k in zip(group, keys)], bool), "group": group,
            "size": np.array([s for _, s in found], np.int64)}


def decide_task(table: pa.Table, rounds: int = 5) -> dict[str, float]:
    """Seconds a decide task spends receiving the groups and deciding a shard's 2,048 rows (~5% of them members),
    best of `rounds`, for the dict and for `GroupLookup`."""
    from preprocessing.dedup.groups import GroupLookup, decide

    keys, keepers, sizes = (table.column(c) for c in ("key", "group", "size"))
    as_dict = dict(zip(keys.to_pylist(), zip(keepers.to_pylist(), sizes.to_pylist())))
    lookup = GroupLookup.of(keys.to_numpy(zero_copy_only=False), keepers.to_numpy(zero_copy_only=False),
                            sizes.to_numpy())
    rng = np.random.default_rng(1)
    members = keys.take(pa.array(rng.choice(len(keys), 100, replace=False))).to_pylist()
    shard = np.array([f"{x:040x}" for x in rng.integers(0, 2**62, 1948)] + members, dtype=object)
    batch = {"key": shard, "shard": np.zeros(len(shard), np.int32), "row": np.arange(len(shard)), "hash": shard}
    sent_dict = pickle.dumps(as_dict, protocol=5)
    buffers: list = []
    sent_lookup = pickle.dumps(lookup, protocol=5, buffer_callback=buffers.append)
    best = {"baseline": np.inf, "ours": np.inf}
    for _ in range(rounds):
        t = time.perf_counter()
        before = decide_before(batch, pickle.loads(sent_dict))
        best["baseline"] = min(best["baseline"], time.perf_counter() - t)
        t = time.perf_counter()
        now = decide(batch, pickle.loads(sent_lookup, buffers=buffers))
        best["ours"] = min(best["ours"], time.perf_counter() - t)
    if any(not np.array_equal(before[c], now[c]) for c in ("keep", "group", "size")):
        raise SystemExit("the two decide differently")
    return best


def child(variant: str, path: str, traced: bool) -> None:
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    table = pq.read_table(path)
    ds = ray.data.from_arrow([table.slice(i, BLOCK_ROWS) for i in range(0, table.num_rows, BLOCK_ROWS)]).materialize()
    del table
    if traced:
        tracemalloc.start()
    t = time.perf_counter()
    count, largest = (ours if variant == "ours" else baseline)(ds)
    wall = time.perf_counter() - t
    out = {"groups": count, "largest": largest}
    if traced:
        out["heap"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    else:
        out.update(wall_s=wall, rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(out))
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=177_000, help="collision groups (~2.6 rows each)")
    ap.add_argument("--rounds", type=int, default=1, help="each variant this many times, in turn")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "PARQUET", "TRACED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.child[2] == "traced")
    with tempfile.TemporaryDirectory(prefix="dedup-report-") as tmp:
        path = str(Path(tmp) / "colliding.parquet")
        table = colliding_rows(args.groups)
        pq.write_table(table, path)
        rows = table.num_rows
        del table
        runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
        for _ in range(args.rounds):
            for variant in runs:
                run = {}
                for mode in ("timed", "traced"):
                    out = subprocess.run([sys.executable, __file__, "--child", variant, path, mode], check=True,
                                         capture_output=True, text=True).stdout
                    run.update(json.loads(out.strip().splitlines()[-1]))
                runs[variant].append(run)
        task = decide_task(pq.read_table(path))
    b, o = runs["baseline"], runs["ours"]
    if {(r["groups"], tuple(r["largest"])) for r in b + o} != {(b[0]["groups"], tuple(b[0]["largest"]))}:
        raise SystemExit("the two found different groups")
    print(f"{rows:,} colliding rows in {b[0]['groups']:,} groups ({rows - b[0]['groups']:,} removed); best of "
          f"{args.rounds} round(s) each, fresh processes")
    print("| | baseline (a dict a row) | ours (Arrow columns) | ours / baseline |")
    print("| --- | --- | --- | --- |")
    for name, key, scale, fmt in (("bookkeeping wall s", "wall_s", 1, "{:.2f}"),
                                  ("peak Python heap MiB", "heap", 2**20, "{:.1f}"),
                                  ("driver peak RSS MiB", "rss", 2**20, "{:.0f}")):
        bv, ov = min(r[key] for r in b) / scale, min(r[key] for r in o) / scale
        print(f"| {name} | {fmt.format(bv)} | {fmt.format(ov)} | **{ov / bv:.2f}x** |")
    print("\na decide task (groups received, one shard's 2,048 rows decided), best of 5, this process:")
    print("| | baseline (a dict) | ours (GroupLookup) | ours / baseline | x 1,465 tasks (3M images), CPU-s |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| seconds a task | {task['baseline']:.4f} | {task['ours']:.4f} | **{task['ours'] / task['baseline']:.3f}x** "
          f"| {1465 * task['baseline']:.0f} -> {1465 * task['ours']:.1f} |")


if __name__ == "__main__":
    main()
