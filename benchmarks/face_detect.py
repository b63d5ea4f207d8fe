"""Face detection throughput per core: our detector path against naive full-resolution Haar detection.

Both sides decode the same encoded photos (scikit-image's and matplotlib's real photos, JPEG) and run OpenCV's
haarcascade_frontalface_default (scaleFactor 1.1, minNeighbors 5) on one thread (`cv2.setNumThreads(1)`, as in the
Ray workers), keeping faces of side >= min_face (64):
  naive   detectMultiScale on the full-resolution grey image with OpenCV's usual minSize (30), then drop boxes < 64
  ours    `preprocessing.faces.HaarDetector`: minSize = min_face and a grey copy downscaled so a 64-px face is 32 px
          (faces smaller than min_face are discarded anyway, so searching for them is wasted work)
The ratio is detection-stage photos/s of ours over naive on the same core (not a parallel speedup: the build adds
that on top, one task per core). It is measured at the photos' native size (300-600 px) and at 2x (600-1200 px,
closer to scraped web photos). Agreement = photos where both find the same number of faces >= 64 px, and the mean
IoU of matched boxes. Run: `.venv/bin/python benchmarks/face_detect.py` (under a minute).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from preprocessing.faces import HaarDetector, resolve_model  # noqa: E402
from preprocessing.images import decode  # noqa: E402

MIN_FACE = 64


def photos(scale: float) -> list[bytes]:
    from realdata import encode, grace_hopper_path, real_photos

    imgs = list(real_photos().values()) + [decode(grace_hopper_path().read_bytes(), 10**8)]
    out = []
    for img in imgs:
        if scale != 1:
            img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        out.append(encode(img, ".jpg", quality=90))
    return out


def naive(cascade: cv2.CascadeClassifier, data: bytes) -> list[tuple[int, ...]]:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    found = cascade.detectMultiScale(grey, 1.1, 5, minSize=(30, 30))
    return [tuple(int(v) for v in b) for b in found if min(b[2], b[3]) >= MIN_FACE]


def ours(det: HaarDetector, data: bytes) -> list[tuple[int, ...]]:
    return det.detect(decode(data, 10**9), MIN_FACE)


def iou(a, b) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / (a[2] * a[3] + b[2] * b[3] - ix * iy)


def timed(fn, items, min_s: float = 3.0) -> tuple[float, list]:
    results = [fn(x) for x in items]  # warm-up, and the answers
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < min_s:
        for x in items:
            fn(x)
        n += len(items)
    return n / (time.perf_counter() - t), results


def main() -> None:
    cv2.setNumThreads(1)
    path = resolve_model("haarcascade_frontalface_default.xml")
    cascade, det = cv2.CascadeClassifier(path), HaarDetector(path, 1.1, 5)
    for scale in (1.0, 2.0):
        items = photos(scale)
        rate_n, res_n = timed(lambda d: naive(cascade, d), items)
        rate_o, res_o = timed(lambda d: ours(det, d), items)
        agree = sum(len(a) == len(b) for a, b in zip(res_n, res_o))
        ious = [max(iou(x, y) for y in b) for a, b in zip(res_n, res_o) for x in a if b]
        faces = sum(len(a) for a in res_n)
        print(f"photos at {scale:g}x ({len(items)} photos, {faces} faces >= {MIN_FACE} px by naive):")
        print(f"  naive full-resolution Haar : {rate_n:6.1f} photos/s per core")
        print(f"  ours (minSize + downscale) : {rate_o:6.1f} photos/s per core")
        print(f"  ratio ours / naive         : {rate_o / rate_n:.2f}x; same face count on {agree}/{len(items)} photos, "
              f"mean IoU of matched boxes {np.mean(ious) if ious else float('nan'):.2f}")


if __name__ == "__main__":
    main()
