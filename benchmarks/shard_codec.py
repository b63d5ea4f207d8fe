"""The shards' Parquet codec: ours (pixels in Snappy, text in zstd) against zstd on every column (before 2026-12-04).

Why: a build writes every image once and training reads it every epoch, so the codec is on both hot paths. Rows are
64x64 center crops of an LSUN-layout LMDB made of real photos (benchmarks/scale.py's generator: mosaics of
scikit-image and matplotlib photos and MNIST digits, JPEG and WebP), cut into shards of 2,048 rows as a build cuts
them, each written with `preprocessing.shards._parquet_bytes` and with the previous setting, in the same run.

Prints write and read CPU per row (best of 3 / 5 passes, one thread), bytes per row, and the ratios ours / before.
Run: `.venv/bin/python benchmarks/shard_codec.py` (about 30 s; `--images` for another size).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale  # noqa: E402
from preprocessing import shards  # noqa: E402
from preprocessing.images import square_image  # noqa: E402
from preprocessing.lsun import open_env  # noqa: E402


def before(table):
    buf = pa.BufferOutputStream()  # the sink ours uses: the rows compare codecs only
    pq.write_table(table, buf, compression="zstd", row_group_size=1024, write_statistics=["key"])
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--shard-rows", type=int, default=2048)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="codec-", dir="/tmp"))
    try:
        path = scale.ensure_lmdbs([args.images], work, seed=0)[args.images]
        keys, crops = [], []
        with open_env(path).begin() as txn:
            for key, value in txn.cursor():
                keys.append(key.hex())
                crops.append(square_image(value, 64, 10**8))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tables = [shards.make_table(keys[i : i + args.shard_rows], np.stack(crops[i : i + args.shard_rows]),
                                [path] * len(keys[i : i + args.shard_rows]))
              for i in range(0, len(keys), args.shard_rows)]
    n = len(keys)
    print(f"{n} rows of 64x64x3 in {len(tables)} shards, from {path}")
    figs = {}
    for name, write in (("before: zstd on every column", before), ("ours: pixels Snappy, text zstd",
                                                                     shards._parquet_bytes)):
        best_w, data = float("inf"), []
        for _ in range(3):
            t = time.process_time()
            data = [write(tb) for tb in tables]
            best_w = min(best_w, time.process_time() - t)
        best_r = float("inf")
        for _ in range(5):
            t = time.process_time()
            for d in data:
                pq.read_table(io.BytesIO(d), use_threads=False)
            best_r = min(best_r, time.process_time() - t)
        figs[name] = (best_w / n * 1e3, best_r / n * 1e3, sum(map(len, data)) / n)
        print(f"{name:32s}: write {figs[name][0]:.4f} CPU-ms a row, read {figs[name][1]:.4f}, "
              f"{figs[name][2]:,.0f} bytes a row")
    (bw, br, bb), (ow, orr, ob) = figs.values()
    print(f"\nours / before: write CPU {ow / bw:.2f}x, read CPU {orr / br:.2f}x, bytes {ob / bb:.3f}x")


if __name__ == "__main__":
    main()
