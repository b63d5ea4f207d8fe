"""Verified merging for the multi-view hash (layer: preprocessing): codes propose pairs, pixels decide.

Why: with 135 codes per image, grouping on ANY shared code joins distinct look-alikes, and union-find chains them
(issue 19: 1.9% of 5,000 distinct MNIST digits grouped, growing with N). Here a shared code only makes two images a
CANDIDATE pair; the pair becomes an edge only if the two images, aligned over the views whose codes matched
(`views.cut_views`, 32x32 at the crop's resolution), differ by at most `MAX_DIFF` grey levels RMS in every
block of a 4x4 grid (the border strip, where a shifted copy holds mirrored pixels, left out). Groups are stars: every
removed image was verified directly against the image kept in its place (the group's smallest key), so a chain
a~b~c never removes c for a (`star_groups`).

Thresholds, chosen on data (issue 19; `benchmarks/dedup_scale.py` prints the sweeps, RESULTS.md): a pair is a
duplicate if (1) its largest block RMS difference (blocks covering the whole interior) is <= `MAX_DIFF` grey levels
and (2) its TOLERANT difference, where a pixel within the range of the other image's 3x3 neighbourhood (both ways)
counts as no difference, is <= `MAX_TOL` grey levels in every block and <= `MAX_REL` x the lower interior contrast
over the interior. (2) is what tells copies from look-alikes: a re-cropped or resized copy is misaligned by a
fraction of a pixel, which the plain difference punishes at every sharp edge (such copies were half of the misses),
while distinct tiles of one low-contrast photo differ everywhere. (1) keeps thin strokes apart: the tolerant rule
alone merged 1.2-8.9% of 625-5,000 distinct MNIST digits, with the block rule at 14 none (at 16: 0.16% at 1,250),
nor any of 10k-100k distinct digit mosaics. Against the plain rules this replaced (block <= 12 on a grid that missed
the last 5 of 26 rows and columns, and plain RMS <= 0.15 of the contrast), over seeds 0-3 on the photo tiles with
near copies kept: shift/crop recall 0.640-0.670 -> 0.707-0.738 and false positives per 100 flagged pairs 0.43-2.14
-> 0.20-0.58; mixed copies 0.634-0.667 -> 0.685-0.713, 0.59-1.15 -> 0.00-0.73. Two images sharing several codes are
checked in up to `ALIGNMENTS` of those buckets (each its own alignment) and verified if any passes. Multi-probe
hashing (`dedup.probes`: codes one bit away at a view's least certain bits also propose pairs) made the candidates
reach the copies whose codes never met their original's (~16% of the shift/crop copies): with 2 probes a view, 8
alignments (4 before) and `MAX_REL` 0.08 (0.10 before), shift/crop recall 0.820-0.827 at 0.17-0.87 false positives per
100 over seeds 0-3, still no distinct digit or mosaic grouped (RESULTS.md, "Multi-probe hashing"); 0.806-0.828 at
0.00-0.85 over seeds 0-7 with the training noise drawn in the whitening basis (docs/dedup.md).

Bounded work: equal codes are bucketed per hash partition; a bucket of s images yields the pairs between its
`LEADERS` smallest keys and every other member (all pairs when s <= LEADERS + 1), so at most LEADERS x s checks, and
a bucket sends at most `BUCKET_CAP` members to be checked: the leaders plus a sample that differs per bucket (a hash of
key and code), so an image repeated thousands of times still meets its smallest-key copy, the keeper, in some of its
135 buckets. Members a bucket leaves out are counted (`unchecked`), never merged. Blank views (RMS contrast below
`BLANK_STD`) never verify: an all-blank dataset is reported, not collapsed.
"""

from __future__ import annotations

import hashlib

import numpy as np

from preprocessing.dedup.semantic_hash import group_identical, stack_codes

MAX_DIFF = 14.0        # block RMS difference, grey levels, of two aligned 32x32 views: at most this, and ...
MAX_TOL = 8.0          # ... block RMS of the tolerant difference (3x3 neighbourhood range) at most this, and ...
MAX_REL = 0.08         # ... its interior RMS at most this fraction of the lower contrast = duplicates
MARGIN = 3             # border pixels (of 32) left out: a 1-4 px shift mirrors up to 2 of them
BLOCK = 7              # the 26 interior pixels (32 - 2*MARGIN) as 4x4 blocks of 7x7 (the last ones flush with the edge)
BLANK_STD = 2.0        # a view with less RMS contrast than this (grey levels) is blank: no evidence, never verified
LEADERS = 8            # members of a bucket every other member is checked against
BUCKET_CAP = 2048      # members of one bucket checked at all (memory of one check task: ~6 KB each)
CHUNK = 256            # pairs checked at once: their temporaries (~1 MB each) are reused by malloc. At 4096 each one
                       # (~33 MB) was a fresh mapping that the kernel zeroed (numpy asks for huge pages from 4 MB):
                       # 2.9x slower, half of it system time (benchmarks/dedup_verify.py)
