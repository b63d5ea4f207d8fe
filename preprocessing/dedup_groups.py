"""The group stage of `preprocessing.dedup` (layer: preprocessing): from every image's view codes to kept rows.

Images sharing ANY code are one group (the multi-view hash, `dedup_views`): each (image, distinct code) row goes to a
hash partition of its code; a partition buckets equal codes in one linear pass and emits a star of key edges per
bucket (only colliding images produce edges, a few per duplicate); the driver joins the edges into connected
components. Each group keeps its smallest key, so the keeper does not depend on order or partitioning. An image's
own views sharing a code are one row, never an edge: an image is not its own duplicate.
"""

from __future__ import annotations

import numpy as np

from preprocessing.semantic_hash import components, group_identical, keep_smallest_key, partition_of


def codes_of(batch: dict[str, np.ndarray], code_bytes: int) -> np.ndarray:
    """(N, views, code_bytes) uint8 from the `views` column (each row: its views' codes, concatenated)."""
    return np.stack([np.frombuffer(v, np.uint8).reshape(-1, code_bytes) for v in batch["views"]])


def view_rows(batch: dict[str, np.ndarray], code_bytes: int, partitions: int) -> dict[str, np.ndarray]:
    """One row per distinct (image, code): an image's own views sharing a code count once."""
    keys, codes = np.asarray(batch["key"], dtype=object), codes_of(batch, code_bytes)
    n, v = codes.shape[:2]
    flat, owner = codes.reshape(n * v, -1), np.repeat(np.arange(n), v)
    same = group_identical(flat)
    first = np.unique(owner * (int(same.max()) + 1 if len(same) else 1) + same, return_index=True)[1]
    flat, owner = flat[first], owner[first]
    return {"key": keys[owner], "code": np.array([c.tobytes() for c in flat], dtype=object),
            "part": partition_of(flat, partitions)}


def bucket_edges(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Edges (a, b) between keys whose codes are equal, a star per bucket around its smallest key (linear)."""
    keys = np.asarray(batch["key"], dtype=object)
    if len(keys) < 2:
        return {"a": np.zeros(0, object), "b": np.zeros(0, object)}
    buckets = group_identical(np.stack([np.frombuffer(c, np.uint8) for c in batch["code"]]))
    keep = keep_smallest_key(buckets, keys.astype(str))
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
    keep = keep_smallest_key(groups, keys.astype(str))
    keeper = np.empty(int(groups.max()) + 1, dtype=object)
    keeper[groups[keep]] = keys[keep]
    many = size > 1
    return {str(k): (str(g), int(s)) for k, g, s in zip(keys[many], keeper[groups][many], size[many])}


def edge_groups(a: np.ndarray, b: np.ndarray) -> dict[str, tuple[str, int]]:
    """Connected components of the key edges (union-find), as `groups_of` gives them."""
    keys, idx = np.unique(np.concatenate([a, b]).astype(str), return_inverse=True)
    return groups_of(keys, components(len(keys), idx[:len(a)], idx[len(a):]))


def decide(batch: dict[str, np.ndarray], groups: dict[str, tuple[str, int]]) -> dict[str, np.ndarray]:
    """Keep (bool), group (the keeper's key: a stable group name) and size of each row, from `groups_of`."""
    keys = [str(k) for k in batch["key"]]
    found = [groups.get(k, (k, 1)) for k in keys]
    group = np.array([g for g, _ in found], dtype=object)
    return {**{k: batch[k] for k in ("key", "shard", "row", "hash")},
            "keep": np.array([g == k for g, k in zip(group, keys)], bool), "group": group,
            "size": np.array([s for _, s in found], np.int64)}
