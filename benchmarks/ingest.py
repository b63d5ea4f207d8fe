"""The training input path against a bare pyarrow read of the same shards, in one run.

Shards: >= 200k rows at 32 and 64 px, tiled from real photos (scikit-image's, random square crops resized with
INTER_AREA; 8192 distinct crops, so no row repeats inside a row group), written with preprocessing.shards like a build
(2048 rows per shard, zstd). Measured, interleaved, on the same files:
  bare    one process: pq.read_table(shard, columns=["image"]) -> uint8 torch batches of 128, shard by shard.
  stream  the training path: `preprocessing.ingest.training_dataset` (one epoch, seeded shard order, every shard
          checked for size and sha256 as it is read) through `streaming_split(1, equal=True)` with Train's execution
          options, the same iterator a Ray Train worker gets, then `ingest.batches` with the default 4096-row
          shuffle buffer: uint8 torch batches of 128 as the worker receives them.
  before  (--before) the previous path: read_parquet + map_batches to tensors, iter_torch_batches with Ray Data's
          local shuffle buffer of 4096 rows.
Ray (2 CPUs, as in the tests) is started and its workers warmed before timing. `ratio` = stream / bare images/s, from
the first batch to the last (a stream starts once per run, not per epoch; its start-up is printed apart).
`img/cpu-s` counts the CPU time of every process involved (this one and all of Ray's), from the first batch on, per
image: how many cores the input needs at a given rate, whatever else the machine is doing.
Run: `.venv/bin/python benchmarks/ingest.py` (3-5 minutes on 2 cores; --dir keeps the shards for the next run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from preprocessing import ingest, shards  # noqa: E402

BATCH, SHUFFLE, SHARD_ROWS, H100_RATE = 128, 4096, 2048, 25_000


def make_dataset(uri: str, res: int, rows: int, seed: int = 0) -> dict:
    """`rows` rows tiled from 8192 distinct photo crops; reused if `uri` already holds them."""
    import cv2
    from realdata import real_photos

    if os.path.exists(os.path.join(uri, shards.MANIFEST)):
        manifest = shards.read_manifest(uri)
        if manifest["counts"]["rows"] == rows and manifest["resolution"] == res:
            return manifest
    rng = np.random.default_rng(seed)
    photos = [p for p in real_photos().values() if min(p.shape[:2]) >= 128]
    crops = np.empty((8192, res, res, 3), np.uint8)
    for i in range(len(crops)):
        p = photos[rng.integers(len(photos))]
        s = int(rng.integers(64, min(p.shape[:2]) + 1))
        y, x = rng.integers(0, p.shape[0] - s + 1), rng.integers(0, p.shape[1] - s + 1)
        crops[i] = cv2.resize(p[y:y + s, x:x + s], (res, res), interpolation=cv2.INTER_AREA)
    entries = []
    for i, start in enumerate(range(0, rows, SHARD_ROWS)):
        idx = np.arange(start, min(rows, start + SHARD_ROWS))
        table = shards.make_table([f"r{j:07d}" for j in idx], crops[idx % len(crops)])
        entries.append(shards.write_table(uri, shards.shard_name(i), table))
    return shards.write_manifest(uri, kind="bench", resolution=res, shards=entries, inputs=rows)


def _tree_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of this process and each of its descendants (Ray's daemons and workers)."""
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                text = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2:].split()
            stats[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        out[pid] = stats.get(pid, (0, 0))[1] / os.sysconf("SC_CLK_TCK")
        todo += children.get(pid, [])
    return out


class CpuMeter:
    """CPU seconds used by the process tree between start() and stop(), sampled every 0.1 s so that a Ray worker
    that exits in between (Ray reaps idle workers) still counts up to its last sample."""

    def start(self) -> None:
        self.first, self.last, self.running = _tree_cpu(), {}, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while self.running:
            self.last.update(_tree_cpu())
            time.sleep(0.1)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        self.last.update(_tree_cpu())
        return sum(v - self.first.get(pid, 0.0) for pid, v in self.last.items())


def timed(batches) -> dict:
    """Drain an iterator of uint8 batches: rows, wall time, time to the first batch, CPU of the process tree."""
    t0, meter = time.perf_counter(), CpuMeter()
    n, first = 0, None
    for b in batches:
        if first is None:
            first = time.perf_counter()
            meter.start()
        n += len(b)
    end = time.perf_counter()
    return {"rows": n, "wall": end - t0, "start": first - t0, "steady": n / (end - first), "cpu": meter.stop()}


def bare(uri: str, manifest: dict):
    import pyarrow.parquet as pq
    import torch

    for entry in manifest["shards"]:
        table = pq.read_table(os.path.join(uri, entry["path"]), columns=["image"])
        yield from torch.from_numpy(shards.images_of(table)).split(BATCH)


def stream(uri: str, manifest: dict, seed: int):
    ds = ingest.training_dataset(uri, manifest, seed=seed, start_row=0, rows=manifest["counts"]["rows"])
    ds.context.execution_options.preserve_order = True  # as ingest.data_config() asks of Ray Train
    split = ds.streaming_split(1, equal=True)[0]
    blocks = split.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
    yield from ingest.batches(blocks, BATCH, SHUFFLE, seed)


def before(uri: str, manifest: dict):
    """The input path this replaced (dcgan/train.py before): Ray Data's Parquet reader and local shuffle."""
    import functools

    import ray.data

    shape = (manifest["resolution"], manifest["resolution"], 3)

    def to_tensor(batch, shape):
        return {"image": shards.pixels(batch.column("image"), shape)}

    ds = ray.data.read_parquet(shards.shard_uris(uri, manifest), file_extensions=["parquet"]).select_columns(["image"])
    ds = ds.map_batches(functools.partial(to_tensor, shape=shape), batch_format="pyarrow", zero_copy_batch=True,
                        batch_size=None)
    split = ds.streaming_split(1, equal=True)[0]
    for b in split.iter_torch_batches(batch_size=BATCH, drop_last=True, local_shuffle_buffer_size=SHUFFLE,
                                      prefetch_batches=4):
        yield b["image"]


def line(name: str, m: dict) -> str:
    return (f"  {name:7s} {m['rows']} rows  {m['steady']:9.0f} img/s  start {m['start']:5.2f}s  "
            f"{m['rows'] / m['cpu']:8.0f} img/cpu-s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=204_800)
    ap.add_argument("--res", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", help="keep the generated shards here and reuse them on the next run")
    ap.add_argument("--before", action="store_true", help="also time the previous input path")
    args = ap.parse_args()

    import ray

    root = args.dir or tempfile.mkdtemp(prefix="dcgan-ingest-")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for res in args.res:
        uri = os.path.join(root, f"bench-{res}px-{args.rows}")
        t = time.perf_counter()
        manifest = make_dataset(uri, res, args.rows)
        print(f"{res}px: {len(manifest['shards'])} shards, {args.rows} rows ({time.perf_counter() - t:.0f}s to "
              f"make or find)", flush=True)
        small = {**manifest, "shards": manifest["shards"][:8], "counts": {"rows": 8 * SHARD_ROWS}}
        timed(stream(uri, small, seed=99))  # warm Ray's workers
        for rep in range(args.repeats):
            a = timed(bare(uri, manifest))
            b = timed(stream(uri, manifest, seed=rep))
            print(line("bare", a), line("stream", b), sep="\n")
            if args.before:
                c = timed(before(uri, manifest))
                print(line("before", c), f"  before/bare {c['steady'] / a['steady']:.3f} "
                      f"(with start-up {a['wall'] / c['wall']:.3f})", sep="\n")
            per_core = b["rows"] / b["cpu"]
            print(f"  ratio {b['steady'] / a['steady']:.3f} (with start-up {a['wall'] / b['wall']:.3f}); "
                  f"stream {per_core:.0f} img/s per core -> {H100_RATE / per_core:.2f} cores for one H100 at "
                  f"{H100_RATE} img/s", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
