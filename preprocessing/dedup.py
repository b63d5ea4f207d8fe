"""De-duplicating a dataset's shards with the paper's semantic hash (section 4.1), end to end on Ray.

Stages, each a Ray job that scales out with the cluster:
1. crops   one task per source shard reads it and keeps (key, shard, row, 32x32 center crop); nothing else moves.
2. train   the hashing autoencoder on Ray Train (`dedup_model.fit_ray`), on the dataset being de-duplicated.
3. encode  every crop -> its code (ReLU > 0 of the code layer, packed: 16 bytes for 128 bits) and a hash partition.
4. group   Ray Data groups by partition; each partition groups equal codes in one linear pass (`semantic_hash`) and
           keeps the member with the smallest key. With a Hamming radius r > 0 the codes (16 bytes + key a row) are
           gathered on the driver for multi-index hashing and connected components (see `semantic_hash`).
5. write   one task per source shard writes the kept rows, hash column filled, as out/shards/part-NNNNN.parquet
           (NNNNN = the source shard's index, so provenance is plain; a shard left empty is not written).
Then out/dedup/ gets model.pt (a plain tensor dict, `torch.load(weights_only=True)`), report.json and collisions.png
(random collision groups, kept member framed green, removed ones red). The caller writes the manifest.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing import storage
from preprocessing.errors import InputError
from preprocessing.config import DedupConfig
from preprocessing.dedup_model import crops_of, encode, fit_ray, save_state
from preprocessing.semantic_hash import group_codes, keep_smallest_key, partition_of
from preprocessing.shards import DatasetError, images_of, shard_name, write_table

log = logging.getLogger(__name__)

METHOD = "autoencoder-semantic-hash"
ROWS_PER_PARTITION = 200_000   # codes one grouping task handles (16 B + key each: a few MB)
PICTURE_GROUPS, PICTURE_MEMBERS, PICTURE_SIDE = 8, 8, 64


def _read_shard(src_uri: str, entry: dict[str, Any]) -> pa.Table:
    uri = storage.join(src_uri, entry["path"])
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except storage.StorageError as err:
        raise DatasetError(f"shard {entry['path']}: {err}") from None
    if "rows" in entry and table.num_rows != entry["rows"]:
        raise DatasetError(f"shard {entry['path']}: {table.num_rows} rows, the shard list says {entry['rows']}")
    return table


# ------------------------------------------------------------------------------------------------------ stages


def _crops_task(batch: dict[str, np.ndarray], src_uri: str, shards: list[dict], crop: int) -> dict[str, np.ndarray]:
    cv2.setNumThreads(1)
    out: dict[str, list] = {"key": [], "shard": [], "row": [], "crop": []}
    for i in batch["shard"]:
        table = _read_shard(src_uri, shards[int(i)])
        n = table.num_rows
        out["key"].append(np.asarray(table.column("key").to_pylist(), dtype=object))
        out["shard"].append(np.full(n, i, np.int32))
        out["row"].append(np.arange(n, dtype=np.int32))
        out["crop"].append(crops_of(images_of(table), crop))
    return {k: np.concatenate(v) for k, v in out.items()}


def _encode_task(batch: dict[str, np.ndarray], state: dict, cfg: dict, partitions: int) -> dict[str, np.ndarray]:
    import torch

    dcfg = DedupConfig(**cfg)
    # the encoder's weights arrive read-only from the object store; a copy (1.5 MB) keeps torch from warning
    codes = encode({k: torch.from_numpy(v.copy()) for k, v in state.items()}, batch["crop"], dcfg)
    return {"key": batch["key"], "shard": batch["shard"], "row": batch["row"],
            "hash": np.array([c.tobytes() for c in codes], dtype=object),
            "part": partition_of(codes, partitions)}


def decide(batch: dict[str, np.ndarray], radius: int = 0) -> dict[str, np.ndarray]:
    """Group one partition's codes and choose the keeper of each group (smallest key).

    Adds `keep` (bool), `group` (the keeper's key: a stable group name) and `size` (members in the group).
    """
    keys = np.asarray(batch["key"], dtype=object)
    if len(keys) == 0:
        return {**batch, "keep": np.zeros(0, bool), "group": keys, "size": np.zeros(0, np.int64)}
    codes = np.stack([np.frombuffer(h, np.uint8) for h in batch["hash"]])
    groups = group_codes(codes, radius)
    keep = keep_smallest_key(groups, keys.astype(str))
    keeper = np.empty(int(groups.max()) + 1, dtype=object)
    keeper[groups[keep]] = keys[keep]
    size = np.bincount(groups)[groups]
    return {**{k: batch[k] for k in ("key", "shard", "row", "hash")}, "keep": keep, "group": keeper[groups],
            "size": size.astype(np.int64)}


def _write_task(batch: dict[str, np.ndarray], src_uri: str, out_uri: str, shards: list[dict]) -> dict[str, np.ndarray]:
    i = int(batch["shard"][0])
    keep = np.asarray(batch["keep"], bool)
    rows, hashes = np.asarray(batch["row"])[keep], np.asarray(batch["hash"], dtype=object)[keep]
    empty = {"path": np.zeros(0, object), "rows": np.zeros(0, np.int64), "bytes": np.zeros(0, np.int64),
             "sha256": np.zeros(0, object)}
    if len(rows) == 0:
        return empty
    order = np.argsort(rows)
    table = _read_shard(src_uri, shards[i]).take(pa.array(rows[order]))
    table = table.set_column(table.schema.get_field_index("hash"), table.schema.field("hash"),
                             pa.array(list(hashes[order]), pa.binary()))
    entry = write_table(out_uri, shard_name(i), table)
    return {k: np.array([v], dtype=object if isinstance(v, str) else np.int64) for k, v in entry.items()}


# ------------------------------------------------------------------------------------------------------ report


def _bit_stats(codes_ds, code_bits: int) -> dict[str, Any]:
    """How much of the code is used: bits that are on for between 1% and 99% of images, and their total entropy."""
    def count(batch):
        bits = np.unpackbits(np.stack([np.frombuffer(h, np.uint8) for h in batch["hash"]]), axis=1)[:, :code_bits]
        return {"ones": bits.sum(0, dtype=np.int64)[None], "n": np.array([len(bits)])}

    parts = codes_ds.map_batches(count, batch_format="numpy").take_all()
    n = sum(int(p["n"]) for p in parts)
    p = np.sum([p["ones"] for p in parts], axis=0) / max(n, 1)
    q = np.clip(p, 1e-12, 1 - 1e-12)
    entropy = float(-(q * np.log2(q) + (1 - q) * np.log2(1 - q)).sum())
    return {"bits_used": int(((p > 0.01) & (p < 0.99)).sum()), "code_entropy_bits": round(entropy, 1)}


def _collision_picture(src_uri: str, shards: list[dict], members: list[list[dict]], uri: str) -> None:
    """A PNG grid: one row per collision group, kept member first (green frame), removed members red."""
    side = PICTURE_SIDE
    canvas = np.full((max(1, len(members)) * (side + 4), PICTURE_MEMBERS * (side + 4), 3), 255, np.uint8)
    tables: dict[int, pa.Table] = {}
    for r, group in enumerate(members):
        for c, m in enumerate(group[:PICTURE_MEMBERS]):
            s = int(m["shard"])
            if s not in tables:
                tables[s] = _read_shard(src_uri, shards[s])
            img = images_of(tables[s].slice(int(m["row"]), 1))[0]
            img = cv2.resize(img, (side, side), interpolation=cv2.INTER_NEAREST)
            color = (0, 170, 0) if m["keep"] else (220, 0, 0)
            y, x = r * (side + 4), c * (side + 4)
            canvas[y:y + side + 4, x:x + side + 4] = color
            canvas[y + 2:y + side + 2, x + 2:x + side + 2] = img
    if not members:
        cv2.putText(canvas, "no collisions", (4, side // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    ok, png = cv2.imencode(".png", canvas[..., ::-1])
    storage.write_bytes(uri, png.tobytes())


# ------------------------------------------------------------------------------------------------------ entry


def deduplicate(src_uri: str, shards: list[dict], out_uri: str, cfg: DedupConfig) -> tuple[list[dict], dict]:
    """De-duplicate the listed shards of `src_uri` into `out_uri`; returns (shard entries, dedup info for the manifest).

    `shards` are manifest entries (path relative to src_uri, rows). Writes out/shards/ and out/dedup/, not the
    manifest. Deterministic for equal inputs and `cfg.seed` on CPU (Ray Data keeps block order while this runs).
    """
    import ray
    from ray.data import DataContext

    if not shards:
        raise InputError(f"{src_uri}: no shards to de-duplicate")
    if cfg.crop <= 0:
        raise InputError(f"dedup.crop must be positive, got {cfg.crop}")
    ray.init(ignore_reinit_error=True)
    ctx = DataContext.get_current()
    saved_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    timings: dict[str, float] = {}
    t = time.perf_counter()
    try:
        rows_in = sum(int(s["rows"]) for s in shards)
        items = [{"shard": i} for i in range(len(shards))]
        crops = (ray.data.from_items(items, override_num_blocks=len(items))
                 .map_batches(_crops_task, batch_size=1, batch_format="numpy",
                              fn_kwargs={"src_uri": src_uri, "shards": shards, "crop": cfg.crop})
                 .materialize())
        if crops.count() != rows_in:
            raise DatasetError(f"{src_uri}: read {crops.count()} rows, the shard list says {rows_in}")
        timings["crops_s"] = time.perf_counter() - t

        t = time.perf_counter()
        dedup_uri = storage.join(out_uri, "dedup")
        with tempfile.TemporaryDirectory(prefix="dcgan-dedup-") as tmp:
            train_dir = storage.join(dedup_uri, "_train") if storage.is_s3(out_uri) else tmp
            state, losses = fit_ray(crops, cfg, train_dir)
            if storage.is_s3(out_uri):
                storage.delete_prefix(train_dir)
        save_state(state, storage.join(dedup_uri, "model.pt"))
        timings["train_s"] = time.perf_counter() - t

        t = time.perf_counter()
        partitions = max(1, -(-rows_in // ROWS_PER_PARTITION))
        state_np = {k: v.numpy() for k, v in state.items() if k.startswith("encoder.")}  # hashing needs no decoder
        coded = crops.map_batches(_encode_task, batch_format="numpy",
                                  fn_kwargs={"state": state_np, "cfg": cfg.model_dump(), "partitions": partitions})
        coded = coded.materialize()
        timings["encode_s"] = time.perf_counter() - t

        t = time.perf_counter()
        if cfg.radius == 0:
            decisions = coded.groupby("part").map_groups(decide, batch_format="numpy", fn_kwargs={"radius": 0})
        else:  # multi-index hashing needs every code in one place (16 bytes + key per row)
            whole = coded.drop_columns(["part"]).to_pandas()
            batch = {c: whole[c].to_numpy() for c in whole.columns}
            decisions = ray.data.from_pandas(__import__("pandas").DataFrame(decide(batch, cfg.radius)))
        decisions = decisions.materialize()
        timings["group_s"] = time.perf_counter() - t
        kept = int(decisions.map_batches(lambda b: {"n": [int(np.count_nonzero(b["keep"]))]},
                                         batch_format="numpy").sum("n") or 0)
        if rows_in - kept > cfg.max_removed * rows_in:
            raise DatasetError(
                f"{src_uri}: the hash would remove {rows_in - kept} of {rows_in} rows (more than dedup.max_removed = "
                f"{cfg.max_removed:.0%}); a hash that collapsed to few codes looks like this, so nothing was written. "
                f"Check the autoencoder (dedup.epochs, dedup.whiten) or raise dedup.max_removed if the data really is "
                f"that redundant")

        t = time.perf_counter()
        written = decisions.groupby("shard").map_groups(
            _write_task, batch_format="numpy", fn_kwargs={"src_uri": src_uri, "out_uri": out_uri, "shards": shards})
        entries = sorted(({"path": str(r["path"]), "rows": int(r["rows"]), "bytes": int(r["bytes"]),
                           "sha256": str(r["sha256"])} for r in written.take_all()), key=lambda e: e["path"])
        timings["write_s"] = time.perf_counter() - t

        rows_out = sum(e["rows"] for e in entries)
        colliding = sorted(decisions.filter(lambda r: r["size"] > 1).select_columns(
            ["key", "shard", "row", "keep", "group", "size"]).take_all(), key=lambda r: (r["group"], str(r["key"])))
        bits = _bit_stats(coded, cfg.code_bits)
    finally:
        ctx.execution_options.preserve_order = saved_order

    by_group: dict[str, list[dict]] = {}
    for r in colliding:
        by_group.setdefault(str(r["group"]), []).append(r)
    for members in by_group.values():
        members.sort(key=lambda m: (not m["keep"], str(m["key"])))
    sizes = np.array([len(m) for m in by_group.values()], np.int64)
    rng = np.random.default_rng(cfg.seed)
    names = sorted(by_group)
    picked = [names[i] for i in sorted(rng.choice(len(names), min(PICTURE_GROUPS, len(names)), replace=False))]
    _collision_picture(src_uri, shards, [by_group[g] for g in picked], storage.join(dedup_uri, "collisions.png"))

    removed = rows_in - rows_out
    info = {
        "method": METHOD,
        "code_bits": cfg.code_bits,
        "radius": cfg.radius,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "removed": removed,
        "groups": int(len(sizes)),
        "largest_group": int(sizes.max()) if len(sizes) else 1,
        **bits,
        "train_loss": [round(v, 5) for v in losses],
        "model": "dedup/model.pt",
        "report": "dedup/report.json",
        "picture": "dedup/collisions.png",
        "params": cfg.model_dump(),
    }
    if removed != int((sizes - 1).sum()):
        raise RuntimeError(f"dedup bookkeeping: {removed} rows removed but groups account for {(sizes - 1).sum()}")
    report = {
        **info,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "group_sizes": {str(int(s)): int(c) for s, c in zip(*np.unique(sizes, return_counts=True))} if len(sizes) else {},
        "pictured_groups": picked,
        "groups_detail": [{"kept": g, "size": len(by_group[g]), "removed": [str(m["key"]) for m in by_group[g][1:]]}
                          for g in sorted(by_group, key=lambda g: (-len(by_group[g]), g))[:1000]],
    }
    storage.write_json(storage.join(dedup_uri, "report.json"), report)
    log.info("dedup %s: %d rows -> %d (%d removed in %d groups)", src_uri, rows_in, rows_out, removed, len(sizes))
    return entries, info
