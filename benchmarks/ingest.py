"""The training input where training reads it: on Ray Train workers that hold their CPUs as in training, against a
bare pyarrow read of the same shards, from local disk and from S3 (a moto server on loopback).

Shards: >= 200k rows at 32 and 64 px, tiled from real photos (scikit-image's, random square crops resized with
INTER_AREA; 8192 distinct crops, so no row repeats inside a row group), written with preprocessing.shards like a build
(2048 rows per shard, zstd). On each of W workers (a TorchTrainer, 1 CPU each, Ray on 2 CPUs), interleaved, all
workers in the same phase at once (a barrier):
  bare    pyarrow alone: `pq.read_table(shard, columns=["image"], filesystem=...)` of the shards this worker's stream
          reads in the epoch (each once, no checks) -> uint8 torch batches of batch/W, shard by shard.
  stream  the training path: `preprocessing.stream.WorkerStream` for one epoch (seeded shard order, 8 lanes, 4096-row
          shuffle windows, every shard checked for size and sha256), converted to owned torch tensors as
          dcgan/train.py does.
Reported per worker: time to the first batch (start-up), img/s from the first batch to the last (steady), `ratio` =
stream / bare steady, `with start-up` = bare / stream wall time, and the bytes the stream read / the worker's share
(dataset bytes / W).
Run: `.venv/bin/python benchmarks/ingest.py` (--dir keeps the local shards for the next run; --source local s3).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from preprocessing import shards, storage, stream  # noqa: E402
from preprocessing import dataset_layout

BATCH, SHUFFLE, SHARD_ROWS = 128, 4096, 2048


def make_dataset(uri: str, res: int, rows: int, seed: int = 0) -> dict:
    """`rows` rows tiled from 8192 distinct photo crops; reused if `uri` already holds them."""
    import cv2
    from realdata import real_photos

    if shards.is_complete(uri):
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
        entries.append(shards.write_table(uri, dataset_layout.part(i), table))
    return shards.write_manifest(uri, kind="bench", resolution=res, shards=entries, inputs=rows)


def timed(batches) -> dict:
    """Drain an iterator of uint8 batches: rows, wall time, time to the first batch, img/s after the first batch."""
    t0 = time.perf_counter()
    n, first = 0, None
    for b in batches:
        if first is None:
            first = time.perf_counter()
        n += len(b)
    end = time.perf_counter()
    return {"rows": n, "wall": end - t0, "start": first - t0, "steady": n / (end - first)}


def worker_loop(cfg: dict) -> None:
    """On each Ray Train worker: bare and stream, `repeats` times each, interleaved; results to cfg["out"]."""
    import json

    import pyarrow.parquet as pq
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    uri = cfg["uri"]
    manifest = shards.read_manifest(uri)
    spec = stream.StreamSpec.of(BATCH, SHUFFLE, seed=0)
    plan = stream.Plan([e["rows"] for e in manifest["shards"]], spec)
    steps = plan.steps_per_epoch
    fs, root = storage.arrow_filesystem(uri)
    lanes = range(*[x // plan.per_lane for x in stream.worker_span(BATCH, rank, world)])
    mine = list(dict.fromkeys(s for lane in lanes for s in plan.lane_shards(0, lane)))
    share = sum(e["bytes"] for e in manifest["shards"]) / world

    def bare():
        for i in mine:
            table = pq.read_table(f"{root}/{manifest['shards'][i]['path']}", columns=["image"], filesystem=fs)
            yield from torch.from_numpy(shards.images_of(table)).split(BATCH // world)

    def together() -> None:
        """All workers start a phase at once (they share the CPUs, as in training): no bare beside a stream."""
        if world > 1:
            torch.distributed.barrier()

    out = []
    for rep in range(cfg["repeats"]):
        together()
        a = timed(bare())
        reader = stream.WorkerStream(uri, manifest, spec, rank, world, 0, steps)
        together()
        b = timed(torch.from_numpy(np.array(shards.images_of(t))) for t in reader)
        b["bytes_share"] = reader.bytes_read / share
        out.append({"bare": a, "stream": b})
    with open(os.path.join(cfg["out"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


def on_workers(uri: str, workers: int, repeats: int) -> list[list[dict]]:
    """The measurements of each worker (a TorchTrainer holding 1 CPU per worker, as training does)."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory(prefix="dcgan-ingest-out-") as out, \
            tempfile.TemporaryDirectory(prefix="dcgan-ingest-ray-") as storage_path:
        TorchTrainer(worker_loop, train_loop_config={"uri": uri, "out": out, "repeats": repeats},
                     scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(storage_path=storage_path)).fit()
        return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(workers)]


def to_s3(local: str, uri: str) -> None:
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            storage.upload_file(path, storage.join(uri, str(path.relative_to(local))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=204_800)
    ap.add_argument("--res", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--source", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", help="keep the generated shards here and reuse them on the next run")
    args = ap.parse_args()

    import ray

    root = args.dir or tempfile.mkdtemp(prefix="dcgan-ingest-")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    server = None
    if "s3" in args.source:
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request

        from conftest import free_port

        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                          AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print("| px | source | workers | rank | run | bare start | bare img/s | stream start | stream img/s | **ratio** | "
          "with start-up | bytes / share |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    try:
        for res in args.res:
            local = os.path.join(root, f"bench-{res}px-{args.rows}")
            make_dataset(local, res, args.rows)
            for source in args.source:
                uri = local
                if source == "s3":
                    uri = f"s3://bench/{res}px"
                    to_s3(local, uri)
                for workers in args.workers:
                    for rank, reps in enumerate(on_workers(uri, workers, args.repeats)):
                        for rep, m in enumerate(reps):
                            a, b = m["bare"], m["stream"]
                            print(f"| {res} | {source} | {workers} | {rank} | {rep + 1} | {a['start']:.2f} s | "
                                  f"{a['steady']:,.0f} | {b['start']:.2f} s | {b['steady']:,.0f} | "
                                  f"**{b['steady'] / a['steady']:.2f}** | {a['wall'] / b['wall']:.2f} | "
                                  f"{b['bytes_share']:.3f} |", flush=True)
                if source == "s3":
                    storage.delete_prefix(uri)
    finally:
        ray.shutdown()
        if server is not None:
            server.stop()
        if not args.dir:  # the generated shards: this run's own (--dir keeps them for the next run)
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
