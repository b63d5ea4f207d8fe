"""How good is the semantic hash at finding near duplicates? Pairwise precision and recall on real photos.

A labelled set is built from the photos that ship with scikit-image: non-overlapping patches of each photo (flat
patches left out: they carry no content to tell apart) are the distinct originals; every original gets near-duplicate
variants of the kinds a scraped corpus holds (JPEG re-encoding at several qualities, resize round-trips, 1-4 px
crops and shifts, small brightness/contrast changes). A pair (i, j) is a true duplicate when both come from the same
original. Each method flags the pairs its grouping puts together; we report precision and recall of those pairs for:
an exact byte hash (sha256 of the pixels: the baseline every pipeline has), imagehash's pHash and dHash (exact match
and small Hamming radii), and our autoencoder code (paper section 4.1) at Hamming radius 0 and a few small radii.
Run: `.venv/bin/python benchmarks/dedup_quality.py` (about 15 s on 2 CPU cores).
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


def originals(grid: int = GRID) -> np.ndarray:
    """Distinct RES x RES originals: each skimage photo whole, plus a grid x grid tiling of its center square.

    Exact copies among the photos (skimage's `cat` is `chelsea`) and flat tiles are left out, so every pair of
    originals really is distinct content.
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
    return out[out.reshape(len(out), -1).std(axis=1) >= MIN_STD]


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


def variant(img: np.ndarray, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    kind = rng.choice(["jpeg", "resize", "crop", "shift", "tone"])
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


def labelled_set(variants: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, group label per image, variant kind per image): each original followed by its variants."""
    rng = np.random.default_rng(seed)
    base = originals()
    images, labels, kinds = [], [], []
    for i, img in enumerate(base):
        images.append(img), labels.append(i), kinds.append("original")
        for _ in range(variants):
            kind, v = variant(img, rng)
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


def groups_within(codes: np.ndarray, radius: int) -> np.ndarray:
    from preprocessing.semantic_hash import group_codes

    return group_codes(codes, radius=radius)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=None, help="autoencoder epochs (default: DedupConfig's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import imagehash
    from PIL import Image

    from preprocessing.config import DedupConfig
    from preprocessing.dedup_model import crops_of, encode, fit_local

    t0 = time.perf_counter()
    images, labels, kinds = labelled_set(args.variants, args.seed)
    n_orig = len(np.unique(labels))
    print(f"labelled set: {n_orig} distinct originals x (1 + {args.variants} variants) = {len(images)} images "
          f"({time.perf_counter() - t0:.1f}s)")

    rows = []

    t = time.perf_counter()
    sha = np.array([hashlib.sha256(im.tobytes()).hexdigest() for im in images])
    rows.append(("sha256 of pixels (exact)", pair_scores(sha, labels), time.perf_counter() - t))

    for name, fn in (("pHash", imagehash.phash), ("dHash", imagehash.dhash)):
        t = time.perf_counter()
        bits = np.stack([fn(Image.fromarray(im)).hash.reshape(-1) for im in images])
        codes = np.packbits(bits, axis=1)
        dt = time.perf_counter() - t
        for r in (0, 2, 4, 6):
            rows.append((f"{name} 64-bit, radius {r}", pair_scores(groups_within(codes, r), labels), dt))

    cfg = DedupConfig(seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
    t = time.perf_counter()
    crops = crops_of(images, cfg.crop)
    state, _ = fit_local(crops, cfg)
    codes = encode(state, crops, cfg)
    dt = time.perf_counter() - t
    for r in (0, 1, 2, 3, 4):
        rows.append((f"autoencoder {cfg.code_bits}-bit, radius {r}", pair_scores(groups_within(codes, r), labels), dt))

    print(f"\n{'method':<34}{'flagged':>9}{'TP':>8}{'precision':>11}{'recall':>9}{'FP/100':>8}{'time s':>8}")
    for name, s, dt in rows:
        fp100 = 100 * (1 - s["precision"])
        print(f"{name:<34}{s['flagged']:>9}{s['tp']:>8}{s['precision']:>11.4f}{s['recall']:>9.4f}{fp100:>8.2f}{dt:>8.1f}")
    base = next(s for n, s, _ in rows if n.startswith("sha256"))

    def best(prefix: str):
        ok = [(n, s) for n, s, _ in rows if n.startswith(prefix) and s["precision"] >= 0.99]
        return max(ok, key=lambda ns: ns[1]["recall"], default=(None, None))

    print(f"\nrecall at precision >= 0.99 ({base['true']} true pairs; exact sha256 recall {base['recall']:.3f}):")
    for prefix in ("autoencoder", "pHash", "dHash"):
        name, s = best(prefix)
        if s is None:
            print(f"  {prefix:<12} no setting reaches precision 0.99")
            continue
        print(f"  {name:<34} recall {s['recall']:.3f} ({s['recall'] / max(base['recall'], 1e-9):.1f}x exact hash), "
              f"{100 * (1 - s['precision']):.2f} false positives per 100 flagged pairs")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
