"""De-duplicating a dataset's shards with the paper's semantic hash (section 4.1), end to end on Ray.

Stages, each a Ray job that scales out with the cluster:
1. crops   (key, shard, row, 32x32 center crop) of the rows the next phases need, one task per source shard read:
           with `views` > 1 only the autoencoder's training sample, read from the fewest shards that hold it (encode
           reads every shard and counts the blank crops); with `views: 1` every row, blank ones counted.
2. train   the hashing autoencoder (`fit.fit_ray`: one Ray task on CPUs, Ray Train on GPUs), on the dataset being
           de-duplicated.
3. encode  every image -> its `views` codes (ReLU > 0 of the code layer, packed: 16 bytes for 128 bits); view 0, the
           paper's center-crop hash, is the `hash` column.
4. group   every (key, code) whose code another image has too goes to a hash partition of its code (plain-task
           shuffles, `exchange`; which codes are shared is counted first, 8 bytes a code: `_code_rows`); each partition
           buckets equal codes in one linear pass (`semantic_hash`). With views > 1 a shared code only proposes a pair:
           the members of shared buckets get their matched views' pixels from the source shards and each partition
           verifies its candidate pairs (`verify`); the driver gets the verified edges only and builds star groups
           (every removed image verified against its keeper). With `views: 1` (the paper's hash) equal codes are one
           group (connected components, unverified). Each group keeps its smallest key. With a Hamming radius r > 0 all
           codes (16 bytes x views + key a row) are gathered on the driver for multi-index hashing instead.
5. write   one task per source shard writes the kept rows, hash column filled, as out/shards/part-NNNNN.parquet
           (NNNNN = the source shard's index, so provenance is plain; a shard left empty is not written).
Then out/dedup/ gets model.pt (a plain tensor dict, `torch.load(weights_only=True)`), report.json and collisions.png
(random collision groups, kept member framed green, removed ones red). The caller writes the manifest.
The driver reads no shard: it checks that each one is there with its size (a HEAD each) before writing anything, and
each task checks what it reads against the manifest (size, sha256, rows, schema), so a corrupt source stops the phase
that reads it first (encode, for a shard outside the training sample), before anything is written. With views a shard
is read at most 3 times (encode, its candidates' pixels if it has any, write), the training sample's shards once more.
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

from preprocessing import compute, dataset_layout, lease, storage, stream
from preprocessing.config import ClusterConfig, DedupConfig
from preprocessing.dedup import exchange
from preprocessing.dedup.groups import (GroupLookup, bucket_edges, code_hashes, codes_of, decide, edge_groups,
                                       first_alignments, groups_of, member_rows, pixel_bytes, shared_lookup,
                                       verify_rows, view_rows)
from preprocessing.dedup.report import COLLIDING, CollisionGroups, bit_stats, collision_picture
from preprocessing.dedup.verify import BLANK_STD, blank, star_group_arrays
from preprocessing.dedup.views import crops_of, cut_views, encode_views, encode_views_probed, view_sources
from preprocessing.errors import InputError
from preprocessing.progress import Progress
from preprocessing.dedup.semantic_hash import group_views
from preprocessing.shards import DatasetError, images_of, shard_schema, write_table

# preprocessing.dedup.model imports torch (~0.8 s): it is imported in the functions that use it, so that a CLI that
# only asks whether this dedup is done, or submits it as a Ray job, never loads torch.

log = logging.getLogger(__name__)

METHOD = "autoencoder-semantic-hash"
ROWS_PER_PARTITION = 200_000   # codes one grouping task handles at most (16 B + key each: a few MB)
ROWS_PER_TASK = 20_000         # below this many rows per CPU, more grouping tasks cost more than they save
MAX_SHUFFLE_PARTITIONS = 200   # partitions of a shuffle at most (Ray Data's default, which every groupby once used)
PICTURE_GROUPS = 8
PHASES = ("crops", "train", "encode", "group", "write")


def group_partitions(rows_in: int, cpus: int) -> int:
    """Code partitions of the group stage: enough that no task holds more than ROWS_PER_PARTITION codes and that
    every CPU has a task, but none of fewer than ~ROWS_PER_TASK rows. Each code shuffle gets exactly this many
    partitions: Ray Data's default (200, whatever the size) cost a 2,000-image dedup on a 3-node cluster ~4 of its 7
    minutes in shuffle start-up (benchmarks/scale.py), when the shuffles were Ray Data groupbys."""
    return max(1, -(-rows_in // ROWS_PER_PARTITION), min(2 * cpus, rows_in // ROWS_PER_TASK, MAX_SHUFFLE_PARTITIONS))


def shard_partitions(shards: list[dict]) -> int:
    """Partitions of a shuffle by source shard: one per shard, at most MAX_SHUFFLE_PARTITIONS."""
    return max(1, min(len(shards), MAX_SHUFFLE_PARTITIONS))


def min_images(cfg: DedupConfig) -> int:
    """The smallest dataset the autoencoder is trained on: its whitening basis (`whiten` components) needs more images
    than components; below that the code is noise and every collision a guess."""
    return max(2, cfg.whiten + 1)


def checked_entries(manifest: dict[str, Any]) -> list[dict]:
    """A manifest's shard entries with what `_read_shard` needs to check each one as `shards.verify` does (size,
    sha256, rows, schema) where a task reads it, instead of a pass of its own over the whole dataset on the driver."""
    check = {"resolution": manifest["resolution"], "channels": manifest.get("channels", 3)}
    return [{**e, **check} for e in manifest["shards"]]


def _read_shard(src_uri: str, entry: dict[str, Any]) -> pa.Table:
    if "resolution" in entry:  # `checked_entries`: every read is checked, the first one before any work is done
        res, ch = entry["resolution"], entry["channels"]
        return stream.read_checked(src_uri, entry, res, ch, shard_schema(res, ch).names)
    uri = storage.join(src_uri, entry["path"])
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except storage.StorageUnreachable:
        raise  # the store is failing, not this file: transient, retried
    except storage.StorageError as err:
        raise DatasetError(f"shard {entry['path']}: {err}") from None
    if "rows" in entry and table.num_rows != entry["rows"]:
        raise DatasetError(f"shard {entry['path']}: {table.num_rows} rows, the shard list says {entry['rows']}")
    return table


def _totals(ds, columns: tuple[str, ...]) -> list[int]:
    """The sums of numeric or bool columns of a materialized dataset: a plain task per block sums them where it lives
    (`exchange.totals`). Ray Data's own `sum` is a hash aggregate, a shuffle that cost ~7 s for 8,000 rows on 2 CPUs;
    a `map_batches` of partial sums was one more Ray Data execution (an executor started, a task scheduled) for one
    sum, twice a dedup."""
    return exchange.totals(ds.to_arrow_refs(), columns)


# ------------------------------------------------------------------------------------------------------ stages


def _crops_task(batch: dict[str, np.ndarray], src_uri: str, shards: list[dict], crop: int,
                sources: bool = False, fraction: float = 1.0) -> dict[str, np.ndarray]:
    """Each listed shard read -> (key, shard, row, crop, read, blank[, source]) of its rows, or, with `fraction` < 1,
    of the `training_rows` it keeps. A kept row accounts for the rows read from it up to the next kept one: `read`
    counts them and `blank` counts their blank crops, so the two columns sum to the shard's totals either way."""
    cv2.setNumThreads(1)
    out: dict[str, list] = {"key": [], "shard": [], "row": [], "crop": [],
                            "read": [], "blank": [], **({"source": []} if sources else {})}
    for i in batch["shard"]:
        table = _read_shard(src_uri, shards[int(i)])
        n = table.num_rows
        images = images_of(table)
        crops = crops_of(images, crop)
        keep = training_rows(n, fraction)
        rows = slice(None) if len(keep) == n else keep  # every row: no copies
        out["key"].append(np.asarray(table.column("key").to_pylist(), dtype=object)[rows])
        out["shard"].append(np.full(len(keep), i, np.int32))
        out["row"].append(keep.astype(np.int32))
        out["crop"].append(crops[rows])
        out["read"].append(np.diff(keep, append=n).astype(np.int32))
        out["blank"].append(np.add.reduceat(blank(crops).astype(np.int32), keep) if n else np.zeros(0, np.int32))
        if sources:
            out["source"].append(view_sources(images[rows], crop))
    return {k: np.concatenate(v) for k, v in out.items()}


