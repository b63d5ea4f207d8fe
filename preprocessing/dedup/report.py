"""What a de-duplication shows a person (layer: preprocessing): how much of the hash is used, and a picture of
collision groups (kept member framed green, removed ones red), so a collapsed hash or a wrong threshold is visible."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from preprocessing import storage
from preprocessing.dedup.semantic_hash import stack_codes
from preprocessing.shards import images_of

PICTURE_MEMBERS, PICTURE_SIDE = 8, 64



def bit_stats(codes_ds, code_bits: int) -> dict[str, Any]:
    """How much of the code is used: bits that are on for between 1% and 99% of images, and their total entropy."""
    def count(batch):
        bits = np.unpackbits(stack_codes(batch["hash"]), axis=1)[:, :code_bits]
        return {"ones": bits.sum(0, dtype=np.int64)[None], "n": np.array([len(bits)])}

    parts = codes_ds.map_batches(count, batch_format="numpy").take_all()
    n = sum(int(p["n"]) for p in parts)
    p = np.sum([p["ones"] for p in parts], axis=0) / max(n, 1)
    q = np.clip(p, 1e-12, 1 - 1e-12)
    entropy = float(-(q * np.log2(q) + (1 - q) * np.log2(1 - q)).sum())
    return {"bits_used": int(((p > 0.01) & (p < 0.99)).sum()), "code_entropy_bits": round(entropy, 1)}


COLLIDING = ("key", "shard", "row", "keep", "group", "size")   # a colliding row's columns, as `groups.decide` makes them


@dataclass(frozen=True)
class CollisionGroups:
    """The groups of two or more rows, held as the columns of one Arrow table sorted by group name, each group's kept
    member first, then by key; `starts` and `sizes` give each group's run of rows, in group-name order.

    Why columns: the driver used to gather every colliding row as a Python dict (Ray Data's `take_all`) and group
    them in a dict of lists. That is a few hundred bytes a row, and rows that collide grow with the dataset: LSUN
    bedrooms' ~275k near duplicates removed (paper 4.1) are ~450k colliding rows in groups of 2-5: ~260 MiB of Python
    heap on the driver (benchmarks/dedup_report.py). Here a row is its columns' bytes, and only what the report shows
    becomes Python."""

    table: pa.Table
    starts: np.ndarray
    sizes: np.ndarray

    @classmethod
    def of(cls, tables: list[pa.Table]) -> "CollisionGroups":
        """Colliding rows in any order and blocks (`COLLIDING` columns) -> the groups. Strings sort by their UTF-8
        bytes, which is the order of their code points: Python's `sorted` order, which the report always had."""
        tables = [t.select(list(COLLIDING)) for t in tables if t.num_rows]
        if not tables:
            return cls(pa.table({}), np.zeros(0, np.int64), np.zeros(0, np.int64))
        table = pa.concat_tables(tables, promote_options="permissive").sort_by(
            [("group", "ascending"), ("keep", "descending"), ("key", "ascending")]).combine_chunks()
        group, n = table.column("group"), table.num_rows
        change = pc.not_equal(group.slice(1), group.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.concatenate([[True], change]))
        return cls(table, starts, np.diff(np.append(starts, n)))

    def __len__(self) -> int:
        return len(self.starts)

    def name(self, j: int) -> str:
        """Group j's name: its kept member's key."""
        return str(self.table.column("group")[int(self.starts[j])].as_py())

    def members(self, j: int) -> list[dict]:
        """Group j's rows as dicts (`COLLIDING` keys), kept member first, then by key."""
        return self.table.slice(int(self.starts[j]), int(self.sizes[j])).to_pylist()

    def largest(self, limit: int) -> list[int]:
        """The `limit` largest groups, larger first, then by name."""
        return [int(j) for j in np.lexsort((np.arange(len(self)), -self.sizes))[:limit]]

    def summary(self, seed: int, pictured: int, detail: int = 1000) -> tuple[list[int], dict[str, Any]]:
        """(the groups the picture shows: `pictured` drawn with `seed`, in name order; the report's group figures:
        count, largest, sizes' histogram, the pictured groups' names, the `detail` largest groups' members)."""
        sizes = self.sizes
        picked = sorted(int(j) for j in np.random.default_rng(seed).choice(len(self), min(pictured, len(self)),
                                                                           replace=False))
        return picked, {
            "groups": len(self), "largest_group": int(sizes.max()) if len(sizes) else 1,
            "group_sizes": {str(int(s)): int(c) for s, c in zip(*np.unique(sizes, return_counts=True))},
            "pictured_groups": [self.name(j) for j in picked],
            "groups_detail": [{"kept": self.name(j), "size": int(sizes[j]),
                               "removed": [str(m["key"]) for m in self.members(j)[1:]]} for j in self.largest(detail)]}


def collision_picture(table_of: Callable[[int], pa.Table], members: list[list[dict]], uri: str) -> None:
    """A PNG grid: one row per collision group, kept member first (green frame), removed members red. The shards are
    read one at a time and only the pictured images kept: holding every shard a member lives in (up to 64 of them,
    ~25 MB each) was the driver's largest memory at 100k images and more (benchmarks/scale.py)."""
    side = PICTURE_SIDE
    canvas = np.full((max(1, len(members)) * (side + 4), PICTURE_MEMBERS * (side + 4), 3), 255, np.uint8)
    shown = [m for group in members for m in group[:PICTURE_MEMBERS]]
    images: dict[tuple[int, int], np.ndarray] = {}
    for s in sorted({int(m["shard"]) for m in shown}):
        rows = sorted({int(m["row"]) for m in shown if int(m["shard"]) == s})
        for row, img in zip(rows, images_of(table_of(s).take(pa.array(rows)))):
            images[s, row] = cv2.resize(img, (side, side), interpolation=cv2.INTER_NEAREST)
    for r, group in enumerate(members):
        for c, m in enumerate(group[:PICTURE_MEMBERS]):
            color = (0, 170, 0) if m["keep"] else (220, 0, 0)
            y, x = r * (side + 4), c * (side + 4)
            canvas[y:y + side + 4, x:x + side + 4] = color
            canvas[y + 2:y + side + 2, x + 2:x + side + 2] = images[int(m["shard"]), int(m["row"])]
    if not members:
        cv2.putText(canvas, "no collisions", (4, side // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    ok, png = cv2.imencode(".png", canvas[..., ::-1])
    storage.write_bytes(uri, png.tobytes())
