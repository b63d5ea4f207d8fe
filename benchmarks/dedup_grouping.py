"""Grouping identical 128-bit codes: our linear radix grouping against the two obvious baselines, in one run.

  dict       a Python dict from code bytes to group id (what a first version of a dedup script does)
  np.unique  `np.unique(codes, axis=0, return_inverse=True)`: a comparison sort of the rows, O(N log N)
  ours       `preprocessing.dedup.semantic_hash.group_identical`: hash-partition into cache-sized chunks, LSD radix sort
             of 16-bit digits per chunk, O(N)

Codes are random with about one row in three repeating an earlier one (as many groups as a heavily duplicated
crawl). All three must give the same partition of the rows; the ratios are ours against each baseline, and the
last line checks linearity (10x the codes in how many times the time). Run:
`.venv/bin/python benchmarks/dedup_grouping.py [--n 1000000]` (about 15 s).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing.dedup.semantic_hash import group_identical  # noqa: E402


def codes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    return base[rng.integers(0, max(1, n // 2), n)]


def by_dict(c: np.ndarray) -> np.ndarray:
    ids: dict[bytes, int] = {}
    return np.fromiter((ids.setdefault(row.tobytes(), len(ids)) for row in c), np.int64, len(c))


def by_unique(c: np.ndarray) -> np.ndarray:
    return np.unique(c, axis=0, return_inverse=True)[1].ravel()


def best(fn, c: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(c)
        times.append(time.perf_counter() - t)
    return min(times), out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="codes to group (default 1,000,000)")
    args = parser.parse_args()
    c = codes(args.n)
    t_ours, g_ours = best(group_identical, c, 3)
    t_unique, g_unique = best(by_unique, c, 1)
    t_dict, g_dict = best(by_dict, c, 1)
    assert same_partition(g_ours, g_unique) and same_partition(g_ours, g_dict), "methods disagree"
    print(f"{args.n:,} codes of 128 bits, {len(np.unique(g_ours)):,} groups")
    for name, t in (("dict (Python)", t_dict), ("np.unique(axis=0)", t_unique), ("ours (radix, linear)", t_ours)):
        print(f"  {name:22s} {t:7.3f} s  {args.n / t / 1e6:7.2f} M codes/s")
    print(f"ratio ours vs dict      : {t_dict / t_ours:.1f}x")
    print(f"ratio ours vs np.unique : {t_unique / t_ours:.1f}x")
    small = codes(args.n // 10, seed=1)
    t_small = min(best(group_identical, small, 3)[0], best(group_identical, small, 3)[0])
    print(f"linearity: 10x the codes took {t_ours / t_small:.1f}x the time")


if __name__ == "__main__":
    main()