def _shard_codes_task(batch: dict[str, np.ndarray], src_uri: str, shards: list[dict], state: dict,
                      cfg: dict) -> dict[str, np.ndarray]:
    """One source shard read again -> its rows' view codes and blank flags (phase 1 read only the training sample):
    the views' 2x sources (12 KB an image at crop 32) live only inside this task, never in the object store."""
    return _encode_task(_crops_task(batch, src_uri, shards, cfg["crop"], sources=True), state, cfg)


def _encode_task(batch: dict[str, np.ndarray], state: dict, cfg: dict) -> dict[str, np.ndarray]:
    import torch

    dcfg = DedupConfig(**cfg)
    # the encoder's weights arrive read-only from the object store; a copy (1.5 MB) keeps torch from warning
    weights = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    probes = dcfg.views > 1 and dcfg.probes > 0 and dcfg.radius == 0
    if probes:  # each view's least certain bits (a byte each): the group stage makes the probe codes
        codes, flips = encode_views_probed(weights, batch["crop"], batch.get("source"), dcfg)
    else:
        codes = encode_views(weights, batch["crop"], batch.get("source"), dcfg)
    out = {"key": batch["key"], "shard": batch["shard"], "row": batch["row"],
           "hash": np.array([c[0].tobytes() for c in codes], dtype=object),
           "views": np.array([c.tobytes() for c in codes], dtype=object)}
    if probes:
        out["flips"] = np.array([f.tobytes() for f in flips], dtype=object)
    if "blank" in batch:
        out["blank"] = batch["blank"].astype(bool)
    return out


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
    entry = write_table(out_uri, dataset_layout.part(i), table)
    return {k: np.array([v], dtype=object if isinstance(v, str) else np.int64) for k, v in entry.items()}


