"""The one dataset build both kinds share: plan chunks -> Ray tasks (one per chunk) -> shards + rejects -> manifest
(layer: preprocessing). Over 300 lines because planning, the chunk task and the resumable driver share the chunk
contract (spec, digest, sidecar) and are read together.

- Deterministic: inputs are listed and sorted by key on the driver and cut into fixed chunks; chunk i becomes
  `shards/part-i.parquet` (rows sorted by key) and `rejects/part-i.parquet`. Same inputs and parameters give the same
  bytes, so the manifest's content hash repeats.
- Parallel the same way on a laptop and a cluster: one Ray task per chunk spec (`_run_chunks`); each fetches its
  inputs (threads for I/O), decodes/crops with one OpenCV thread, and writes its own files through
  `preprocessing.shards.write_table` (Ray Data's `write_parquet` is not idempotent). Progress advances per chunk.
- Resumable: each finished chunk leaves a sidecar (`_chunks/part-i.json`) with a digest of its spec and parameters;
  a re-run skips chunks whose sidecar matches. The manifest is written last, and only if the build is usable.
- Bad input never stops a build: each becomes a reject row (key, source, reason, detail). The build fails (raises
  BuildError, writes no manifest) only if no row came out or bad inputs exceed `max_reject_rate`. Photos without a
  face, hidden files and symlink loops are recorded as rejects too, but as filter outcomes they do not count against
  the rate.
- Configuration faults (a missing face detector model) are found by `preflight` before any input is read, once.
"""

from __future__ import annotations

from preprocessing.errors import InputError, TransientError, known_fault

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from preprocessing import compute, dataset_layout, lease, ownership, shards, storage
from preprocessing.config import BuildConfig, ClusterConfig, DedupConfig
from preprocessing.images import Reject
from preprocessing.progress import Progress
from preprocessing.sources import HIDDEN, SYMLINK_LOOP

log = logging.getLogger(__name__)

CHUNK_RETRIES = 3
CHUNK_TASK_RETRIES = 3  # Ray runs a chunk again this many times when its worker or node is lost
IN_FLIGHT_PER_CPU = 2   # chunk tasks queued a cluster CPU: the next one starts the moment a CPU frees
NO_DEDUP = DedupConfig(enabled=False)
PIXEL_CAP_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"  # OpenCV's own decode cap (pixels), read once per process
ERROR = "error"  # an unexpected exception on one input: recorded with its type and message, the build goes on
# Reasons that are outcomes of filtering, not bad input: they do not count against max_reject_rate. A photo without a
# face is what the faces filter is for. A hidden file is metadata by convention (.DS_Store, .git, ._AppleDouble) and
# a symlink loop lists nothing new (its target folder is listed already): neither means a photo was lost. A broken
# link, a bad URL or a FIFO does (someone meant an input to be there), so those count.
# Robots.txt and X-Robots-Tag opt-outs are the sites' choice, honoured: not bad input either.
FILTERED = frozenset({"no_face", HIDDEN, SYMLINK_LOOP, "robots", "opt_out"})
STATE_DIR, STAGING = dataset_layout.CHUNKS, dataset_layout.STAGING
# Run options: they change how a build runs, not a single output byte, so they are not part of a dataset's identity
# (changing them neither invalidates finished chunks nor makes a finished dataset "different").
RUN_OPTIONS = frozenset({"overwrite", "download_concurrency", "max_reject_rate", "contact", "host_concurrency",
                         "host_rate", "max_retry_wait_s", "yunet_gpus"})


class BuildError(shards.DatasetError):
    """A build that produced nothing usable, too many rejects, or would overwrite a dataset without permission."""


@dataclass
class Plan:
    chunks: list[dict[str, Any]]
    inputs: int
    fingerprint: str


# ---------------------------------------------------------------------------------------------------- planning


def require_input(cfg: BuildConfig | None) -> None:
    """A build needs an input: the one check (the stage asks before looking for an earlier build)."""
    if cfg is None or not cfg.input:
        raise InputError("build.input: no input given (LMDB, folder, s3:// prefix or URL list)")


