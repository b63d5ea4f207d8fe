"""Grouping binary codes: identical codes in one linear pass, and near codes within a Hamming radius.

A code is a row of packed bits, (N, B/8) uint8 (the autoencoder's 128-bit code is 16 bytes). Everything here is
vectorised numpy over one partition of the codes; `preprocessing.dedup.dataset` hash-partitions a dataset's codes across a
Ray cluster with `partition_of` and calls these per partition, so no node ever holds the whole dataset.

- Identical codes (radius 0): hash-partition into cache-sized chunks, then an LSD radix sort over 16-bit digits per
  chunk (numpy's stable sort of uint16 *is* a radix sort): N codes of B bits cost B/16 + 1 linear passes, O(N B),
  no comparison sort, no Python loop over rows.
- Within radius r (multi-index hashing, Norouzi et al. 2012): split the B bits into r+1 blocks; by pigeonhole two codes
  at Hamming distance <= r agree exactly on at least one block. Each block is grouped exactly as above, every pair that
  shares a block bucket is a candidate, and candidates are verified by popcount of the XOR. Groups are the connected
  components of the verified pairs (so near-duplicate chains merge). Cost: (r+1) linear passes plus the candidates,
  sum over blocks of sum_bucket s(s-1)/2 for bucket sizes s: with well-spread codes a block of B/(r+1) bits leaves
  about N^2 / 2^(B/(r+1)+1) chance candidates per block (negligible for B=128, r<=3 up to ~1e8 codes), plus the true
  near pairs; codes concentrated in a few buckets (a constant block) degrade towards N^2, and `max_candidates`
  turns that into a clear error instead of an endless run.
- Several codes per image (`group_views`, the multi-view hash of `views`): the N*V codes are grouped as above and
  each image is joined to the buckets of its codes; groups are connected components of that image-bucket graph.
"""

from __future__ import annotations

import sys

import numpy as np

MAX_CANDIDATES = 50_000_000
CHUNK = 1 << 16        # codes grouped at once: small enough to stay in cache


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """(N, B) bool -> (N, ceil(B/8)) uint8, most significant bit first (np.packbits order)."""
    return np.packbits(np.asarray(bits, dtype=bool), axis=1)


def stack_codes(codes) -> np.ndarray:
    """Equal-length codes as bytes objects (a Ray Data column) -> (N, bytes) uint8, in one copy (a uint8 tensor
    column, as the group stage's `code`, is returned as it is): a frombuffer per
    row cost 2 us, 6 of the 9 CPU-seconds of a 3.3M-row group partition (25k images x 131 distinct views)."""
    if isinstance(codes, np.ndarray) and codes.dtype == np.uint8 and codes.ndim == 2:
        return codes  # already a tensor column
    if len(codes) == 0:
        return np.zeros((0, 0), np.uint8)
    return np.frombuffer(b"".join(codes), np.uint8).reshape(len(codes), -1)