# ------------------------------------------------------------------------------------------------------ entry


def _pixels_task(batch: dict[str, np.ndarray], src_uri: str, shards: list[dict], crop: int) -> dict[str, np.ndarray]:
    """The check rows of one source shard -> the pixels of each row's matched view (`pixel_bytes`)."""
    cv2.setNumThreads(1)
    rows = np.asarray(batch["row"], np.int64)
    images = images_of(_read_shard(src_uri, shards[int(batch["shard"][0])]))
    wanted, at = np.unique(rows, return_inverse=True)
    pixels = cut_views(view_sources(images[wanted], crop)[at], np.asarray(batch["view"]))
    return {"key": batch["key"], "bucket": batch["bucket"], "part": batch["part"],
            "pixels": pixel_bytes(pixels)}


def _hashes_task(block: pa.Table, code_bytes: int, partitions: int) -> list[np.ndarray] | np.ndarray:
    from ray.data.block import BlockAccessor

    pieces = code_hashes(BlockAccessor.for_block(block).to_batch_format("numpy"), code_bytes, partitions)
    return pieces if partitions > 1 else pieces[0]


def _shared_view_rows(batch: dict[str, np.ndarray], *shared: tuple, code_bytes: int, partitions: int) -> dict:
    return view_rows(batch, code_bytes, partitions, shared=list(shared))


def _code_rows(coded, code_bytes: int, partitions: int, shared_only: bool = True) -> tuple[list, exchange.Step]:
    """The coded blocks, and the map step that makes their (image, code) rows (`view_rows`) whose code two or more
    images have: the only ones the group shuffle needs.

    Most codes belong to one image (95% of the 9.6M rows at 25k images): they make no bucket, yet they were most of
    what went through the code shuffle (~19 of the stage's ~36 s at 25k on 2 CPUs). So first each block sends 8 bytes
    a row (the code's `code_mix`) to its code partition, in plain tasks (one per block, one output per partition:
    `code_hashes`), each partition counts them (`shared_lookup`), and the rows are made again with only the codes met
    twice kept. Nothing goes through the driver but object references. `shared_only=False`: every row, as before
    (benchmarks/dedup_group.py's baseline)."""
    import ray

    blocks = coded.to_arrow_refs()
    if not shared_only:
        kwargs = {"code_bytes": code_bytes, "partitions": partitions}
        return blocks, exchange.Step(None, len(blocks), view_rows, kwargs)
    split = ray.remote(_hashes_task).options(num_returns=partitions)
    pieces = [split.remote(block, code_bytes, partitions) for block in blocks]
    if partitions == 1:
        pieces = [[p] for p in pieces]
    count = ray.remote(shared_lookup)
    shared = [count.remote(*[p[i] for p in pieces]) for i in range(partitions)]
    return blocks, exchange.Step(None, len(blocks), _shared_view_rows, {"code_bytes": code_bytes,
                                                                       "partitions": partitions}, tuple(shared))


