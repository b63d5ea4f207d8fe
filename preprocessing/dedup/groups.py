"""The group stage of `preprocessing.dedup.dataset` (layer: preprocessing): from every image's view codes to kept rows.

Multi-view hash (`views` > 1, the default): codes only PROPOSE pairs, pixels decide (`verify`). Each (image, distinct
code) row, the probes' codes one bit away included (`probed`), whose code another image has too (`code_hashes`,
`shared_hashes`) goes to a hash partition of its code; a partition buckets equal codes and turns the buckets with two or
more images (capped) into checks, a candidate pair in one alignment each; the two views of every check are cut from the
source shards; each partition then checks its pairs in bounded chunks and emits only the verified edges; the driver
builds star groups from them (every removed image verified against its keeper, the group's smallest key). `views: 1`
(the paper's single hash) is unchanged: images with equal codes are one group (`bucket_edges`, `edge_groups`). An
image's own views sharing a code are one row, never an edge: an image is not its own duplicate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from preprocessing.dedup.verify import (ALIGNMENTS, bucket_members, candidate_pairs, image_ids, key_texts, star_groups,
                                        verified_pairs)
from preprocessing.dedup.views import cut_views
from preprocessing.dedup.semantic_hash import (code_mix, components, group_identical, keep_smallest_key,
                                               mix_partition, partition_of, stack_codes)


def codes_of(batch: dict[str, np.ndarray], code_bytes: int) -> np.ndarray:
    """(N, views, code_bytes) uint8 from the `views` column (each row: its views' codes, concatenated)."""
    views = stack_codes(batch["views"])
    return views.reshape(len(views), -1, code_bytes)


def probe_codes(codes: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """(N, V, bytes) codes and (N, V, P) bit indices -> (N, V * P, bytes): each view's code with one of its bits
    flipped, view by view (the probes of view v are columns v*P .. v*P + P-1). Bit k is unit k (`pack_bits`: most
    significant bit first)."""
    n, v, p = flips.shape
    out = np.repeat(codes, p, axis=1)
    bit = flips.reshape(-1).astype(np.intp)
    at = np.arange(n * v * p, dtype=np.intp) * codes.shape[2] + (bit >> 3)  # each code's byte `bit // 8`, by one
    out.reshape(-1)[at] ^= np.uint8(0x80) >> (bit & 7).astype(np.uint8)      # flat index (a 3-D one cost more)
    return out


def probed(codes: np.ndarray, flips: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Codes and probes side by side, (N, V + V*P, bytes), and the view each column is aligned by: a probe of view v
    is checked over view v's pixels."""
    v = codes.shape[1]
    if flips is None or flips.shape[2] == 0:
        return codes, np.arange(v)
    p = flips.shape[2]
    return np.concatenate([codes, probe_codes(codes, flips)], axis=1), np.r_[np.arange(v), np.repeat(np.arange(v), p)]


def distinct_views(codes: np.ndarray, view_of: np.ndarray,
                   entries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, columns, bytes) codes and the view of each column (`probed`) -> (owner image, view index, code) per distinct
    (image, code), its first column; `entries` (indices into the N x columns codes, ascending) limits it to those."""
    n, v = codes.shape[:2]
    flat = codes.reshape(n * v, -1)
    entries = np.arange(n * v) if entries is None else entries
    owner, flat = entries // v, flat[entries]
    same = group_identical(flat)
    first = np.unique(owner * (int(same.max()) + 1 if len(same) else 1) + same, return_index=True)[1]
    return owner[first], np.asarray(view_of)[entries[first] % v], flat[first]


def _probed_codes(batch: dict[str, np.ndarray], code_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch of coded rows -> its codes and probes (`probed`: (N, columns, bytes), the view of each column)."""
    codes = codes_of(batch, code_bytes)
    flips = None
    if "flips" in batch:
        f = stack_codes(batch["flips"])
        flips = f.reshape(len(f), codes.shape[1], -1)
    return probed(codes, flips)


def _column_mix(codes: np.ndarray) -> np.ndarray:
    """(N, columns, bytes) codes -> their `code_mix`, (N * columns,) in row-major order."""
    return code_mix(codes.reshape(-1, codes.shape[2]))


def code_hashes(batch: dict[str, np.ndarray], code_bytes: int, partitions: int) -> list[np.ndarray]:
    """A batch of coded rows -> the distinct `code_mix` values of each image (probes included), one array per code
    partition: what `shared_hashes` counts. An image's own columns sharing a code count once."""
    if len(batch["key"]) == 0:  # a block whose images were all left out (blank)
        return [np.zeros(0, np.uint64) for _ in range(partitions)]
    codes = _probed_codes(batch, code_bytes)[0]
    mix = np.sort(_column_mix(codes).reshape(codes.shape[:2]), axis=1)
    first = np.ones(mix.shape, bool)
    first[:, 1:] = mix[:, 1:] != mix[:, :-1]
    mix = mix[first]
    part = mix_partition(mix, partitions)
    return [mix[part == p] for p in range(partitions)]


def shared_hashes(*pieces: np.ndarray) -> np.ndarray:
    """One code partition's `code_hashes` from every batch -> the sorted hashes that two or more images have: every
    code two images share (and, rarely, two codes with one 64-bit mix, which the buckets then tell apart).

    Sorted in place, the values met twice read off neighbours: `np.unique(..., return_counts=True)` made four more
    arrays the size of the input (its sorted copy, the uniques, their indices, the counts), ~1 GB a partition at 300k
    images, each a fresh mapping the kernel zeroes (benchmarks/dedup_lookup.py)."""
    mix = np.concatenate(pieces) if pieces else np.zeros(0, np.uint64)  # a fresh array (the pieces are read-only)
    mix.sort()
    twice = mix[1:][mix[1:] == mix[:-1]]  # a value met k times is here k - 1 times, in order
    return twice[np.r_[True, twice[1:] != twice[:-1]]] if len(twice) else twice


def shared_lookup(*pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`shared_hashes` of one code partition and their `bucket_starts`: what `view_rows` looks its codes up in (made
    once a partition, where the count is made, not once for every block that looks up in it)."""
    found = shared_hashes(*pieces)
    return found, bucket_starts(found)


def bucket_starts(values: np.ndarray) -> np.ndarray:
    """Sorted 64-bit hashes -> where each of 2**b buckets of their top b bits starts in them (2**b + 1 offsets, the
    last = len), b = floor(log2(len)): about one value a bucket, since the hashes are well mixed (`code_mix`)."""
    bits = max(len(values), 1).bit_length() - 1
    top = (values >> np.uint64(64 - bits)).astype(np.intp) if bits else np.zeros(len(values), np.intp)
    starts = np.zeros(2 ** bits + 1, np.int32 if len(values) < 2**31 else np.int64)  # (half the object's size)
    np.cumsum(np.bincount(top, minlength=2 ** bits), out=starts[1:], dtype=starts.dtype)
    return starts


def is_in(values: np.ndarray, starts: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Which `queries` are in the sorted hashes `values` (`starts`: their `bucket_starts`): each query is compared with
    the few values of its bucket, the n-th of every bucket at once, so the work is one pass a value a bucket holds.
    A binary search per query (with the queries sorted first, to keep it in cache) cost 2.0-2.6x as much
    (benchmarks/dedup_lookup.py): ~4% of a 300k-image dedup's CPU in a py-spy profile."""
    hit = np.zeros(len(queries), bool)
    if len(values) == 0 or len(queries) == 0:
        return hit
    bits = (len(starts) - 1).bit_length() - 1  # len(starts) = 2**bits + 1
    bucket = (queries >> np.uint64(64 - bits)).astype(np.intp) if bits else np.zeros(len(queries), np.intp)
    first, size = starts[bucket], starts[bucket + 1] - starts[bucket]
    active, n = np.flatnonzero(size), 0
    while len(active):
        hit[active] |= values[first[active] + n] == queries[active]
        n += 1
        active = active[size[active] > n]
    return hit


def view_rows(batch: dict[str, np.ndarray], code_bytes: int, partitions: int,
              shared: list[tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """One row per distinct (image, code), probes (`flips` column) included: an image's own views sharing a code count
    once. The code is a (rows, bytes) uint8 tensor column: as bytes objects, 10M rows (25k images with probes) took ~1.4
    s more to make and as long to read back.

    `shared` (`shared_lookup`, one per code partition) keeps only the codes that another image may have too: a
    code one image has makes no bucket, and those were 95% of the rows (9.6M at 25k images)."""
    keys = np.asarray(batch["key"], dtype=object)
    codes, view_of = _probed_codes(batch, code_bytes)
    entries = None
    if shared is not None:
        mix = _column_mix(codes)
        part = mix_partition(mix, partitions)
        keep = np.zeros(len(mix), bool)
        for p, (found, starts) in enumerate(shared):
            at = np.flatnonzero(part == p)
            if len(at) and len(found):
                keep[at] = is_in(found, starts, mix[at])
        entries = np.flatnonzero(keep)
    owner, view, flat = distinct_views(codes, view_of, entries)
    out = {"key": keys[owner], "code": np.ascontiguousarray(flat), "part": partition_of(flat, partitions)}
    if "shard" in batch:  # where the image lives, for the verification's pixels
        out.update(shard=np.asarray(batch["shard"])[owner], row=np.asarray(batch["row"])[owner],
                   view=view.astype(np.int64))
    return out


def member_rows(batch: dict[str, np.ndarray], partitions: int = 1) -> dict[str, np.ndarray]:
    """One hash partition of `view_rows` -> its checks: the candidate pairs (`candidate_pairs` over the buckets of two
    or more images, capped) as two rows each, sharing a `bucket` id unique across partitions; `left` counts members a
    capped bucket did not send (on the first row). Each check also gets its pair's partition (`pair`, the same
    wherever the pair is met) and a priority (`prio`, a hash of its code) for `first_alignments`.

    A check, not a bucket, goes on: a true duplicate shares ~100 of its 135 codes with its original, so its members
    were ~35x the checks made of them (141,614 members for 3,944 checks at 25k images), and each member's pixels
    (6 KB) went through two shuffles."""
    rows, buckets, left = bucket_members(batch["key"], batch["code"])
    part = int(batch["part"][0]) if len(batch["part"]) else 0
    owners = np.asarray(batch["key"], dtype=object)[rows]  # Python strings: `candidate_pairs` numbers them by a dict
    prio = code_priority(stack_codes(np.asarray(batch["code"])[rows]))
    pairs = list(candidate_pairs(buckets, owners, prio))
    x = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, np.int64)
    y = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, np.int64)
    pick = rows[np.stack([x, y], axis=1).reshape(-1)]
    out = {c: np.asarray(batch[c])[pick] for c in ("key", "shard", "row", "view", "part")}
    out["bucket"] = (np.int64(part) << np.int64(32)) + np.repeat(np.arange(len(x), dtype=np.int64), 2)
    starts = np.r_[0, np.flatnonzero(buckets[1:] != buckets[:-1]) + 1] if len(buckets) else np.zeros(0, np.int64)
    position = np.arange(len(buckets)) - np.repeat(starts, np.diff(np.r_[starts, len(buckets)]))
    out["pos"] = np.repeat(position[x], 2)   # the leader's place in its bucket: the first key of the order
    out["prio"] = np.repeat(prio[x], 2)
    out["pair"] = np.repeat(np.array([pair_partition(a, b, partitions) for a, b in zip(owners[x], owners[y])],
                                     np.int64), 2)
    out["left"] = np.zeros(len(pick), np.int64)
    if len(pick):  # a capped bucket (left > 0) has checks: its leaders pair with the rest
        out["left"][0] = left
    return out


def code_priority(codes: np.ndarray) -> np.ndarray:
    """(N, bytes) codes -> (N,) int64: the order in which a pair's shared buckets are checked (after the leader's
    position)."""
    return code_mix(codes).view(np.int64) if len(codes) else np.zeros(0, np.int64)


def pair_partition(a: str, b: str, partitions: int) -> int:
    """The partition of the pair {a, b}: the same in every process (no salted `hash`), whichever comes first."""
    a, b = min(a, b), max(a, b)
    digest = hashlib.blake2b(f"{a}\0{b}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % max(1, partitions)


def first_alignments(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All the checks of the pairs of one `pair` partition -> at most ALIGNMENTS per pair, the first by (leader
    position, `prio`) as `candidate_pairs` orders them in one partition (so any number of partitions checks the same
    alignments), with `part` set to the pair's partition (so its alignments are verified together: one edge per pair).

    Each code partition caps a pair at ALIGNMENTS of ITS buckets; a pair's ~100 shared codes are spread over all
    partitions, so without this a pair was checked up to ALIGNMENTS x partitions times: at 25k / 50k / 100k images
    (1 / 2 / 4 partitions) 3,944 / 14,502 / 52,283 checks for 654 / 1,356 / 2,798 images removed."""
    ids = image_ids(np.asarray(batch["key"], dtype=object))  # key order as numbers (`verify.key_texts`)
    check = np.asarray(batch["bucket"])
    order = np.lexsort((ids, check))                        # two rows a check, its smaller key first
    first, second = order[0::2], order[1::2]
    by_pair = np.lexsort((check[first], np.asarray(batch["prio"])[first], np.asarray(batch["pos"])[first],
                          ids[second], ids[first]))
    first, second = first[by_pair], second[by_pair]
    a, b = ids[first], ids[second]
    new = np.ones(len(a), bool)
    new[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    rank = np.arange(len(a)) - np.maximum.accumulate(np.where(new, np.arange(len(a)), 0))
    kept = np.stack([first[rank < ALIGNMENTS], second[rank < ALIGNMENTS]], axis=1).reshape(-1)
    out = {c: np.asarray(batch[c])[kept] for c in batch}
    out["part"] = np.asarray(batch["pair"])[kept]
    return out


def pixel_bytes(pixels: np.ndarray) -> np.ndarray:
    """(M, S, S, 3) float32 view pixels (`cut_views`: 2x2 means of uint8 pixels, multiples of 1/4) -> a bytes object a
    row, as the check rows carry them to `verify_rows`: 4 x each pixel in uint16, exact. (They were float16, exact too,
    but numpy converts float16 in software: 11-14 us a row each way, benchmarks/dedup_verify.py; ~1% of a 300k-image
    dedup's CPU.)"""
    pixels = np.asarray(pixels, np.float32)
    sums = (pixels * 4).astype(np.uint16).reshape(len(pixels), int(np.prod(pixels.shape[1:])))
    return np.array([r.tobytes() for r in sums], dtype=object)


def bytes_pixels(rows: np.ndarray) -> np.ndarray:
    """`pixel_bytes` rows -> their (M, S, S, 3) float32 pixels again (S from the rows' length)."""
    if len(rows) == 0:
        return np.zeros((0, 0, 0, 3), np.float32)
    side = int(round((len(rows[0]) // 2 / 3) ** 0.5))
    return np.frombuffer(b"".join(rows), np.uint16).reshape(-1, side, side, 3) * np.float32(0.25)


def verify_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One partition of checks (two rows each) with their views' pixels (`pixel_bytes`) -> verified edges between
    keys, and the number of candidate pairs checked (on the first row; one row with empty keys when nothing
    verified)."""
    keys = key_texts(batch["key"])
    order = np.lexsort((image_ids(keys), np.asarray(batch["bucket"])))
    keys, buckets = keys[order], np.asarray(batch["bucket"])[order]
    pix = np.asarray(batch["pixels"], dtype=object)[order]
    a, b, checked = verified_pairs(buckets, keys, lambda idx: bytes_pixels(pix[idx]))
    a, b = np.r_[np.zeros(1, object), a.astype(object)], np.r_[np.zeros(1, object), b.astype(object)]
    a[0] = b[0] = ""
    return {"a": a, "b": b, "checked": np.r_[checked, np.zeros(len(a) - 1, np.int64)]}


def verified_groups(keys: np.ndarray, codes: np.ndarray, sources: np.ndarray, record: list | None = None,
                    flips: np.ndarray | None = None, alignments: int = ALIGNMENTS) -> tuple[dict, dict]:
    """In one process (benchmarks, tests): (N, views, bytes) codes and (N, S, S, 3) view sources -> (`groups_of`-style
    groups from verified edges, figures: candidate pairs checked, verified edges, members left unchecked); `record`
    and `alignments` as `verified_pairs`; `flips` (`views.encode_views_probed`): probes too."""
    keys = key_texts(keys)
    owner, view, flat = distinct_views(*probed(np.asarray(codes, np.uint8), flips))
    rows, buckets, left = bucket_members(keys[owner], flat)
    members, views = owner[rows], view[rows]
    a, b, checked = verified_pairs(buckets, members, lambda idx: cut_views(sources[members[idx]], views[idx]), record,
                                   prio=code_priority(flat[rows]), alignments=alignments)
    groups = star_groups(keys[a], keys[b])
    return groups, {"checked": checked, "verified": len(a), "unchecked": left}


def group_ids(keys: np.ndarray, groups: dict[str, tuple[str, int]]) -> np.ndarray:
    """A group id per key (its keeper's position; itself when ungrouped): the array form of `groups_of`."""
    keys = key_texts(keys)
    pos = {k: i for i, k in enumerate(keys)}
    return np.array([pos[groups[k][0]] if k in groups else i for i, k in enumerate(keys)], np.int64)


def bucket_edges(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Edges (a, b) between keys whose codes are equal, a star per bucket around its smallest key (linear)."""
    keys = np.asarray(batch["key"], dtype=object)
    if len(keys) < 2:
        return {"a": np.zeros(0, object), "b": np.zeros(0, object)}
    buckets = group_identical(stack_codes(batch["code"]))
    keep = keep_smallest_key(buckets, image_ids(keys))
    hub = np.empty(int(buckets.max()) + 1, dtype=object)
    hub[buckets[keep]] = keys[keep]
    other = ~keep & (hub[buckets] != keys)
    return {"a": hub[buckets][other], "b": keys[other]}


def groups_of(keys: np.ndarray, groups: np.ndarray) -> dict[str, tuple[str, int]]:
    """key -> (keeper: the group's smallest key, group size), for the images of groups with more than one member."""
    keys = np.asarray(keys, dtype=object)
    if len(keys) == 0:
        return {}
    size = np.bincount(groups)[groups]
    keep = keep_smallest_key(groups, image_ids(keys))
    keeper = np.empty(int(groups.max()) + 1, dtype=object)
    keeper[groups[keep]] = keys[keep]
    many = size > 1
    return {str(k): (str(g), int(s)) for k, g, s in zip(keys[many], keeper[groups][many], size[many])}


def edge_groups(a: np.ndarray, b: np.ndarray) -> dict[str, tuple[str, int]]:
    """Connected components of the key edges (union-find), as `groups_of` gives them."""
    keys, idx = np.unique(key_texts(np.concatenate([a, b])), return_inverse=True)
    return groups_of(keys, components(len(keys), idx[:len(a)], idx[len(a):]))


def key_hashes(keys) -> np.ndarray:
    """A 64-bit hash of each key's UTF-8 text, the same in every process (Python's `hash` is salted per process)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "little")
                        for k in keys), np.uint64, len(keys))


@dataclass(frozen=True)
class GroupLookup:
    """The members of groups of two or more, for `decide`: their 64-bit key hashes, sorted, beside their keys, their
    keepers' keys (Arrow) and their group sizes (numpy), so a task finds its rows by binary search and confirms each
    hit on the key itself.

    Why not a dict of every member's key: every `decide` task (one a source shard) received it, and unpickling a dict
    builds its Python objects again: 0.17 s a task at the ~450k colliding rows of the paper's LSUN de-duplication, so
    the tasks' cost grew as shards x duplicates (benchmarks/dedup_report.py). Arrays travel as buffers, which Ray
    maps without building anything; their driver copy is ~100 bytes a member (40-character keys), not a few
    hundred."""

    hashes: np.ndarray
    keys: pa.Array
    keepers: pa.Array
    sizes: np.ndarray

    @classmethod
    def of(cls, keys, keepers, sizes) -> "GroupLookup":
        """From the members' keys, their keepers' keys and their group sizes (`verify.star_group_arrays`)."""
        keys = key_texts(keys)               # hashed and stored as the same text
        hashes = key_hashes(keys)
        order = np.argsort(hashes, kind="stable")
        take = pa.array(order)
        return cls(hashes[order], pa.array(keys, pa.string()).take(take), pa.array(keepers, pa.string()).take(take),
                   np.asarray(sizes, np.int64)[order])

    @classmethod
    def of_dict(cls, groups: dict[str, tuple[str, int]]) -> "GroupLookup":
        """From `groups_of`'s dict (the paths that make one: `views: 1`, a Hamming radius)."""
        return cls.of(list(groups), [g for g, _ in groups.values()], [s for _, s in groups.values()])

    def __len__(self) -> int:
        return len(self.hashes)

    def as_dict(self) -> dict[str, tuple[str, int]]:
        """`groups_of`'s dict (tests, benchmarks: a few thousand members)."""
        return {k: (g, int(s)) for k, g, s in zip(self.keys.to_pylist(), self.keepers.to_pylist(), self.sizes)}

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Each key's position here, or -1. A hit on the hash is confirmed on the key; the next entries are tried
        while they share the hash (two keys with one 64-bit hash: possible, never assumed away)."""
        at = np.full(len(keys), -1, np.int64)
        n = len(self.hashes)
        if n == 0 or len(keys) == 0:
            return at
        h = key_hashes(keys)
        i = np.minimum(np.searchsorted(self.hashes, h), n - 1)
        for c in np.flatnonzero(self.hashes[i] == h):
            j = int(i[c])
            while j < n and self.hashes[j] == h[c]:
                if self.keys[j].as_py() == str(keys[c]):
                    at[c] = j
                    break
                j += 1
        return at


def decide(batch: dict[str, np.ndarray], groups: GroupLookup) -> dict[str, np.ndarray]:
    """Keep (bool), group (the keeper's key: a stable group name) and size of each row (`GroupLookup`)."""
    keys = key_texts(batch["key"])
    at = groups.find(keys)
    hit = at >= 0
    group, size = keys.copy(), np.ones(len(keys), np.int64)
    if hit.any():
        group[hit] = np.array(groups.keepers.take(pa.array(at[hit])).to_pylist(), dtype=object)
        size[hit] = groups.sizes[at[hit]]
    return {**{k: batch[k] for k in ("key", "shard", "row", "hash")},
            "keep": np.array([g == k for g, k in zip(group, keys)], bool), "group": group, "size": size}
