"""The group stage's shared-code lookup (`groups.is_in_sorted`, in `view_rows`): each block's code hashes looked up in
a partition's sorted shared hashes, in ascending order (now) against in the hashes' own order (before), on the same
arrays, in turn, in one run.

Why: a perf profile of a 300k-image group stage put ~24% of its CPU time in numpy's binary search, and the shared
hashes a block looks up in grow with the dataset, so in random order each lookup missed the cache more often as N
grew. Sizes: ~206k lookups, a 2,041-image block's hashes (135 views, each with 2 probes) cut into 4 partitions;
two sizes of a partition's shared set, 4x apart (`--shared`). The hashes are 64-bit mixes of codes (`code_mix`), i.e.
uniform: random 64-bit values stand for them; 5% of the lookups are present. Prints milliseconds per lookup batch
(median of `--reps`), the ratio, and whether both gave the same answer.

Run: `.venv/bin/python benchmarks/dedup_lookup.py` (seconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def in_hash_order(values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The lookup as `view_rows` did it until the twelfth session."""
    return values[np.minimum(np.searchsorted(values, queries), len(values) - 1)] == queries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=int, nargs="+", default=[350_000, 1_400_000], help="shared hashes, per partition")
    ap.add_argument("--lookups", type=int, default=206_000)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    from preprocessing.dedup.groups import is_in_sorted

    rng = np.random.default_rng(0)
    print("| shared hashes | lookups | hash order, ms | ascending (now), ms | **ratio** | same |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in args.shared:
        values = np.unique(rng.integers(0, 2**63, n, dtype=np.uint64))
        queries = rng.integers(0, 2**63, args.lookups, dtype=np.uint64)
        queries[::20] = values[rng.integers(0, len(values), len(queries[::20]))]
        times: dict[str, list[float]] = {"before": [], "now": []}
        answers = {}
        for _ in range(args.reps):
            for name, fn in (("before", in_hash_order), ("now", is_in_sorted)):
                t = time.perf_counter()
                answers[name] = fn(values, queries)
                times[name].append(time.perf_counter() - t)
        before, now = statistics.median(times["before"]), statistics.median(times["now"])
        same = bool(np.array_equal(answers["before"], answers["now"]))
        print(f"| {len(values):,} | {len(queries):,} | {before * 1e3:.1f} | {now * 1e3:.1f} | **{before / now:.2f}x** "
              f"| {same} |")


if __name__ == "__main__":
    main()