def _verified_groups(coded, src_uri: str, shards: list[dict], cfg: DedupConfig, code_bytes: int,
                     partitions: int, shared_only: bool = True) -> tuple[GroupLookup, dict]:
    """The multi-view group stage (`verify`): codes propose, pixels decide, groups are stars.

    One chain of plain-task shuffles (`exchange`), none through the driver: (image, code) rows of shared codes
    (`_code_rows`; `shared_only` as there) by code partition -> checks (candidate pairs with their alignment, two
    rows each; `member_rows`); with more than one code partition, the checks by pair, keeping each pair's first
    ALIGNMENTS checks across partitions (`first_alignments`); check rows by source shard -> their matched views'
    pixels; pixels by code partition -> verified edges. The driver gets the verified edges only (true duplicates: a
    few per removed image) and the counts."""
    blocks, rows = _code_rows(coded, code_bytes, partitions, shared_only)
    members = exchange.run(blocks, [rows, exchange.Step("part", partitions, member_rows, {"partitions": partitions})])
    steps = [exchange.Step("pair", partitions, first_alignments)] if partitions > 1 else []
    steps += [exchange.Step("shard", shard_partitions(shards), _pixels_task,
                            {"src_uri": src_uri, "shards": shards, "crop": cfg.crop}),
              exchange.Step("part", partitions, verify_rows)]
    edges = exchange.gather(exchange.run(members, steps))
    left = exchange.total(members, "left")
    if not edges:
        return GroupLookup.of([], [], []), {"candidates_checked": 0, "verified_edges": 0, "unchecked_members": left}
    a, b = edges["a"].astype(object), edges["b"].astype(object)
    real = a != ""
    return GroupLookup.of(*star_group_arrays(a[real], b[real])), {"candidates_checked": int(edges["checked"].sum()),
                                                                  "verified_edges": int(real.sum()),
                                                                  "unchecked_members": left}