def plan(cfg: BuildConfig) -> Plan:
    """The inputs cut into chunks of `shard_rows` inputs, in key order; each chunk spec is JSON-serialisable."""
    require_input(cfg)
    from preprocessing import lsun
    from preprocessing.sources import chunk_items, is_streamed_url_list, list_items, plan_url_list

    if cfg.kind == "center-crop" and lsun.is_lmdb(cfg.input):
        chunks, n, fp = lsun.plan_lmdb(cfg.input, cfg.shard_rows, cfg.limit)
    elif is_streamed_url_list(cfg.input):  # a URL list (.txt/.lst/.csv/.tsv/.parquet): streamed, never held whole
        chunks, n, fp = plan_url_list(cfg.input, cfg.shard_rows, cfg.limit)
    else:  # a folder (LSUN's exported images, or photos), an s3:// prefix or a URL list
        chunks, n, fp = chunk_items(list_items(cfg.input, cfg.limit), cfg.shard_rows)
    for i, c in enumerate(chunks):
        c["index"] = i
    return Plan(chunks, n, fp)


def preflight(cfg: BuildConfig) -> None:
    """Faults of the configuration, found before any input is read or Ray starts: one error, not one reject per
    input. A missing or unloadable face detector raises MissingError / InputError naming it."""
    if cfg.kind == "faces":
        from preprocessing.faces import detector

        if cfg.detector == "yunet" and cfg.yunet_device.startswith("cuda"):
            cfg = cfg.model_copy(update={"yunet_device": "cpu"})  # the model checked here; the GPU is the tasks'
        detector(cfg)


# Parameters added after datasets were built: left out of the identity while at their defaults, so those datasets
# keep theirs.
LATER_DEFAULTS = {"allow_private_hosts": [], "max_redirects": 5, "robots_txt": True,
                  "opt_out_tags": ["noai", "noimageai", "noindex", "noimageindex"], "detector": "haar",
                  "detector_model": None, "yunet_face_px": 64, "yunet_device": "opencv"}