BLOCK_PAIRS = 1 << 17  # candidate pairs (with repeats) expanded at once, per block of images
ALIGNMENTS = 8         # buckets (alignments) a pair is checked in, its first ones: verified if any passes


def _range3(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, n, n, 3) -> the min and max of each pixel's 3x3 neighbourhood, (M, n - 2, n - 2, 3) (separable)."""
    lo = np.minimum(np.minimum(x[:, :-2], x[:, 1:-1]), x[:, 2:])
    hi = np.maximum(np.maximum(x[:, :-2], x[:, 1:-1]), x[:, 2:])
    return (np.minimum(np.minimum(lo[:, :, :-2], lo[:, :, 1:-1]), lo[:, :, 2:]),
            np.maximum(np.maximum(hi[:, :, :-2], hi[:, :, 1:-1]), hi[:, :, 2:]))


def _block_rms(d: np.ndarray) -> np.ndarray:
    """(M, n, n, 3) differences -> (M,) the largest RMS over BLOCK x BLOCK blocks that cover every pixel: a grid from
    the top left, plus a last row and column of blocks flush with the far edges (overlapping the grid when BLOCK does
    not divide n). A grid alone left the last n % BLOCK rows and columns out (5 of 26), where a mosaic's differing
    quadrant could hide."""
    n = d.shape[1]
    starts = sorted({*range(0, n - BLOCK + 1, BLOCK), n - BLOCK})
    sq = (d ** 2).mean(axis=3)
    worst = np.zeros(len(d), np.float32)
    for y in starts:
        for x in starts:
            np.maximum(worst, sq[:, y:y + BLOCK, x:x + BLOCK].mean(axis=(1, 2)), out=worst)
    return np.sqrt(worst)


