"""LSUN LMDB -> 64x64 rows: the Ray Data build against a single-process loop in the style of fyu/lsun's tools.

The LMDB is built here from real photos (scikit-image's, rescaled to LSUN's 256-pixel shorter side, random crops
and flips for distinct entries, JPEG quality 75 as in LSUN's README). Three measurements, same entries, same run:
  baseline  one process: iterate the cursor, cv2.imdecode at full size, center crop, INTER_AREA resize (fyu/lsun style;
            OpenCV keeps its default threads), nothing written.
  ours-1p   one process, our per-image path (`preprocessing.images.square_image`: header checks, JPEG decoded at 1/2
            or 1/4 scale in libjpeg, crop, resize), nothing written: the per-image gain alone.
  ray       `build_dataset` end to end on Ray with all cores (one task a key range, one LMDB env per worker, shards
            written as Parquet). Ray is started and its workers warmed before timing; start-up is printed apart.
  cold      the same LMDB read from a cold page cache (the file's pages evicted with posix_fadvise before each run,
            a fresh process each): the driver's key walk (`plan_lmdb`) and ours-1p's read + decode, with LMDB's
            readahead off (the setting before 2026-12-03) and on (`preprocessing.lsun.open_env` now). A build
            reads its LMDB once, so this is what a first build of a dataset on disk pays. Skipped where /tmp is
            tmpfs (nothing to evict); `--work` puts the LMDB on another disk.
Ratios: ray / baseline is the headline (target >= 1.7x on 2 cores); ours-1p / baseline and ray / ours-1p split it into
the decode gain and the parallel gain. Run: `.venv/bin/python benchmarks/lmdb_decode.py` (about a minute; `--format
webp` for WebP entries).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from preprocessing.lsun import write_lmdb  # noqa: E402


def make_lmdb(path: str, n: int, seed: int = 0, fmt: str = "jpeg") -> int:
    """n distinct LSUN-like JPEG (or WebP) entries from real photos; returns the total encoded bytes."""
    from realdata import lsun_like_photos

    rng = np.random.default_rng(seed)
    photos = list(lsun_like_photos(320).values())
    entries = {}
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        ch, cw = 256, int(rng.integers(256, min(w, 384) + 1))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = img[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        quality = cv2.IMWRITE_JPEG_QUALITY if fmt == "jpeg" else cv2.IMWRITE_WEBP_QUALITY
        ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".webp", np.ascontiguousarray(crop[..., ::-1]),
                               [quality, 75])
        data = buf.tobytes()
        entries[hashlib.sha1(data + i.to_bytes(4, "little")).hexdigest().encode()] = data
    write_lmdb(path, entries)
    return sum(len(v) for v in entries.values())


def baseline(path: str, res: int) -> tuple[int, float]:
    """fyu/lsun style: one process walks the cursor and decodes every value at full size."""
    import lmdb

    env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
    t = time.perf_counter()
    n, acc = 0, 0
    with env.begin(write=False) as txn:
        for _, val in txn.cursor():
            img = cv2.imdecode(np.frombuffer(val, np.uint8), cv2.IMREAD_COLOR)
            h, w = img.shape[:2]
            s = min(h, w)
            crop = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
            out = cv2.cvtColor(cv2.resize(crop, (res, res), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
            acc += int(out[0, 0, 0])
            n += 1
    env.close()
    return n, time.perf_counter() - t


def ours_single(path: str, res: int) -> tuple[int, float]:
    from preprocessing.images import square_image
    from preprocessing.lsun import plan_lmdb, read_range

    t = time.perf_counter()
    (chunk,), n, _ = plan_lmdb(path, 10**9)
    for _, val in read_range(chunk["lmdb"], chunk["start"], chunk["count"]):
        square_image(val, res, 50_000_000)
    return n, time.perf_counter() - t


COLD = """
import os, sys, time
import lmdb
import preprocessing.lsun as lsun
from preprocessing.images import square_image
path, readahead = sys.argv[1], sys.argv[2] == "1"
fd = os.open(path + "/data.mdb", os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache: the first read of a dataset
os.close(fd)
opened = lmdb.open
lsun.lmdb.open = lambda *a, **k: opened(*a, **{**k, "readahead": readahead})  # the setting under test
t = time.perf_counter()
(chunk,), n, _ = lsun.plan_lmdb(path, 10**9)
keys_s, t = time.perf_counter() - t, time.perf_counter()
for _, val in lsun.read_range(chunk["lmdb"], chunk["start"], chunk["count"]):
    square_image(val, 64, 50_000_000)
print(n, keys_s, time.perf_counter() - t)
"""


def cold(path: str) -> None:
    """Key walk and read + decode from a cold page cache, LMDB readahead off vs on, each in a fresh process."""
    import subprocess

    where = Path(path).resolve()
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    fs = max(((point, kind) for point, kind in mounts if where.is_relative_to(point)), default=("", ""),
             key=lambda m: len(m[0]))[1]  # the file system of the deepest mount point holding the LMDB
    if fs == "tmpfs":
        print("cold: skipped (the LMDB is on tmpfs: nothing to evict)")
        return
    got = {}
    for readahead in ("0", "1", "0", "1"):  # interleaved, best of two
        out = subprocess.run([sys.executable, "-c", COLD, path, readahead], capture_output=True, text=True,
                             check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
        n, keys_s, read_s = int(out[0]), float(out[1]), float(out[2])
        prev = got.get(readahead, (n, float("inf"), float("inf")))
        got[readahead] = (n, min(prev[1], keys_s), min(prev[2], read_s))
    for readahead, label in (("0", "readahead off (before)"), ("1", "readahead on (ours)   ")):
        n, keys_s, read_s = got[readahead]
        print(f"cold, {label}: key walk {n / keys_s:8.0f} keys/s, read + decode {n / read_s:6.0f} img/s "
              f"({keys_s:.2f} s + {read_s:.2f} s, best of 2)")
    (_, k0, r0), (_, k1, r1) = got["0"], got["1"]
    print(f"ratio cold on / off       : key walk {k0 / k1:.2f}x, read + decode {r0 / r1:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=8000)
    ap.add_argument("--shard-rows", type=int, default=1000)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--work", help="folder for the LMDB (default: a temporary one); its disk is what 'cold' reads")
    ap.add_argument("--only-cold", action="store_true", help="only the cold-cache rows")
    ap.add_argument("--format", choices=["jpeg", "webp"], default="jpeg",
                    help="the entries' encoding (LSUN's README says JPEG; many of its categories are WebP, which "
                         "OpenCV decodes only at full scale)")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = Path(tempfile.mkdtemp(prefix="lmdb-bench-", dir=args.work))
    try:
        t = time.perf_counter()
        nbytes = make_lmdb(str(tmp / "bedroom_train_lmdb"), args.entries, fmt=args.format)
        print(f"LMDB: {args.entries} {args.format.upper()} entries from real photos, {nbytes / 1e6:.1f} MB, "
              f"built in {time.perf_counter() - t:.1f} s")
        lmdb_path = str(tmp / "bedroom_train_lmdb")
        cold(lmdb_path)
        if args.only_cold:
            return

        n, base_s = baseline(lmdb_path, args.resolution)
        print(f"baseline (1 process, full decode)  : {n / base_s:8.0f} img/s  ({n} in {base_s:.2f} s)")
        n, one_s = ours_single(lmdb_path, args.resolution)
        print(f"ours-1p  (1 process, reduced decode): {n / one_s:8.0f} img/s  ({n} in {one_s:.2f} s)")

        import ray

        from preprocessing.build import build_dataset
        from preprocessing.config import BuildConfig

        t = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        cfg = BuildConfig(kind="lsun", input=lmdb_path, resolution=args.resolution, shard_rows=args.shard_rows)
        build_dataset(cfg.model_copy(update={"limit": 2 * args.cpus}), str(tmp / "warm"), progress=False)
        print(f"ray start-up + worker warm-up        : {time.perf_counter() - t:.1f} s (not in the ratio)")
        best = float("inf")
        for rep in range(2):
            shutil.rmtree(tmp / "out", ignore_errors=True)
            t = time.perf_counter()
            manifest = build_dataset(cfg, str(tmp / "out"), progress=False)
            best = min(best, time.perf_counter() - t)
        rows = manifest["counts"]["rows"]
        print(f"ray      ({args.cpus} CPUs, Ray tasks, shards)  : {rows / best:8.0f} img/s  ({rows} in {best:.2f} s, "
              f"{len(manifest['shards'])} shards, best of 2)")
        st = manifest["build_stats"]
        print(f"  task time: {st['task_work_s']:.2f} s read+decode, {st['task_write_s']:.2f} s writing shards "
              f"(sum over tasks; wall {st['seconds']:.2f} s)")
        print(f"\nratio ray / baseline      : {base_s / best:.2f}x   (target >= 1.7x on 2 cores)")
        print(f"ratio ours-1p / baseline  : {base_s / one_s:.2f}x   (reduced-scale JPEG decode, same core count)")
        print(f"ratio ray / ours-1p       : {one_s / best:.2f}x   (parallel gain incl. Ray overhead and shard writes)")
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