def _params(cfg: BuildConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.model_dump(mode="json").items()
            if k not in RUN_OPTIONS and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


def identity(cfg: BuildConfig, dedup: DedupConfig) -> dict[str, Any]:
    """What makes a dataset this dataset: every build parameter but the run options, and the dedup parameters (None
    when `dedup.enabled` is off). The manifest records it as `params`; equal identities over equal inputs give equal rows."""
    return {**_params(cfg), "dedup": dedup.model_dump(mode="json") if dedup.enabled else None}


def already_built(out: str, cfg: BuildConfig, dedup: DedupConfig = NO_DEDUP) -> dict[str, Any] | None:
    """The manifest of the dataset at `out` if it is complete and has this identity (a re-run has nothing to do)."""
    try:
        manifest = shards.read_manifest(out)
    except shards.DatasetError:
        return None
    recorded = dict(manifest.get("params") or {})
    if recorded.get("kind") == "lsun":  # recorded before center-crop had its name
        recorded["kind"] = "center-crop"
    return manifest if recorded == identity(cfg, dedup) else None


def chunk_digest(chunk: dict[str, Any], params: dict[str, Any]) -> str:
    blob = json.dumps({"chunk": chunk, "params": params, "code": shards.CODE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- one chunk


def _inputs(chunk: dict[str, Any], cfg: BuildConfig, gates: tuple[str, ...] = ()
            ) -> Iterator[tuple[str, str, bytes | Reject]]:
    """(key, source, bytes or the Reject that fetching it became), in chunk order; `gates`: the build's per-host
    limits (`host_gate`)."""
    if "lmdb" in chunk:
        from preprocessing.lsun import read_range

        for key, value in read_range(chunk["lmdb"], chunk["start"], chunk["count"]):
            yield key, chunk["lmdb"], value
        return
    from preprocessing.sources import fetch, interleave_hosts, ordered_map, url_chunk_items

    policy = policy_of(cfg, gates)

    def get(item):
        key, source, *listed = item
        if listed:  # rejected while listing (hidden, a broken link, not an http(s)/s3 URL): never read
            return key, source, Reject(*listed)
        try:
            return key, source, fetch(source, cfg.download_timeout_s, cfg.download_retries, cfg.max_download_bytes,
                                       policy)
        except Reject as r:
            return key, source, r
        except TransientError:
            raise  # the chunk fails and runs again (`_with_retries`); the input is not bad
        except Exception as err:  # noqa: BLE001 - one input's failure must not stop the chunk
            return key, source, Reject(ERROR, f"{type(err).__name__}: {err}"[:300])

    items = chunk["items"] if "items" in chunk else url_chunk_items(chunk)  # a streamed URL list: read here
    yield from ordered_map(get, interleave_hosts(items), cfg.download_concurrency)


def policy_of(cfg: BuildConfig, gates: tuple[str, ...] = ()):
    """The network policy (address checks and politeness) of a build's downloads; with `gates` its per-host limits
    hold over the whole build (`host_gate`), else per process."""
    from preprocessing.downloads import Policy

    return Policy(tuple(cfg.allow_private_hosts), cfg.max_redirects, cfg.contact, cfg.robots_txt,
                  tuple(cfg.opt_out_tags), cfg.host_concurrency, cfg.host_rate, cfg.max_retry_wait_s, tuple(gates))


def _transform(kind: str) -> Callable:
    if kind == "center-crop":
        from preprocessing.lsun import lsun_rows

        return lsun_rows
    from preprocessing.faces import face_rows

    return face_rows


def _reject_table(rejects: list[tuple[str, str, str, str]]) -> pa.Table:
    rejects = sorted(rejects)
    cols = list(zip(*rejects)) if rejects else [[], [], [], []]
    return pa.Table.from_arrays([shards.text_column(c, pa.string()) for c in cols], schema=shards.REJECT_SCHEMA)


def run_chunk(chunk: dict[str, Any], cfg: BuildConfig, shards_uri: str, rejects_uri: str,
              gates: tuple[str, ...] = ()) -> dict[str, Any]:
    """Build one chunk: its shard under `shards_uri`, its rejects under `rejects_uri`, and its sidecar.

    Returns the chunk's result (also the sidecar's content); a chunk finished by an earlier run is not redone.
    """
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from Ray; OpenCV's own threads would oversubscribe the cores
    index = chunk["index"]
    digest = chunk_digest(chunk, _params(cfg))
    sidecar = dataset_layout.chunk_state(shards_uri, index)
    try:
        done = storage.read_json(sidecar) if storage.exists(sidecar) else None
    except (storage.StorageError, ValueError):
        done = None
    if done and done.get("digest") == digest and all(
        storage.exists(storage.join(uri, e["path"]))
        for uri, e in ((shards_uri, done["shard"]), (rejects_uri, done["rejects"])) if e
    ):
        if not storage.exists(storage.join(rejects_uri, dataset_layout.stats(index))):
            _write_stats(rejects_uri, done)  # finished by a version that wrote none
        return {**done, "resumed": True}

    transform = _transform(cfg.kind)
    if cfg.kind == "faces":  # a detector this task cannot load (yunet_device cuda, no GPU here) fails the chunk as
        from preprocessing.faces import detector  # one error, not as an `error` reject for every photo

        detector(cfg)
    started = time.perf_counter()
    rows, rejects, n, nbytes = [], [], 0, 0
    for key, source, got in _inputs(chunk, cfg, gates):
        n += 1
        nbytes += len(got) if isinstance(got, (bytes, bytearray, memoryview)) else 0
        try:
            if isinstance(got, Reject):
                raise got
            rows.extend(transform(key, source, got, cfg))
        except Reject as r:
            rejects.append((key, source, r.reason, r.detail))
        except TransientError:
            raise
        except Exception as err:  # noqa: BLE001 - recorded, never silently dropped
            rejects.append((key, source, ERROR, f"{type(err).__name__}: {err}"[:300]))

    rows.sort(key=lambda r: r[0])
    work_s, started = time.perf_counter() - started, time.perf_counter()
    shard_entry = reject_entry = None
    if rows:
        table = shards.make_table([r[0] for r in rows], np.stack([r[1] for r in rows]), [r[2] for r in rows],
                                  [r[3] for r in rows])
        shard_entry = shards.write_table(shards_uri, dataset_layout.part(index), table)
    if rejects:
        reject_entry = shards.write_table(rejects_uri, dataset_layout.part(index, "rejects"), _reject_table(rejects))
    result = {
        "index": index, "digest": digest, "inputs": n, "rows": len(rows), "shard": shard_entry,
        "rejects": reject_entry, "reject_counts": dict(Counter(r[2] for r in rejects)),
        "work_s": round(work_s, 3), "write_s": round(time.perf_counter() - started, 3), "bytes": nbytes,
    }
    _write_stats(rejects_uri, result)
    storage.write_json(sidecar, result)  # last: a chunk with a sidecar has its shard, rejects and stats
    return {**result, "resumed": False}


def _write_stats(dataset: str, result: dict[str, Any]) -> None:
    """One chunk's figures next to its shard (`stats/part-i.json`): where its inputs went, bytes fetched, time."""
    storage.write_json(storage.join(dataset, dataset_layout.stats(result["index"])), {
        "index": result["index"], "inputs": result["inputs"], "rows": result["rows"],
        "shard": (result["shard"] or {}).get("path"),
        "rejects_by_reason": dict(sorted(result["reject_counts"].items())),
        "bytes": result.get("bytes"), "seconds": round(result["work_s"] + result["write_s"], 3),
        "fetch_decode_s": result["work_s"], "write_s": result["write_s"],
    })


def totals(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The chunks' figures summed (resumed chunks included: the dataset's totals, not this run's)."""
    by_reason: Counter = Counter()
    for r in results:
        by_reason.update(r["reject_counts"])
    known = [r["bytes"] for r in results if r.get("bytes") is not None]
    return {"inputs": sum(r["inputs"] for r in results), "rows": sum(r["rows"] for r in results),
            "rejects_by_reason": dict(sorted(by_reason.items())),
            "bytes": sum(known) if len(known) == len(results) else None,
            "task_seconds": round(sum(r["work_s"] + r["write_s"] for r in results), 2),
            "shard_stats": [dataset_layout.stats(r["index"]) for r in results]}


def _chunk_task(spec: dict, cfg_json: str, shards_uri: str, rejects_uri: str, gates: tuple[str, ...] = ()) -> dict:
    """One Ray task: one chunk spec in, its result out."""
    cfg = BuildConfig.model_validate_json(cfg_json)
    if os.environ.get(PIXEL_CAP_ENV) != str(cfg.max_pixels):  # a bug, not bad input: the second guard is missing
        raise RuntimeError(f"build worker without its {PIXEL_CAP_ENV}={cfg.max_pixels} (runtime_env not applied)")
    return _with_retries(spec, cfg, shards_uri, rejects_uri, gates)


def _with_retries(spec: dict, cfg: BuildConfig, shards_uri: str, rejects_uri: str, gates: tuple[str, ...]) -> dict:
    """A chunk whose storage kept failing after boto3's own retries runs again, after a pause, up to CHUNK_RETRIES
    times (the other chunks are not redone); a lost worker or node is Ray's to retry."""
    for attempt in range(CHUNK_RETRIES + 1):
        try:
            return run_chunk(spec, cfg, shards_uri, rejects_uri, gates)
        except TransientError as err:
            if attempt == CHUNK_RETRIES:
                raise
            log.warning("chunk %s: %s; retrying (%d of %d)", spec.get("index"), err, attempt + 1, CHUNK_RETRIES)
            time.sleep(min(30.0, 2.0 ** attempt))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------- the build


def _task_gpus(cfg: BuildConfig) -> float:
    """The GPU share a chunk task asks for: `yunet_gpus` where YuNet runs on CUDA, else none. A cluster that has no
    GPU and cannot grow one (its autoscaler's maximum) is a one-line error here: Ray would hold the tasks pending."""
    import ray

    if not (cfg.kind == "faces" and cfg.detector == "yunet" and cfg.yunet_device.startswith("cuda")):
        return 0
    maximum = compute.autoscaler_maximum() or {}
    gpus = max(ray.cluster_resources().get("GPU", 0), maximum.get("GPU", 0))
    if gpus < cfg.yunet_gpus:
        raise InputError(f"build.yunet_device: {cfg.yunet_device}, but the Ray cluster has {gpus:g} GPUs (each build "
                         f"task asks for build.yunet_gpus = {cfg.yunet_gpus:g}); use yunet_device: opencv or add a "
                         f"GPU node")
    return cfg.yunet_gpus


class GpusNeverCame(TransientError):
    """A face build's cluster had no GPU within the wait (an autoscaler's GPU node that never came)."""


def _run_chunks(chunks: list[dict], cfg: BuildConfig, shards_uri: str, rejects_uri: str, total: int,
                progress: bool, address: str | None = None) -> list[dict]:
    """Run the chunks as Ray tasks, at most `IN_FLIGHT_PER_CPU` a cluster CPU at a time, spread over the nodes.

    Plain tasks, not Ray Data: a chunk's inputs and outputs never pass through the driver (its result is a few
    hundred bytes), so there is nothing to stream or back-pressure, and Ray Data's start-up (its executor, stats
    actor and pandas import: ~0.5 s and ~2 CPU-s a stage) bought nothing. A worker or node lost mid-chunk is
    retried by Ray (`max_retries`); a chunk's known fault reaches the caller as itself. Chunks still in flight are
    not cancelled: each finishes whole (its sidecar lets a re-run reuse it) or ends with this driver's job, and
    `ray.cancel` racing a task's completion while an interrupted driver exits aborted Ray's core worker (exit 1,
    not 130, on Ctrl-C). Ray is started or joined here (`address`: cluster.address), after the build's checks."""
    import ray

    compute.connect(address)
    results: list[dict] = []
    gates: tuple[str, ...] = ()
    pending: set = set()  # chunk tasks in flight
    try:
        gates = _start_gates(cfg)
        gpus = _task_gpus(cfg)
        task = ray.remote(_chunk_task).options(
            num_cpus=1, num_gpus=gpus, max_retries=CHUNK_TASK_RETRIES, scheduling_strategy="SPREAD",
            # OpenCV's own pixel cap, a second guard behind the header checks, read once when a worker loads cv2:
            # it goes with these tasks, whoever started Ray in this process (the demo does, without it)
            runtime_env={"env_vars": {PIXEL_CAP_ENV: str(cfg.max_pixels)}})
        args = (ray.put(cfg.model_dump_json()), shards_uri, rejects_uri, gates)
        window = IN_FLIGHT_PER_CPU * compute.cluster_cpus()
        queued = iter(chunks)
        rows = rejected = resumed = 0
        gpu_seen = not gpus or ray.cluster_resources().get("GPU", 0) >= gpus
        with Progress(cfg.kind, total, "inputs", show=progress) as shown:
            while True:
                while len(pending) < window and (spec := next(queued, None)) is not None:
                    pending.add(task.remote(spec, *args))
                if not pending:
                    break
                # a GPU build on a cluster with no GPU yet (an autoscaler's to come) waits for one at most
                # `workers_wait_s()`: one line, not a silent hang, if it never comes
                wait_s = compute.workers_wait_s() if gpus and not gpu_seen else None
                done, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
                gpu_seen = gpu_seen or ray.cluster_resources().get("GPU", 0) >= gpus
                if not done and not gpu_seen:
                    raise GpusNeverCame(f"build.yunet_device: {cfg.yunet_device}: the Ray cluster had no GPU for the "
                                        f"build's tasks within {wait_s:g} s ({compute.WAIT_ENV}): the GPU node its "
                                        f"autoscaler was to add never came; add one, or use yunet_device: opencv")
                if not done:
                    continue
                [ref] = done
                pending.remove(ref)
                r = ray.get(ref)
                results.append(r)
                rows, rejected = rows + r["rows"], rejected + sum(r["reject_counts"].values())
                resumed += bool(r["resumed"])
                shown.advance(r["inputs"], note=f"{len(results)}/{len(chunks)} chunks, {rows} rows, {rejected} "
                                                f"rejects" + (f", {resumed} chunks resumed" if resumed else ""))
    except ray.exceptions.RayTaskError as err:
        fault = known_fault(err)
        if fault is None:
            raise  # a bug: Ray's error keeps the task's traceback
        raise fault from None
    finally:
        if gates:
            from preprocessing import host_gate

            seen = host_gate.stop(gates)
            log.info("per-host limits (build.host_concurrency %d, host_rate %g) over the whole build: %d hosts, %d "
                     "requests, at most %d in flight on one host, %d leases lapsed", cfg.host_concurrency,
                     cfg.host_rate, seen["hosts"], seen["requests"], seen["peak_in_flight"], seen["lapsed"])
    return sorted(results, key=lambda r: r["index"])


def _start_gates(cfg: BuildConfig) -> tuple[str, ...]:
    """A URL list's per-host limits, kept for the whole build by `host_gate` actors (no gates for other inputs)."""
    from preprocessing.sources import is_url_list

    if not is_url_list(cfg.input):
        return ()
    from preprocessing import host_gate

    return host_gate.start(cfg.host_concurrency, cfg.host_rate)


def _enough_to_deduplicate(cfg: BuildConfig, p: Plan, dedup: DedupConfig) -> None:
    """A center-crop build gives at most a row an input: with fewer inputs than the hashing autoencoder needs, its
    de-duplication would fail after the whole build (a face build may find several faces a photo: it is told then)."""
    if dedup.enabled and cfg.kind == "center-crop":
        from preprocessing.dedup.dataset import require_enough

        require_enough(cfg.input, p.inputs, "inputs", dedup)


def _refuse_a_dataset(out: str, overwrite: bool) -> None:
    """An existing dataset at `out` is kept unless `overwrite`."""
    if not overwrite and shards.has_manifest(out):
        raise BuildError(f"{out} already holds a dataset (manifest.json); pass --overwrite (a flow's build "
                         "parameter: \"overwrite\": true) to replace it, or choose another output")


def _prepare(out: str, overwrite: bool) -> None:
    """Under the dataset's lease: an existing dataset there (it may have been committed by the writer before this
    one) is kept unless `overwrite`, which removes only the project's own files, manifest first."""
    _refuse_a_dataset(out, overwrite)
    if shards.has_manifest(out):
        ownership.remove_own(out, "dataset")


def _remove_unlisted(out: str, folder: str, keep: list[dict]) -> None:
    """Delete the project's files under out/folder that no entry lists (left by an earlier attempt with other
    inputs); files with other names are not ours and stay."""
    listed = {storage.join(out, e["path"]) for e in keep}
    for uri in storage.list_uris(storage.join(out, folder)):
        rel = uri[len(out) + 1:]
        if uri not in listed and ownership.is_own_file("dataset", rel):
            storage.delete_prefix(uri)


def _deduplicate(src: str, entries: list[dict], out: str, dedup: DedupConfig, cluster: ClusterConfig | None
                 ) -> tuple[list[dict], dict]:
    try:
        from preprocessing.dedup.dataset import deduplicate
    except ImportError as err:
        raise BuildError(f"de-duplication requested but unavailable ({err}); build with --no-dedup") from None
    return deduplicate(src, entries, out, dedup, cluster)


def build_dataset(cfg: BuildConfig, out: str, dedup: DedupConfig = NO_DEDUP, progress: bool = True,
                  cluster: ClusterConfig | None = None) -> dict:
    """Build (or finish building) the dataset at `out`; returns its manifest. Raises BuildError, writing no manifest,
    when nothing usable came out or bad inputs exceed `cfg.max_reject_rate`."""
    preflight(cfg)
    out = storage.normalize(out)
    if cfg.input and (storage.is_s3(cfg.input) or "://" not in cfg.input) and storage.overlaps(cfg.input, out):
        raise InputError(f"--out {out} overlaps the input {cfg.input}: a build writes its dataset beside its input, "
                         "never into or around it (a later build would read its own shards as inputs)")
    started = time.perf_counter()
    p = plan(cfg)  # bad input fails here, before anything is written
    _enough_to_deduplicate(cfg, p, dedup)
    address = cluster.address if cluster else None
    compute.check_place(address)  # a Ray that cannot start: nothing written; Ray itself starts after the checks
    _refuse_a_dataset(out, cfg.overwrite)
    ownership.claim(out, "dataset", legacy=shards.is_complete)  # refuses a location with files we did not write
    with lease.held(out, dataset_layout.lease(out), lease.DATASET):  # one writer: a second build is one line
        _prepare(out, cfg.overwrite)
        return _build_into(out, cfg, p, dedup, progress, cluster, started)


def _build_into(out: str, cfg: BuildConfig, p: Plan, dedup: DedupConfig, progress: bool, cluster: ClusterConfig | None,
                started: float) -> dict:
    """The build's writes into `out`, its lease held: chunks, de-duplication, the manifest last."""
    use_dedup = dedup.enabled  # the one switch (dcgan build --no-dedup sets it)
    shards_uri = storage.join(out, STAGING) if use_dedup else out
    log.info("%s build of %s: %d inputs in %d chunks -> %s%s", cfg.kind, cfg.input, p.inputs, len(p.chunks), out,
             " (de-duplicated)" if use_dedup else "")
    results = _run_chunks(p.chunks, cfg, shards_uri, out, p.inputs, progress, cluster.address if cluster else None)

    reject_counts = Counter()
    for r in results:
        reject_counts.update(r["reject_counts"])
    rows = sum(r["rows"] for r in results)
    bad = sum(v for k, v in reject_counts.items() if k not in FILTERED)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(reject_counts.items())) or "none"
    wall = time.perf_counter() - started
    stats = {"chunks": len(results), "resumed": sum(r["resumed"] for r in results), "seconds": round(wall, 2),
             "task_work_s": round(sum(r["work_s"] for r in results if not r["resumed"]), 2),
             "task_write_s": round(sum(r["write_s"] for r in results if not r["resumed"]), 2), **totals(results)}
    log.info("%s: %d inputs -> %d rows in %.1f s (task time: %.1f s fetch/decode, %.1f s writing); "
             "rejects by reason: %s", cfg.kind, p.inputs, rows, wall, stats["task_work_s"], stats["task_write_s"],
             summary)
    if rows == 0:
        raise BuildError(f"{cfg.input}: no usable rows from {p.inputs} inputs (rejects by reason: {summary}); "
                         f"see {dataset_layout.rejects(out)}")
    if bad / p.inputs > cfg.max_reject_rate:
        raise BuildError(f"{cfg.input}: {bad} of {p.inputs} inputs rejected ({bad / p.inputs:.1%}) > max_reject_rate "
                         f"{cfg.max_reject_rate:.1%} (by reason: {summary}); see {dataset_layout.rejects(out)}")

    entries = [r["shard"] for r in results if r["shard"]]
    reject_entries = [r["rejects"] for r in results if r["rejects"]]
    dedup_info = None
    if use_dedup:
        entries, dedup_info = _deduplicate(shards_uri, entries, out, dedup, cluster)
    _remove_unlisted(out, "shards", entries)
    _remove_unlisted(out, "rejects", reject_entries)
    _remove_unlisted(out, dataset_layout.STATS, [{"path": dataset_layout.stats(r["index"])} for r in results])
    manifest = shards.write_manifest(
        out, kind=cfg.kind, resolution=cfg.resolution, shards=entries, rejects=reject_entries,
        reject_counts=dict(reject_counts), inputs=p.inputs, dedup=dedup_info, inputs_fingerprint=p.fingerprint,
        params=identity(cfg, dedup),
        extra={"build_stats": stats},
    )
    ownership.remove_own(out, "dataset", under=STAGING if use_dedup else STATE_DIR)
    log.info("wrote %s: %d rows in %d shards, content hash %s", dataset_layout.manifest(out),
             manifest["counts"]["rows"], len(entries), manifest["content_hash"][:16])
    return manifest