def deduplicate(src_uri: str, shards: list[dict], out_uri: str, cfg: DedupConfig, cluster: ClusterConfig | None = None
                ) -> tuple[list[dict], dict]:
    """De-duplicate the listed shards of `src_uri` into `out_uri`; returns (shard entries, dedup info for the manifest).

    `shards` are manifest entries (path relative to src_uri, rows). Writes out/shards/ and out/dedup/, not the
    manifest. Deterministic for equal inputs and `cfg.seed` on CPU (Ray Data keeps block order while this runs).
    The autoencoder trains on the workers `cluster` asks for (`fit.fit_ray`).
    """
    from ray.data import DataContext
    from ray.data.expressions import col

    rows_in = _check(src_uri, shards, cfg)
    compute.connect(cluster.address if cluster else None)  # after the checks: a bad source is one line before Ray
    compute.quiet_ray_data()
    ctx = DataContext.get_current()
    saved_order, saved_raise = ctx.execution_options.preserve_order, ctx.raise_original_map_exception
    ctx.execution_options.preserve_order = True
    ctx.raise_original_map_exception = True  # a task's DatasetError (a corrupt shard) reaches the CLI as itself
    timings: dict[str, float] = {}
    shown = Progress("dedup", len(PHASES), "phases")

    def phase(name: str, done: int, note: str, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        timings[f"{name}_s"] = time.perf_counter() - t
        shown.update(done, note=note if isinstance(note, str) else note(out))
        return out

    try:
        crops, blank_rows, sampled = phase("crops", 1, f"{rows_in} crops read; training the autoencoder",
                                           _crops, src_uri, shards, cfg, rows_in)
        state, losses, trained_on = phase("train", 2, "autoencoder trained; hashing", _train, crops, sampled, cfg,
                                          out_uri, cluster, rows_in)
        if sampled:  # the training sample is done with: its blocks leave the object store before the codes come
            crops = None
        coded = phase("encode", 3, f"{rows_in} codes; grouping", _encode, crops, state, cfg, src_uri, shards)
        if blank_rows is None:  # counted where encode read every row
            [blank_rows] = _totals(coded, ("blank",))
        decisions, checks = phase("group", 4, "grouped; writing the kept rows",
                                  _group, coded, src_uri, shards, cfg, rows_in)
        _check_removal(decisions, src_uri, rows_in, cfg)
        entries = phase("write", 5, lambda e: f"{sum(x['rows'] for x in e)} of {rows_in} rows kept",
                        _write, decisions, src_uri, out_uri, shards)
        colliding = _colliding(decisions.filter(expr=col("size") > 1).select_columns(list(COLLIDING)))
        bits = bit_stats(coded, cfg.code_bits)
    finally:
        ctx.execution_options.preserve_order, ctx.raise_original_map_exception = saved_order, saved_raise
        shown.close()
    rows_out = sum(e["rows"] for e in entries)
    info = {"method": METHOD, "code_bits": cfg.code_bits, "views": cfg.views, "radius": cfg.radius,
            "rows_in": rows_in, "rows_out": rows_out, "removed": rows_in - rows_out,
            "merge": "verified" if cfg.views > 1 and cfg.radius == 0 else "shared code", **checks,
            "blank": blank_rows, **bits, "trained_on": trained_on, "train_loss": [round(v, 5) for v in losses],
            "model": dataset_layout.DEDUP_MODEL, "report": dataset_layout.DEDUP_REPORT,
            "picture": dataset_layout.DEDUP_PICTURE, "params": cfg.model_dump()}
    return entries, _report(info, colliding, src_uri, shards, out_uri, cfg, timings)


# ------------------------------------------------------------------------------------------------ the phases


def _check(src_uri: str, shards: list[dict], cfg: DedupConfig) -> int:
    """The number of rows, once the dataset is known to be one the autoencoder can be trained on."""
    if not shards:
        raise InputError(f"{src_uri}: no shards to de-duplicate")
    if cfg.crop <= 0:
        raise InputError(f"dedup.crop must be positive, got {cfg.crop}")
    rows_in = sum(int(s["rows"]) for s in shards)
    require_enough(src_uri, rows_in, "images", cfg)
    return rows_in


def require_enough(where: str, count: int, noun: str, cfg: DedupConfig) -> None:
    """`count` images (or inputs that give at most an image each) are enough to train the hashing autoencoder."""
    if count < min_images(cfg):
        raise InputError(f"{where}: {count} {noun} are too few to train the hashing autoencoder (dedup needs at least "
                         f"{min_images(cfg)} images: dedup.whiten + 1 to estimate its whitening basis); pass --no-dedup")


def _per_shard(shards: list[dict], picked=None):
    """A dataset of one row, one block per source shard (the `picked` ones, or all): tasks that each read their own
    shard."""
    import ray

    items = [{"shard": i} for i in (range(len(shards)) if picked is None else picked)]
    return ray.data.from_items(items, override_num_blocks=len(items))


def _crops(src_uri: str, shards: list[dict], cfg: DedupConfig, rows_in: int):
    """1. (key, shard, row, crop) of the rows the next phases need. With `views: 1` encode hashes these crops: every
    shard is read, every row kept, and the blank rows counted. With views > 1 encode reads every shard again (and
    counts the blank rows there), so only the `train_images` sample is read: every k-th row of the fewest shards,
    spread over the dataset, that hold it (`training_shards`); at 3M images 50k crops from 1 shard in 60, not a pass
    over all 3M. Refuses a set, or a training sample, whose crops are all blank.
    Returns (crops, blank rows (None: encode counts them), whether the crops are already the training sample)."""
    rows = [int(s["rows"]) for s in shards]
    picked = range(len(shards)) if cfg.views == 1 else training_shards(rows, cfg.train_images)
    listed = sum(rows[i] for i in picked)
    fraction = 1.0 if cfg.views == 1 else _sample_fraction(cfg, listed)
    crops = (_per_shard(shards, picked)
             .map_batches(_crops_task, batch_size=1, batch_format="numpy",
                          fn_kwargs={"src_uri": src_uri, "shards": shards, "crop": cfg.crop, "fraction": fraction})
             .materialize())
    read, blank_rows = _totals(crops, ("read", "blank"))
    if read != listed:
        raise DatasetError(f"{src_uri}: read {read} rows, the shard list says {listed}")
    if blank_rows == read:
        what = f"all {rows_in} images are" if read == rows_in else (
            f"all {read} images of the {len(picked)} shards (of {len(shards)}) the training sample is taken from are")
        raise InputError(f"{src_uri}: {what} blank (pixel std < {BLANK_STD:g} in the {cfg.crop}x{cfg.crop} crop): "
                         "nothing to de-duplicate; check the build, or pass --no-dedup")
    return crops, (blank_rows if cfg.views == 1 else None), cfg.views > 1


def training_shards(rows: list[int], train_images: int | None) -> list[int]:
    """Indices of the shards the autoencoder's sample is read from: the fewest, one from each of that many equal
    stretches of the shard list (its middle one), whose rows hold `train_images`; all of them when the set is no
    larger. Shards are in key order, which may follow time or source, so the sample spans the whole list."""
    total, s = sum(rows), len(rows)
    if train_images is None or total <= train_images:
        return list(range(s))
    n = max(1, min(s, -(-train_images * s // total)))  # as many as equal shards would need
    while True:
        picked = sorted({(2 * j + 1) * s // (2 * n) for j in range(n)})
        if n >= s or sum(rows[i] for i in picked) >= train_images:
            return picked
        n += 1


def training_rows(n: int, fraction: float) -> np.ndarray:
    """Rows of a block of n that the autoencoder trains on: every (1/fraction)-th, spread over the whole block (shards
    are in key order, which may follow time or source), at least one."""
    if fraction >= 1 or n == 0:
        return np.arange(n)
    return np.unique(np.minimum((np.arange(max(1, round(n * fraction))) / fraction).astype(np.int64), n - 1))


def _sample_fraction(cfg: DedupConfig, rows_in: int) -> float:
    """The share of the rows the autoencoder trains on: all, or `train_images` of them."""
    return 1.0 if cfg.train_images is None or rows_in <= cfg.train_images else cfg.train_images / rows_in


def _training_sample(crops, rows_in: int, cfg: DedupConfig):
    """The crops the autoencoder trains on: all of them, or `train_images` of them taken evenly from every block."""
    fraction = _sample_fraction(cfg, rows_in)
    if fraction >= 1:
        return crops
    return crops.map_batches(lambda b: {k: v[training_rows(len(v), fraction)] for k, v in b.items()},
                             batch_format="numpy", batch_size=None).materialize()


def _train(crops, sampled: bool, cfg: DedupConfig, out_uri: str, cluster: ClusterConfig | None, rows_in: int
           ) -> tuple[dict[str, np.ndarray], list[float], int]:
    """2. The hashing autoencoder on Ray (`fit.fit_ray`; on at most `train_images` of the crops, which phase 1 may
    have `sampled` already); its model.pt saved beside the dataset. Returns (numpy weights, epoch losses, images
    trained on); a CPU fit leaves torch out of this process."""
    from preprocessing.dedup.fit import fit_ray

    sample = crops if sampled else _training_sample(crops, rows_in, cfg)  # the fit reads its `crop` column
    trained_on = sample.count()
    with tempfile.TemporaryDirectory(prefix="dcgan-dedup-") as tmp:
        train_dir = dataset_layout.dedup_training(out_uri) if storage.is_s3(out_uri) else tmp
        fitted = fit_ray(sample, cfg, train_dir, cluster)
        if storage.is_s3(out_uri):
            storage.delete_prefix(train_dir)
    storage.write_bytes(dataset_layout.dedup_model(out_uri), fitted.model_file)
    return fitted.state, fitted.losses, trained_on


def _encode(crops, state: dict, cfg: DedupConfig, src_uri: str, shards: list[dict]):
    """3. Every image to its `views` codes (the encoder only: hashing needs no decoder). One view: from phase 1's crops
    in the object store. More (`crops` None): each source shard is read again and its views cut inside the task;
    carried from phase 1 they were 4x the crops in the object store (12 KB an image at crop 32; ~36 GB at 3M)."""

    state_np = {k: np.asarray(v) for k, v in state.items() if k.startswith("encoder.")}
    if cfg.views == 1:
        return crops.map_batches(_encode_task, batch_format="numpy",
                                 fn_kwargs={"state": state_np, "cfg": cfg.model_dump()}).materialize()
    return (_per_shard(shards)
            .map_batches(_shard_codes_task, batch_size=1, batch_format="numpy",
                         fn_kwargs={"src_uri": src_uri, "shards": shards, "state": state_np,
                                    "cfg": cfg.model_dump()})
            .materialize())


def _group(coded, src_uri: str, shards: list[dict], cfg: DedupConfig, rows_in: int) -> tuple[Any, dict]:
    """4. Groups (verified stars, shared-code components, or multi-index hashing at radius > 0), then each row's
    keep/remove decision; returns (decisions, the verification's figures)."""
    partitions = group_partitions(rows_in, compute.cluster_cpus())
    code_bytes = (cfg.code_bits + 7) // 8
    checks = {}
    if cfg.radius == 0 and cfg.views > 1:
        groups, checks = _verified_groups(coded, src_uri, shards, cfg, code_bytes, partitions)
    elif cfg.radius == 0:
        blocks, rows = _code_rows(coded, code_bytes, partitions)
        edges = exchange.gather(exchange.run(blocks, [rows, exchange.Step("part", partitions, bucket_edges)]))
        groups = GroupLookup.of_dict(edge_groups(edges["a"].astype(object), edges["b"].astype(object)) if edges else {})
    else:  # multi-index hashing needs every code in one place (16 bytes x views + key per row)
        whole = coded.select_columns(["key", "views"]).to_pandas()
        batch = {c: whole[c].to_numpy() for c in whole.columns}
        groups = GroupLookup.of_dict(groups_of(batch["key"], group_views(codes_of(batch, code_bytes), cfg.radius)))
    return coded.map_batches(decide, batch_format="numpy", fn_kwargs={"groups": groups}).materialize(), checks


def _check_removal(decisions, src_uri: str, rows_in: int, cfg: DedupConfig) -> None:
    """`max_removed`, the last guard: a hash that collapsed to few codes removes most rows; nothing is written."""
    [kept] = _totals(decisions, ("keep",))
    if rows_in - kept > cfg.max_removed * rows_in:
        raise DatasetError(
            f"{src_uri}: the hash would remove {rows_in - kept} of {rows_in} rows (more than dedup.max_removed = "
            f"{cfg.max_removed:.0%}); a hash that collapsed to few codes looks like this, so nothing was written. "
            f"Check the autoencoder (dedup.epochs, dedup.whiten) or raise dedup.max_removed if the data really is "
            f"that redundant")


def _write(decisions, src_uri: str, out_uri: str, shards: list[dict]) -> list[dict]:
    """5. One task per source shard writes its kept rows; returns the shard entries. The decisions reach the tasks
    by a plain-task shuffle (`exchange`), only the four columns the writers need (the codes stay behind)."""
    blocks = decisions.select_columns(["shard", "row", "keep", "hash"]).to_arrow_refs()
    written = exchange.gather(exchange.run(blocks, [exchange.Step(
        "shard", shard_partitions(shards), _write_task, {"src_uri": src_uri, "out_uri": out_uri, "shards": shards})]))
    if not written:
        return []
    return sorted(({"path": str(p), "rows": int(r), "bytes": int(b), "sha256": str(h)} for p, r, b, h in
                   zip(written["path"], written["rows"], written["bytes"], written["sha256"])), key=lambda e: e["path"])


def _colliding(rows) -> CollisionGroups:
    """The rows of groups of two or more, brought to the driver as Arrow blocks, not a Python dict a row
    (`CollisionGroups`)."""
    import ray

    return CollisionGroups.of(ray.get(rows.to_arrow_refs()))


def _report(info: dict, colliding: CollisionGroups, src_uri: str, shards: list[dict], out_uri: str, cfg: DedupConfig,
            timings: dict[str, float]) -> dict:
    """The groups' picture and report.json; returns the manifest's dedup info with the group figures."""
    picked, figures = colliding.summary(cfg.seed, PICTURE_GROUPS)
    collision_picture(lambda i: _read_shard(src_uri, shards[i]), [colliding.members(j) for j in picked],
                      dataset_layout.dedup_collisions(out_uri))
    info = {**info, "groups": figures.pop("groups"), "largest_group": figures.pop("largest_group")}
    removed = int((colliding.sizes - 1).sum())
    if info["removed"] != removed:
        raise RuntimeError(f"dedup bookkeeping: {info['removed']} rows removed but groups account for {removed}")
    report = {**info, "seconds": {k: round(v, 2) for k, v in timings.items()}, **figures}
    storage.write_json(dataset_layout.dedup_report(out_uri), report)
    log.info("dedup %s: %d rows -> %d (%d removed in %d groups)", src_uri, info["rows_in"], info["rows_out"],
             info["removed"], info["groups"])
    return info


def already_deduplicated(src: str, out: str, cfg: DedupConfig) -> dict[str, Any] | None:
    """The manifest at `out` if it is a de-duplication of `src` as it is now (its content hash) with these settings:
    a re-run has nothing to do (as a build with the same parameters)."""
    from preprocessing.shards import read_manifest

    try:
        made, source = read_manifest(out), read_manifest(src)
    except DatasetError:
        return None
    origin = made.get("derived_from") or {}
    same = (origin.get("uri") == storage.normalize(src) and origin.get("content_hash") == source.get("content_hash")
            and origin.get("dedup") == cfg.model_dump(mode="json"))
    return made if same else None


def dedup_dataset(src: str, out: str, cfg: DedupConfig, overwrite: bool = False,
                  cluster: ClusterConfig | None = None) -> dict[str, Any]:
    """De-duplicate the committed dataset `src` into a new dataset `out`; returns the new manifest.

    The source is never modified, and `out` follows the ownership rule (preprocessing.ownership): a new or empty
    location, or an earlier (unfinished, or with `overwrite` finished) dedup output of this project. The new manifest
    copies the source's kind, resolution, input counts, rejects and build parameters, and adds the dedup figures;
    reject files are copied, so the new version stands on its own. The same de-duplication done before is kept
    (`already_deduplicated`); another dataset at `out` needs `overwrite`.
    """
    from preprocessing import ownership
    from preprocessing.shards import check_sizes, is_complete, read_manifest

    src, out = storage.normalize(src), storage.normalize(out)
    if storage.overlaps(src, out):
        raise InputError(f"--out {out} overlaps the source dataset {src}: dedup writes a new dataset beside its "
                         "input, never into or around it")
    manifest = read_manifest(src)
    check_sizes(src, manifest)  # before anything is written; the bytes are checked where tasks read them
    compute.check_place(cluster.address if cluster else None)  # likewise a Ray that cannot start (it starts later)
    ownership.claim(out, "dataset", legacy=is_complete)
    with lease.held(out, dataset_layout.lease(out), lease.DATASET):  # one writer: a second dedup is one line
        return _dedup_into(src, out, manifest, cfg, overwrite, cluster)


def _dedup_into(src: str, out: str, manifest: dict[str, Any], cfg: DedupConfig, overwrite: bool,
                cluster: ClusterConfig | None) -> dict[str, Any]:
    """`dedup_dataset`'s writes into `out`, its lease held; what is there is looked at again under the lease (a
    writer before this one may have finished it)."""
    from preprocessing import ownership
    from preprocessing.shards import has_manifest, write_manifest

    done = None if overwrite else already_deduplicated(src, out, cfg)
    if done is not None:
        return done
    if has_manifest(out) and not overwrite:
        raise InputError(f"{out} already holds a dataset; pass --overwrite to replace it")
    ownership.remove_own(out, "dataset")  # an earlier (unfinished or replaced) output: our files only

    entries, info = deduplicate(src, checked_entries(manifest), out, cfg, cluster)
    rejects = manifest.get("rejects", {})
    for r in rejects.get("shards", []):
        storage.write_bytes(storage.join(out, r["path"]), storage.read_bytes(storage.join(src, r["path"])))
    counts = manifest.get("counts", {})
    return write_manifest(
        out, kind=manifest["kind"], resolution=manifest["resolution"], shards=entries,
        rejects=rejects.get("shards", []), reject_counts=rejects.get("by_reason", {}), inputs=counts.get("inputs"),
        dedup=info, inputs_fingerprint=manifest.get("inputs_fingerprint"), params=manifest.get("params", {}),
        channels=manifest.get("channels", 3),
        extra={"derived_from": {"uri": src, "content_hash": manifest.get("content_hash"),
                                "dedup": cfg.model_dump(mode="json")}},
    )