def measures(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aligned views (M, c, c, 3) -> three (M,) measures over the interior (MARGIN left out), inf where either view is
    blank: the largest block RMS difference in grey levels; the largest block RMS of the tolerant difference (how far
    each pixel lies outside the range of the other view's 3x3 neighbourhood around it, the larger of the two ways);
    the tolerant difference's interior RMS / the lower interior RMS contrast of the two."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    c, m = a.shape[1], len(a)
    inner, ring = slice(MARGIN, c - MARGIN), slice(MARGIN - 1, c - MARGIN + 1)
    ia, ib = a[:, inner, inner], b[:, inner, inner]
    plain = _block_rms(ia - ib)
    (lo_a, hi_a), (lo_b, hi_b) = _range3(a[:, ring, ring]), _range3(b[:, ring, ring])
    tol = np.maximum(np.maximum(ia - hi_b, lo_b - ia), np.maximum(ib - hi_a, lo_a - ib))
    np.maximum(tol, 0, out=tol)
    tolerant = _block_rms(tol)
    contrast = np.minimum(ia.reshape(m, -1).std(axis=1), ib.reshape(m, -1).std(axis=1))
    rel = np.sqrt((tol.reshape(m, -1) ** 2).mean(axis=1)) / np.maximum(contrast, 1e-6)
    empty = blank(a) | blank(b)
    plain[empty] = tolerant[empty] = rel[empty] = np.inf
    return plain, tolerant, rel


def passes(plain: np.ndarray, tolerant: np.ndarray, rel: np.ndarray, max_diff: float = MAX_DIFF,
           max_tol: float = MAX_TOL, max_rel: float = MAX_REL) -> np.ndarray:
    """The verification rule on `measures`' output: (M,) bool, duplicates."""
    return (plain <= max_diff) & (tolerant <= max_tol) & (rel <= max_rel)


def differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest block RMS difference of aligned views (M, c, c, 3) float: (M,) grey levels; inf where either is blank."""
    return measures(a, b)[0]


def blank(pixels: np.ndarray) -> np.ndarray:
    """(M, ...) pixels -> (M,) bool: RMS contrast below BLANK_STD."""
    p = np.asarray(pixels, np.float32).reshape(len(pixels), -1)
    return p.std(axis=1) < BLANK_STD


def _rank(keys: np.ndarray, salt: np.ndarray) -> np.ndarray:
    """A per-bucket pseudo-random order of members (stable for equal inputs): which of a huge bucket get checked."""
    return np.array([hashlib.blake2b(f"{k}\0".encode() + s, digest_size=8).digest() for k, s in zip(keys, salt)],
                    dtype=object)


def bucket_members(keys: np.ndarray, codes: list[bytes] | np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows (one per distinct image and code) -> (row indices that go to checking, their bucket id, rows left out).

    Only buckets with two or more images are kept; a bucket keeps its LEADERS smallest keys plus, up to BUCKET_CAP,
    the members with the smallest per-bucket hash rank. Rows come back sorted by (bucket, key)."""
    if len(keys) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    codes = stack_codes(codes)
    buckets = group_identical(codes)
    shared = np.flatnonzero(np.bincount(buckets)[buckets] > 1)  # the few rows whose code another image has too:
    keys = key_texts(np.asarray(keys, dtype=object)[shared])   # only they are sorted by key (3.3M rows -> 4%)
    ids = image_ids(keys)   # key order as numbers: numpy's sort of the unicode keys was ~6% of a 300k group stage
    order = np.lexsort((ids, buckets[shared]))
    b = buckets[shared][order]
    if not len(b):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    starts = np.r_[0, np.flatnonzero(b[1:] != b[:-1]) + 1]
    sizes = np.diff(np.r_[starts, len(b)])
    keep, left = [], 0
    for lo, s in zip(starts, sizes):
        rows = order[lo:lo + s]
        if s > BUCKET_CAP:
            rest = rows[LEADERS:]
            salt = np.repeat(codes[shared[rows[0]]].tobytes(), len(rest)).astype(object)
            picked = rest[np.argsort(_rank(keys[rest], salt), kind="stable")[:BUCKET_CAP - LEADERS]]
            rows = np.r_[rows[:LEADERS], picked[np.argsort(ids[picked], kind="stable")]]
            left += int(s - len(rows))
        keep.append(rows)
    rows = shared[np.concatenate(keep)]
    return rows, buckets[rows], left


def key_texts(keys) -> np.ndarray:
    """Keys as an object array of Python strings, ordered and compared as text. Not numpy's fixed-width unicode
    (`astype(str)`): that gives every key 4 bytes x the LONGEST key's length, so one 4,096-character URL key (a face
    cut from a scraped photo is keyed by its URL) made each of a partition's keys 16 KiB."""
    return np.array([str(k) for k in keys], dtype=object)


def image_ids(owners: np.ndarray) -> np.ndarray:
    """Each owner's place among the distinct owners in key order: `np.unique(owners, return_inverse=True)[1]`, by a
    dict. numpy sorted every member's key as fixed-width unicode (160 bytes a 40-character key): ~10% of a 100k group
    stage (a py-spy profile of its workers). An image is a member of several buckets, so its key repeats; only the
    distinct keys are sorted here, as Python strings."""
    keys = owners.tolist()
    index = {k: i for i, k in enumerate(sorted(set(keys)))}
    return np.fromiter(map(index.__getitem__, keys), np.int64, len(keys))


def candidate_pairs(buckets: np.ndarray, owners: np.ndarray, prio: np.ndarray | None = None,
                    alignments: int = ALIGNMENTS):
    """Index pairs (x, y) into members sorted by (bucket, key), in chunks of at most CHUNK: a pair is two members of a
    bucket one of which is among its first LEADERS (x, the leader, comes first); of the buckets two images share, the
    pair is checked in the first `alignments` (`ALIGNMENTS`; other values for benchmarks) by (leader position, `prio`
    of the bucket's code), never more: an order that does not depend on which other codes share the partition, so
    code partitions agree (`first_alignments`).

    Streamed by image: the pairs of a block of images (each with the images after it) are expanded, reduced to one
    per pair by a sort and handed on, so memory is bounded by `BLOCK_PAIRS` (and one image's pairs: at most views x
    BUCKET_CAP), not by the candidates (issue 19: a set of the pairs already checked grew with them)."""
    buckets, owners = np.asarray(buckets), np.asarray(owners)
    n = len(buckets)
    if n < 2:
        return
    starts = np.r_[0, np.flatnonzero(buckets[1:] != buckets[:-1]) + 1]
    sizes = np.diff(np.r_[starts, n])
    first, size = np.repeat(starts, sizes), np.repeat(sizes, sizes)
    tie = np.zeros(n, np.int64) if prio is None else np.asarray(prio)
    pos = np.arange(n) - first
    image = image_ids(owners)
    reach = np.where(pos < LEADERS, size, LEADERS)                 # a leader pairs with all, others with the leaders
    rows = np.argsort(image, kind="stable")                         # streamed image by image
    count = np.cumsum(reach[rows])
    cuts = np.flatnonzero(np.diff(image[rows]) != 0) + 1           # blocks end between images
    ends = np.r_[cuts, n]
    lo = 0
    while lo < n:
        hi = ends[np.searchsorted(ends, lo, side="right"):]
        hi = int(hi[max(0, np.searchsorted(count[hi - 1] - (count[lo - 1] if lo else 0), BLOCK_PAIRS,
                                           side="right") - 1)])
        r = rows[lo:hi]
        rep = np.repeat(r, reach[r])
        other = first[rep] + np.arange(len(rep)) - np.repeat(np.cumsum(reach[r]) - reach[r], reach[r])
        ok = image[other] > image[rep]                              # each pair from its smaller image's side
        rep, other = rep[ok], other[ok]
        x, y = np.where(pos[rep] < pos[other], rep, other), np.where(pos[rep] < pos[other], other, rep)
        order = np.lexsort((first[x], tie[x], pos[x], image[other], image[rep]))
        x, y, a, b = x[order], y[order], image[rep][order], image[other][order]
        new = np.ones(len(a), bool)
        new[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
        rank = np.arange(len(a)) - np.maximum.accumulate(np.where(new, np.arange(len(a)), 0))
        x, y = x[rank < alignments], y[rank < alignments]
        for i in range(0, len(x), CHUNK):
            yield x[i:i + CHUNK], y[i:i + CHUNK]
        lo = hi


def verified_pairs(buckets: np.ndarray, owners: np.ndarray, pixels, record: list | None = None,
                   prio: np.ndarray | None = None, alignments: int = ALIGNMENTS) -> tuple[np.ndarray, np.ndarray, int]:
    """Candidate pairs of the members (sorted by bucket, key) checked on their views' pixels: (owner a, owner b of the
    verified pairs, number of candidate pairs checked). `pixels(idx)` gives the members' aligned views; `record`
    (benchmarks) receives (owner a, owner b, *`measures`) of every check. Holds one chunk
    of pairs at a time and the verified ones (one edge per pair): memory does not grow with the candidates. `prio`,
    `alignments`: as `candidate_pairs`."""
    a, b, checked, last = [], [], 0, None
    for x, y in candidate_pairs(buckets, owners, prio, alignments):
        ox, oy = owners[x], owners[y]
        checked += len(x)
        found = measures(pixels(x), pixels(y))
        if record is not None:
            record.append((ox, oy, *found))
        ok = passes(*found)
        vx, vy = ox[ok], oy[ok]
        if len(vx):  # a pair's alignments come one after another: keep the first that passed, one edge per pair
            new = np.ones(len(vx), bool)
            new[1:] = (vx[1:] != vx[:-1]) | (vy[1:] != vy[:-1])
            new[0] = last != (vx[0], vy[0])
            last = (vx[-1], vy[-1])
            a.append(vx[new]), b.append(vy[new])
    if not a:
        return np.zeros(0, owners.dtype), np.zeros(0, owners.dtype), checked
    return np.concatenate(a), np.concatenate(b), checked


def star_groups(a: np.ndarray, b: np.ndarray) -> dict[str, tuple[str, int]]:
    """Groups from verified edges between keys (a[k], b[k]), without chains: in key order, an image not yet placed
    keeps, and its verified neighbours not yet placed join it. key -> (keeper, group size) for groups of two or more
    (as `groups.groups_of`). Linear in edges after one sort; the edges are verified duplicates only."""
    keys, keepers, sizes = star_group_arrays(a, b)
    return {str(k): (str(g), int(s)) for k, g, s in zip(keys, keepers, sizes)}


def star_group_arrays(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`star_groups` as three arrays (the members' keys in key order, their keepers' keys, their group sizes): no
    Python object a member (`groups.GroupLookup`)."""
    if len(a) == 0:
        return np.zeros(0, object), np.zeros(0, object), np.zeros(0, np.int64)
    names, idx = np.unique(key_texts(np.concatenate([np.asarray(a, dtype=object), np.asarray(b, dtype=object)])),
                           return_inverse=True)
    ia, ib = idx[:len(a)], idx[len(a):]
    src, dst = np.r_[ia, ib], np.r_[ib, ia]
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    bounds = np.searchsorted(src, np.arange(len(names) + 1))
    keeper = np.full(len(names), -1, np.int64)
    for i in range(len(names)):  # names are sorted: the smallest key of a group is met first
        if keeper[i] >= 0:
            continue
        keeper[i] = i
        nb = dst[bounds[i]:bounds[i + 1]]
        keeper[nb[keeper[nb] < 0]] = i
    size = np.bincount(keeper, minlength=len(names))[keeper]
    many = size > 1
    return names[many], names[keeper[many]], size[many].astype(np.int64)
