"""How good is the semantic hash at finding near duplicates? Pairwise precision and recall on real photos.

A labelled set is built from the photos that ship with scikit-image: non-overlapping patches of each photo (flat
patches left out: they carry no content to tell apart) are the distinct originals; every original gets near-duplicate
variants. Two sets: "mixed" (JPEG re-encoding at several qualities, resize round-trips, 1-4 px crops and shifts, small
brightness/contrast changes) and "shift/crop" (only 1-4 px shifts and 1-4 px crops per edge, scaled back). A pair
(i, j) is a true duplicate when both come from the same original. Each method flags the pairs its grouping puts
together; we report precision, recall and false positives per 100 flagged pairs for: an exact byte hash (sha256 of the
pixels), imagehash's pHash and dHash (Hamming radii 0-10), the paper's plain autoencoder (`whiten: 0, balance: 0,
decorrelate: 0, views: 1`, paper section 4.1), our default model with the paper's single center-crop hash (`views: 1`)
and our default (multi-view, `preprocessing.dedup.views`). Each autoencoder is trained on the set it de-duplicates,
as `dcgan dedup` does. The summary compares every autoencoder with pHash at the SAME false-positive rate: pHash's
radius is the one with the highest recall whose false positives per 100 are <= the autoencoder's. The rows for views
25 and 81 group a prefix of the default's codes (exactly what `views: 25` / `81` hash); their time is pro rata.
Run: `.venv/bin/python benchmarks/dedup_quality.py` (about 2 min on 2 CPU cores; `--originals 120` for a quicker run).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

RES = 64          # the training resolution the dataset stores
GRID = 5          # each photo gives GRID x GRID tiles
MIN_STD = 12.0    # flat patches (sky, background) are not distinct content
MAX_CORR = 0.9    # nor are two patches whose standardised 32x32 crops correlate above this (sky gradients)


def originals(grid: int = GRID, max_corr: float = MAX_CORR) -> np.ndarray:
    """Distinct RES x RES originals: each skimage photo whole, plus a grid x grid tiling of its center square.

    Exact copies among the photos (skimage's `cat` is `chelsea`), flat tiles and near copies of an earlier original
    (`distinct`) are left out, so every pair of originals really is distinct content.
    """
    from realdata import real_photos

    out, seen = [], set()
    for img in real_photos().values():
        h, w = img.shape[:2]
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        square = img[y0:y0 + side, x0:x0 + side]
        if hashlib.sha256(square.tobytes()).digest() in seen:
            continue
        seen.add(hashlib.sha256(square.tobytes()).digest())
        out.append(cv2.resize(square, (RES, RES), interpolation=cv2.INTER_AREA))
        t = side // grid
        for y in range(grid):
            for x in range(grid):
                tile = square[y * t:(y + 1) * t, x * t:(x + 1) * t]
                out.append(cv2.resize(tile, (RES, RES), interpolation=cv2.INTER_AREA))
    out = np.stack(out)
    return distinct(out[out.reshape(len(out), -1).std(axis=1) >= MIN_STD], max_corr)


def distinct(images: np.ndarray, max_corr: float = MAX_CORR) -> np.ndarray:
    """Leave out originals that are near copies of an earlier one: the correlation of their standardised 32x32
    crops above `max_corr` (sky gradients, plain walls: such tiles are not distinct content for any method)."""
    x = images.reshape(len(images), 32, RES // 32, 32, RES // 32, 3).mean(axis=(2, 4)).reshape(len(images), -1)
    x = x - x.mean(axis=1, keepdims=True)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)
    corr = x @ x.T
    kept: list[int] = []
    for i in range(len(images)):
        if not kept or corr[i, kept].max() <= max_corr:
            kept.append(i)
    return images[kept]


def _jpeg(img: np.ndarray, q: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]


def _resize_trip(img: np.ndarray, side: int) -> np.ndarray:
    small = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (RES, RES), interpolation=cv2.INTER_LINEAR)


def _crop(img: np.ndarray, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """Cut px off the edges and scale back: what a re-crop of the same photo gives."""
    cut = img[top:RES - bottom, left:RES - right]
    return cv2.resize(cut, (RES, RES), interpolation=cv2.INTER_AREA)


def _shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    return cv2.warpAffine(img, np.float32([[1, 0, dx], [0, 1, dy]]), (RES, RES), borderMode=cv2.BORDER_REFLECT)


def _tone(img: np.ndarray, gain: float, bias: float) -> np.ndarray:
    return np.clip(img.astype(np.float32) * gain + bias, 0, 255).round().astype(np.uint8)


KINDS = ("jpeg", "resize", "crop", "shift", "tone")
SHIFT_CROP = ("crop", "shift")


def variant(img: np.ndarray, rng: np.random.Generator, kinds: tuple[str, ...] = KINDS) -> tuple[str, np.ndarray]:
    kind = rng.choice(list(kinds))
    if kind == "jpeg":
        q = int(rng.choice([95, 85, 75, 60, 50]))
        return f"jpeg{q}", _jpeg(img, q)
    if kind == "resize":
        side = int(rng.choice([48, 56, 80, 96, 128]))
        return f"resize{side}", _resize_trip(img, side)
    if kind == "crop":
        t, l, b, r = (int(v) for v in rng.integers(0, 5, size=4))
        if t + l + b + r == 0:
            l = 1
        return f"crop{t}{l}{b}{r}", _crop(img, t, l, b, r)
    if kind == "shift":
        dy, dx = (int(v) for v in rng.integers(-4, 5, size=2))
        dx = dx or 1
        return f"shift{dy},{dx}", _shift(img, dy, dx)
    gain, bias = float(rng.uniform(0.9, 1.1)), float(rng.uniform(-10, 10))
    return "tone", _tone(img, gain, bias)


def labelled_set(variants: int = 4, seed: int = 0, kinds_of: tuple[str, ...] = KINDS, limit: int | None = None,
                 max_corr: float = MAX_CORR) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, group label per image, variant kind per image): each original followed by its variants."""
    rng = np.random.default_rng(seed)
    base = originals(max_corr=max_corr)
    if limit:
        base = base[np.sort(np.random.default_rng(seed).permutation(len(base))[:limit])]
    images, labels, kinds = [], [], []
    for i, img in enumerate(base):
        images.append(img), labels.append(i), kinds.append("original")
        for _ in range(variants):
            kind, v = variant(img, rng, kinds_of)
            images.append(v), labels.append(i), kinds.append(kind)
    return np.stack(images), np.asarray(labels), kinds


# ------------------------------------------------------------------------------------------------------ scoring


def pair_scores(groups: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pairwise precision/recall of a grouping (group id per image) against the true labels, in O(N) via counts."""
    def pairs(counts: np.ndarray) -> int:
        return int((counts * (counts - 1) // 2).sum())

    _, g = np.unique(groups, return_inverse=True)
    _, t = np.unique(labels, return_inverse=True)
    joint = g.astype(np.int64) * (t.max() + 1) + t
    flagged = pairs(np.bincount(g))
    true = pairs(np.bincount(t))
    hit = pairs(np.unique(joint, return_counts=True)[1])
    return {"flagged": flagged, "true": true, "tp": hit,
            "precision": hit / flagged if flagged else 1.0, "recall": hit / true if true else 1.0}


def fp100(s: dict) -> float:
    return 100 * (1 - s["precision"])


def autoencoders(seed: int, epochs: int | None) -> list[tuple[str, object]]:
    from preprocessing.config import DedupConfig

    extra = {"seed": seed, **({"epochs": epochs} if epochs else {})}
    default = DedupConfig(**extra)
    return [("AE paper plain (whiten/balance/decorrelate 0, views 1)",
             DedupConfig(whiten=0, balance=0, decorrelate=0, views=1, **extra)),
            ("AE ours, views 1 (paper's single hash)", DedupConfig(views=1, **extra)),
            (f"AE ours, views {default.views} (default)", default)]


def evaluate(images: np.ndarray, labels: np.ndarray, seed: int, epochs: int | None) -> list[tuple[str, dict, float]]:
    """Every method's (name, pair scores, seconds) on one labelled set."""
    import imagehash
    from PIL import Image

    from preprocessing.dedup.model import fit_local
    from preprocessing.dedup.views import crops_of, image_codes
    from preprocessing.dedup.semantic_hash import group_codes, group_views

    from preprocessing.dedup.groups import group_ids, verified_groups
    from preprocessing.dedup.views import view_sources

    keys = np.array([f"i{i:05d}" for i in range(len(images))])
    sources = view_sources(images, 32)

    def grouped(codes: np.ndarray, radius: int = 0) -> np.ndarray:
        """As `dcgan dedup` groups: several views at radius 0 are verified on pixels (`verify`)."""
        if codes.shape[1] > 1 and radius == 0:
            return group_ids(keys, verified_groups(keys, codes, sources)[0])
        return group_views(codes, radius)

    rows = []
    t = time.perf_counter()
    sha = np.array([hashlib.sha256(im.tobytes()).hexdigest() for im in images])
    rows.append(("sha256 of pixels (exact)", pair_scores(sha, labels), time.perf_counter() - t))
    for name, fn in (("pHash", imagehash.phash), ("dHash", imagehash.dhash)):
        t = time.perf_counter()
        codes = np.packbits(np.stack([fn(Image.fromarray(im)).hash.reshape(-1) for im in images]), axis=1)
        dt = time.perf_counter() - t
        for r in range(0, 11, 2 if name == "dHash" else 1):
            rows.append((f"{name} 64-bit, radius {r}", pair_scores(group_codes(codes, r), labels), dt))
    trained = {}
    for name, cfg in autoencoders(seed, epochs):
        model_key = (cfg.whiten, cfg.balance, cfg.decorrelate)
        crops = crops_of(images, cfg.crop)
        if model_key not in trained:
            t = time.perf_counter()
            trained[model_key] = fit_local(crops, cfg)[0], time.perf_counter() - t
        state, fit_s = trained[model_key]
        t = time.perf_counter()
        codes = image_codes(state, images, cfg)
        enc_s = time.perf_counter() - t
        radii = (0, 1, 2) if cfg.views == 1 and cfg.whiten else (0,)
        for r in radii:
            rows.append((f"{name}{f', radius {r}' if r else ''}", pair_scores(grouped(codes, r), labels),
                         enc_s))
        if cfg.views > 1:  # what the default did before issue 19: any shared code, chained
            rows.append((f"AE ours, views {cfg.views}, any shared code (unverified)",
                         pair_scores(group_views(codes), labels), enc_s))
        for v in (25, 81) if cfg.views > 81 else ():  # `views: v` hashes the first v views: a prefix of these codes
            rows.append((f"AE ours, views {v} (shifts up to {'2' if v == 25 else '4'} px)",
                         pair_scores(grouped(codes[:, :v]), labels), enc_s * v / cfg.views))
        print(f"  {name}: trained in {fit_s:.1f}s, encoded {len(images)} images x {cfg.views} views in {enc_s:.2f}s")
    return rows


def report(title: str, rows: list[tuple[str, dict, float]]) -> None:
    base = next(s for n, s, _ in rows if n.startswith("sha256"))
    print(f"\n== {title}: {base['true']} true pairs\n")
    print(f"{'method':<62}{'flagged':>9}{'TP':>8}{'precision':>11}{'recall':>9}{'FP/100':>8}{'enc s':>8}")
    for name, s, dt in rows:
        print(f"{name:<62}{s['flagged']:>9}{s['tp']:>8}{s['precision']:>11.4f}{s['recall']:>9.4f}{fp100(s):>8.2f}"
              f"{dt:>8.2f}")
    phash = [(n, s) for n, s, _ in rows if n.startswith("pHash")]
    single = next(dt for n, s, dt in rows if n.startswith("AE ours, views 1"))
    print(f"\n{title}: each autoencoder at radius 0 vs pHash at the same false-positive rate (<= ours):")
    for name, s, dt in rows:
        if not name.startswith("AE") or "radius" in name or "unverified" in name:
            continue
        ok = [(n, p) for n, p in phash if fp100(p) <= fp100(s) + 1e-9]
        pn, p = max(ok, key=lambda np_: (np_[1]["recall"], -fp100(np_[1])), default=(None, None))
        ratio = s["recall"] / max(p["recall"], 1e-9) if p else 0.0
        vs = (f"{pn}: recall {p['recall']:.3f} at {fp100(p):.2f} FP/100 -> ratio {ratio:.2f}x"
              if p else "no pHash radius is that precise")
        print(f"  {name:<58} recall {s['recall']:.3f} at {fp100(s):.2f} FP/100, encode {dt / single:.0f}x the single "
              f"hash | {vs}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--originals", type=int, default=None, help="use this many originals (a quicker subset)")
    ap.add_argument("--epochs", type=int, default=None, help="autoencoder epochs (default: DedupConfig's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sets", default="mixed,shift-crop")
    ap.add_argument("--max-corr", type=float, default=MAX_CORR,
                    help="leave out originals this correlated with an earlier one (1 keeps the near copies)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    for title in args.sets.split(","):
        kinds = SHIFT_CROP if title == "shift-crop" else KINDS
        images, labels, _ = labelled_set(args.variants, args.seed, kinds, args.originals, args.max_corr)
        print(f"{title}: {len(np.unique(labels))} distinct originals x (1 + {args.variants} variants: "
              f"{', '.join(kinds)}) = {len(images)} images")
        report(title, evaluate(images, labels, args.seed, args.epochs))
    print(f"\ntotal {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
