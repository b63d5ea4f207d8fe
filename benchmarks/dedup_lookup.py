"""The group stage's shared codes: their count (`groups.shared_hashes`) and their lookup (`groups.is_in`, in
`view_rows`), each now against before on the same arrays, in turn, in one run.

Count: a code partition's hashes from every block, concatenated, and the values met twice kept; now sorted in place
and read off neighbours, before `np.unique(..., return_counts=True)`, which makes four more arrays the input's size
(fresh memory the kernel zeroes). `--counted` values (a 300k-image partition counts ~30M), 5% of them repeated.

Lookup: each block's code hashes looked up in a partition's sorted shared hashes: in the values of each hash's
top-bit bucket (`is_in`, now; the buckets made once a partition, not timed), against a binary search in ascending
order (`is_in_sorted`, before, from the thirteenth to the twenty-sixth session) and in the hashes' own order (until
the twelfth).

Why: a perf profile of a 300k-image group stage put ~24% of its CPU time in numpy's binary search, and the shared
hashes a block looks up in grow with the dataset, so in random order each lookup missed the cache more often as N
grew. Sizes: ~206k lookups, a 2,041-image block's hashes (135 views, each with 2 probes) cut into 4 partitions;
two sizes of a partition's shared set, 4x apart (`--shared`). The hashes are 64-bit mixes of codes (`code_mix`), i.e.
uniform: random 64-bit values stand for them; 5% of the lookups are present. Prints milliseconds per lookup batch
(median of `--reps`), the ratios, and whether all gave the same answer.

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


def is_in_sorted(values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The lookup as `view_rows` did it from the thirteenth to the twenty-sixth session: a binary search, the queries
    sorted first so that its probes stay in cache."""
    if len(values) == 0 or len(queries) == 0:
        return np.zeros(len(queries), bool)
    order = np.argsort(queries)
    ascending = queries[order]
    found = values[np.minimum(np.searchsorted(values, ascending), len(values) - 1)] == ascending
    out = np.empty(len(queries), bool)
    out[order] = found
    return out


def unique_counted(*pieces: np.ndarray) -> np.ndarray:
    """The count as `shared_hashes` did it until the thirteenth session."""
    found, count = np.unique(np.concatenate(pieces), return_counts=True)
    return found[count > 1]


def in_turn(before, now, reps: int) -> tuple[float, float, bool]:
    """Call `before()` and `now()` in turn `reps` times: (median seconds of each, whether their last answers agree)."""
    times: dict[str, list[float]] = {"before": [], "now": []}
    answers = {}
    for _ in range(reps):
        for name, fn in (("before", before), ("now", now)):
            t = time.perf_counter()
            answers[name] = fn()
            times[name].append(time.perf_counter() - t)
    same = bool(np.array_equal(answers["before"], answers["now"]))
    return statistics.median(times["before"]), statistics.median(times["now"]), same


def count_rows(counted: list[int], reps: int, rng: np.random.Generator) -> None:
    from preprocessing.dedup.groups import shared_hashes

    print("| hashes counted | np.unique with counts, ms | in place (now), ms | **ratio** | same |")
    print("| --- | --- | --- | --- | --- |")
    for n in counted:
        pieces = list(np.array_split(rng.integers(0, 2**63, n, dtype=np.uint64), 64))  # 64 blocks' pieces
        for p in pieces[1:]:
            p[::20] = pieces[0][rng.integers(0, len(pieces[0]), len(p[::20]))]
        before, now, same = in_turn(lambda: unique_counted(*pieces), lambda: shared_hashes(*pieces), reps)
        print(f"| {n:,} | {before * 1e3:.0f} | {now * 1e3:.0f} | **{before / now:.2f}x** | {same} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=int, nargs="+", default=[350_000, 1_400_000], help="shared hashes, per partition")
    ap.add_argument("--lookups", type=int, default=206_000)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--counted", type=int, nargs="+", default=[8_000_000, 30_000_000],
                    help="hashes a partition counts (shared_hashes' input)")
    ap.add_argument("--count-reps", type=int, default=5)
    args = ap.parse_args()

    from preprocessing.dedup.groups import bucket_starts, is_in

    rng = np.random.default_rng(0)
    count_rows(args.counted, args.count_reps, rng)
    print("| shared hashes | lookups | hash order, ms | ascending, ms | buckets (now), ms | **vs ascending** | vs hash "
          "order | same |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in args.shared:
        values = np.unique(rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True))
        queries = rng.integers(0, 2**64 - 1, args.lookups, dtype=np.uint64, endpoint=True)
        queries[::20] = values[rng.integers(0, len(values), len(queries[::20]))]
        starts = bucket_starts(values)
        oldest, _, same_oldest = in_turn(lambda: in_hash_order(values, queries),
                                         lambda: is_in(values, starts, queries), args.reps)
        before, now, same = in_turn(lambda: is_in_sorted(values, queries), lambda: is_in(values, starts, queries),
                                    args.reps)
        same = same and same_oldest
        print(f"| {len(values):,} | {len(queries):,} | {oldest * 1e3:.1f} | {before * 1e3:.1f} | {now * 1e3:.1f} | "
              f"**{before / now:.2f}x** | {oldest / now:.2f}x | {same} |")


if __name__ == "__main__":
    main()