def _digits(codes: np.ndarray) -> np.ndarray:
    """(N, nbytes) uint8 -> (N, ceil(nbytes/2)) uint16 digits, most significant first."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.ndim != 2:
        raise ValueError(f"codes must be (N, bytes) uint8, got shape {codes.shape}")
    if codes.shape[1] % 2:
        codes = np.pad(codes, ((0, 0), (0, 1)))
    return codes.view(">u2").astype(np.uint16)


def _radix_order(digits: np.ndarray) -> np.ndarray:
    """Row order that sorts the digit rows lexicographically; one stable (radix) pass per 16-bit digit."""
    columns = np.ascontiguousarray(digits.T)  # each pass gathers from one contiguous column
    order = np.arange(len(digits))
    for d in range(columns.shape[0] - 1, -1, -1):
        order = order.take(np.argsort(columns[d].take(order), kind="stable"))
    return order


def _group_chunk(digits: np.ndarray) -> np.ndarray:
    n = len(digits)
    order = _radix_order(digits)
    s = np.take(digits, order, axis=0)  # `take` copies rows ~9x faster than fancy indexing
    starts = np.ones(n, bool)
    starts[1:] = (s[1:] != s[:-1]).any(axis=1)
    groups = np.empty(n, np.int64)
    groups[order] = np.cumsum(starts) - 1
    return groups


def group_identical(codes: np.ndarray) -> np.ndarray:
    """Group id per row (0..G-1) such that rows share an id iff their codes are equal. Linear time.

    Large inputs are first hash-partitioned (one radix pass on a 16-bit partition number) into cache-sized chunks,
    the same split `partition_of` gives the cluster, so the per-row cost stays flat as N grows.
    """
    n = len(codes)
    if n == 0:
        return np.zeros(0, np.int64)
    digits = _digits(codes)
    if n <= CHUNK:
        return _group_chunk(digits)
    parts = partition_of(codes, -(-n // CHUNK)).astype(np.uint16)
    order = np.argsort(parts, kind="stable")
    digits = np.take(digits, order, axis=0)  # one reorder: every chunk is then a contiguous slice
    bounds = np.cumsum(np.bincount(parts))
    sorted_groups, offset = np.empty(n, np.int64), 0
    for lo, hi in zip(np.r_[0, bounds[:-1]], bounds):
        if hi == lo:
            continue
        g = _group_chunk(digits[lo:hi])
        sorted_groups[lo:hi] = g + offset
        offset += int(g.max()) + 1
    groups = np.empty(n, np.int64)
    groups[order] = sorted_groups
    return groups


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance between two (N, bytes) uint8 arrays."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=1, dtype=np.int64)


def _blocks(bits: int, radius: int) -> list[tuple[int, int]]:
    """r+1 contiguous bit ranges as equal as possible (the multi-index split)."""
    edges = np.linspace(0, bits, radius + 2).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def near_pairs(codes: np.ndarray, radius: int, max_candidates: int = MAX_CANDIDATES) -> np.ndarray:
    """All pairs (i < j) of rows within Hamming distance `radius`, as an (E, 2) int64 array (multi-index hashing)."""
    n, nbytes = codes.shape
    bits = np.unpackbits(codes, axis=1)
    found, candidates = [], 0
    for lo, hi in _blocks(nbytes * 8, radius):
        block_groups = group_identical(pack_bits(bits[:, lo:hi]))
        counts = np.bincount(block_groups)
        candidates += int((counts * (counts - 1) // 2).sum())
        if candidates > max_candidates:
            raise ValueError(f"Hamming radius {radius}: more than {max_candidates:,} candidate pairs (codes too "
                             f"concentrated for multi-index hashing); use a smaller radius")
        multi = np.flatnonzero(counts[block_groups] > 1)          # rows whose block value is shared
        if len(multi) < 2:
            continue
        order = multi[np.argsort(block_groups[multi], kind="stable")]
        g = block_groups[order]
        for d in range(1, int(counts.max())):                      # pairs d apart in bucket order, same bucket
            same = g[:-d] == g[d:]
            if not same.any():
                break
            i, j = order[:-d][same], order[d:][same]
            close = hamming(codes[i], codes[j]) <= radius
            found.append(np.stack([np.minimum(i, j)[close], np.maximum(i, j)[close]], axis=1))
    if not found:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(found), axis=0)


def group_codes(codes: np.ndarray, radius: int = 0) -> np.ndarray:
    """Group id per row: equal codes (radius 0, linear) or connected components of pairs within `radius`."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if radius == 0 or len(codes) < 2:
        return group_identical(codes)
    pairs = near_pairs(codes, radius)
    return components(len(codes), pairs[:, 0], pairs[:, 1])


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component id (0..C-1) of each of n nodes under the edges (a[k], b[k]): union-find, linear in n + edges."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), np.int8), (np.asarray(a), np.asarray(b))), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def group_views(codes: np.ndarray, radius: int = 0) -> np.ndarray:
    """Group id per image from (N, V, bytes) codes, V views per image: images sharing ANY code (within `radius`)
    are one group, transitively. Linear in N*V at radius 0: the N*V codes are bucketed (`group_codes`) and each image
    is joined to its buckets; an image's own views falling in one bucket join nothing but itself."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.ndim == 2:
        codes = codes[:, None]
    n, v = codes.shape[:2]
    if n == 0:
        return np.zeros(0, np.int64)
    buckets = group_codes(codes.reshape(n * v, -1), radius)
    owner = np.repeat(np.arange(n), v)
    groups = components(n + int(buckets.max()) + 1, owner, n + buckets)[:n]
    return np.unique(groups, return_inverse=True)[1].astype(np.int64)


def keep_smallest_key(groups: np.ndarray, keys: np.ndarray | list[str]) -> np.ndarray:
    """Boolean mask keeping, in every group, the row with the smallest key (a deterministic, order-free rule)."""
    keys = np.asarray(keys)
    n = len(keys)
    if n == 0:
        return np.zeros(0, bool)
    rank = np.empty(n, np.int64)
    rank[np.argsort(keys, kind="stable")] = np.arange(n)
    best = np.full(int(groups.max()) + 1, n, np.int64)
    np.minimum.at(best, groups, rank)
    return rank == best[groups]


def partition_of(codes: np.ndarray, partitions: int) -> np.ndarray:
    """A well-mixed partition number per code (0..partitions-1); equal codes always land in the same partition.

    Hashes the whole code (Fibonacci hashing of the XOR of its 64-bit words), since the leading bits of a learned
    code can be nearly constant and would pile every row into one partition.
    """
    return mix_partition(code_mix(codes), partitions)


def mix_partition(mix: np.ndarray, partitions: int) -> np.ndarray:
    """`partition_of` from the codes' `code_mix`, for a caller that has it already."""
    return ((mix >> np.uint64(32)) % np.uint64(max(1, partitions))).astype(np.int64)


def code_mix(codes: np.ndarray) -> np.ndarray:
    """(N, bytes) codes -> (N,) uint64, well mixed (Fibonacci hashing of the XOR of the code's 64-bit words).

    The words are read big-endian (the code's first byte most significant). They are XORed a column at a time in the
    machine's own order and only the result is swapped (XOR and a byte swap commute): `bitwise_xor.reduce` along
    each row's two words was slow, mostly the reduction along so short an axis and partly the foreign byte order,
    and the group stage mixes ~400 codes an image twice (`code_hashes`, `view_rows`)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    pad = (-codes.shape[1]) % 8
    if pad:
        codes = np.pad(codes, ((0, 0), (0, pad)))
    words = codes.view(np.uint64)
    mix = words[:, 0].copy()
    for j in range(1, words.shape[1]):
        mix ^= words[:, j]
    if sys.byteorder == "little":
        mix.byteswap(inplace=True)
    mix *= np.uint64(0x9E3779B97F4A7C15)
    return mix
