"""Face detection: recall against OpenCV's full-resolution detector, and speed per core against the naive loop.

All methods run OpenCV's haarcascade_frontalface_default (scaleFactor 1.1, minNeighbors 5) on one thread
(`cv2.setNumThreads(1)`, as in the Ray workers) and keep faces of side >= min_face (64):
  naive     detectMultiScale on the full-resolution grey photo with OpenCV's usual minSize 30, then drop faces < 64
            (the speed baseline)
  full      detectMultiScale at full resolution with minSize = min_face: the reference, `detect_stride: 1`
  ours      `preprocessing.faces.HaarDetector` as configured by default (`detect_stride: 2`)
  down S    a grey copy shrunk S times (`--shrinks`; 2, what build-faces did before, makes a 64-px face 32 px)
Recall = the share of the reference's boxes that a method's boxes match (IoU >= 0.5, one to one); `extra` = its boxes
that match none. Speed = photos per CPU-second of this process (decoding the JPEG included), as a ratio to naive in
the same run; CPU time, so other users of a shared machine do not count.
Sets: (a) the project's benchmark photos (scikit-image's photos and matplotlib's Grace Hopper, JPEG) at native size
(300-600 px) and 2x; (b) composites: real faces (Grace Hopper, the astronaut, scikit-image's lfw_subset upscaled)
pasted at four bands of sides onto real faceless photos of 640-1024 px (tests/realdata.face_composites, by seed).
Run: `.venv/bin/python benchmarks/face_detect.py` (about a minute of CPU).

Haar vs YuNet (`--detectors`, issue 23): `build.detector: haar` (as configured by default) against `build.detector:
yunet` (the model in ../shared/data/yunet/, which the project does not ship), YuNet with `yunet_face_px` 48 and 32
Haar searching a min_face face at 32 px instead of its 48 (haar@32, a shrink the build does not make), and YuNet run
in torch (`build.yunet_device`) on the CPU (yunet/cpu) and, where there is one, on a CUDA GPU (yunet/cuda: its
photos per CPU-second are then what detection costs a core),
each through `preprocessing.faces.find_faces` as the build runs it ('reduced': a JPEG decoded in libjpeg at 1/2, 1/4
or 1/8 scale where min_face allows) and decoded at full size ('full', the code before), at `--min-face` (64), on
the composites against the pasted faces' own boxes (ground truth): recall = pasted faces of side >= min_face matched
by a box (IoU >= 0.4: the detectors draw their boxes differently), false positives = boxes matching no pasted face,
per photo (the camera background's cameraman is a real face that is not in the ground truth, so a detector finding
him is charged for it), and photos per CPU-second on one thread, decoding the JPEG included, as a ratio to Haar
(full) in the same run.
Run: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/face_detect.py --detectors --composites 25 [--min-face 128]`.
`--crops --min-face 128`: the build's crops (full resolution) against crops from the reduced decode.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from preprocessing.config import BuildConfig  # noqa: E402
from preprocessing.faces import detector, resolve_model  # noqa: E402
from preprocessing.images import decode  # noqa: E402

MIN_FACE = 64
BANDS = ((64, 96), (96, 144), (144, 216), (216, 400))


def photo_sets(n: int, seed: int) -> dict[str, list[bytes]]:
    from realdata import encode, face_composites, grace_hopper_path, real_photos

    photos = list(real_photos().values()) + [decode(grace_hopper_path().read_bytes(), 10**8)]
    sets = {"benchmark photos, native": photos,
            "benchmark photos, 2x": [cv2.resize(p, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC) for p in photos]}
    for i, band in enumerate(BANDS):
        sets[f"composites, faces {band[0]}-{band[1]} px"] = face_composites(n, band, seed + i)
    return {name: [encode(p, ".jpg", quality=90) for p in imgs] for name, imgs in sets.items()}


def methods(shrinks: list[float]) -> dict:
    cascade = cv2.CascadeClassifier(resolve_model("haarcascade_frontalface_default.xml"))
    ours = detector(BuildConfig(kind="faces", min_face=MIN_FACE))

    def grey(data: bytes) -> np.ndarray:
        return cv2.cvtColor(decode(data, 10**9), cv2.COLOR_RGB2GRAY)

    def naive(data):
        found = cascade.detectMultiScale(grey(data), 1.1, 5, minSize=(30, 30))
        return [tuple(map(int, b)) for b in found if min(b[2], b[3]) >= MIN_FACE]

    def full(data):
        return [tuple(map(int, b)) for b in cascade.detectMultiScale(grey(data), 1.1, 5, minSize=(MIN_FACE,) * 2)]

    def down(s: float):
        def run(data):
            g = grey(data)
            g = cv2.resize(g, (round(g.shape[1] / s), round(g.shape[0] / s)), interpolation=cv2.INTER_AREA)
            found = cascade.detectMultiScale(g, 1.1, 5, minSize=(int(MIN_FACE / s),) * 2)
            boxes = [tuple(round(float(v) * s) for v in b) for b in found]
            return [b for b in boxes if min(b[2], b[3]) >= MIN_FACE]
        return run

    return {"naive": naive, "full": full, "ours": lambda data: ours.detect(decode(data, 10**9), MIN_FACE),
            **{f"down {s:g}": down(s) for s in shrinks}}


def iou(a, b) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / (a[2] * a[3] + b[2] * b[3] - ix * iy)


def matches(ref: list, got: list) -> int:
    """Reference boxes matched one to one (greedy, best IoU first) by boxes of `got` with IoU >= 0.5."""
    pairs = sorted(((iou(r, g), i, j) for i, r in enumerate(ref) for j, g in enumerate(got)), reverse=True)
    used_r, used_g = set(), set()
    for v, i, j in pairs:
        if v >= 0.5 and i not in used_r and j not in used_g:
            used_r.add(i), used_g.add(j)
    return len(used_r)


def run(fn, items: list[bytes]) -> tuple[float, list]:
    fn(items[0])  # warm-up
    t = time.process_time()
    answers = [fn(x) for x in items]
    return time.process_time() - t, answers


YUNET = ROOT.parent / "shared" / "data" / "yunet" / "face_detection_yunet_2026may.onnx"


def matches_at(ref: list, got: list, threshold: float) -> int:
    pairs = sorted(((iou(r, g), i, j) for i, r in enumerate(ref) for j, g in enumerate(got)), reverse=True)
    used_r, used_g = set(), set()
    for v, i, j in pairs:
        if v >= threshold and i not in used_r and j not in used_g:
            used_r.add(i), used_g.add(j)
    return len(used_r)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def detectors_table(n: int, seed: int, model: Path, min_face: int) -> None:
    """Haar vs YuNet on composites with known faces: recall, false positives per photo, speed per core; each as the
    build runs it (`faces.find_faces`: a JPEG decoded at reduced scale where min_face allows) and at full size."""
    from realdata import encode, face_composites

    from preprocessing.faces import HaarDetector, find_faces
    from preprocessing.images import Reject, check, jpeg_factor

    if not model.is_file():
        raise SystemExit(f"no YuNet model at {model} (see ../shared/data/yunet/README.md)")
    yunet = {"detector": "yunet", "detector_model": str(model)}
    haar32 = detector(BuildConfig(kind="faces"))
    haar32 = HaarDetector(haar32.path, haar32.scale_factor, haar32.min_neighbors, haar32.stride)
    haar32.face_px = 32  # a shrink the build does not make (48): what it would cost in recall
    cfgs = {"haar": BuildConfig(kind="faces", min_face=min_face),
            "haar@32": BuildConfig(kind="faces", min_face=min_face),
            "yunet": BuildConfig(kind="faces", min_face=min_face, **yunet),
            # the same model searching a min_face face at 48 / 32 px: faster, lossier on these faces
            **{f"yunet@{px}": BuildConfig(kind="faces", min_face=min_face, yunet_face_px=px, **yunet)
               for px in (48, 32)},
            # the same graph in torch (build.yunet_device): on the CPU, and on a GPU where there is one
            **{f"yunet/{dev}": BuildConfig(kind="faces", min_face=min_face, yunet_device=dev, **yunet)
               for dev in ("cpu", "cuda") if dev == "cpu" or cuda_available()}}
    if not cuda_available():
        print("(no CUDA GPU here: the row yunet/cuda, YuNet in torch on a GPU, is unmeasured)")
    photos, truth = [], []
    for i, band in enumerate(BANDS + ((64, 400),)):
        p, t = face_composites(n, band, seed + 100 + i, boxes=True)
        photos += [encode(x, ".jpg", quality=90) for x in p]
        truth += [[b for b in bs if min(b[2:]) >= min_face] for bs in t]
    faces = sum(map(len, truth))
    print(f"Haar vs YuNet, min_face {min_face}, {len(photos)} composites (JPEG), {faces} pasted faces of side >= "
          f"{min_face} (IoU >= 0.4), one thread. 'reduced' = as the build runs it, 'full' = decoded at full size.")
    head = (f"{'detector':10s} {'decode':8s} {'scale':>5s} {'recall':>6s} {'FP/photo':>8s} {'photos/CPU-s':>12s} "
            f"{'vs haar full':>12s}")
    print(head + "\n" + "-" * len(head))
    base = None
    for name, cfg in cfgs.items():
        for reduce in (False, True):
            det = haar32 if name == "haar@32" else None

            def one(data, cfg=cfg, reduce=reduce, det=det):
                try:
                    return find_faces(data, cfg, reduce, det)[0]
                except Reject:
                    return []
            face_px = (det or detector(cfg)).face_px
            scale = jpeg_factor(check(photos[0], 10**9), min_face / face_px) if reduce else 1
            if name == "haar@32" and not reduce:
                continue  # the haar row
            if reduce and scale == 1:
                print(f"{name:10s} reduced: decoded at full size at this min_face (the row above)")
                continue
            secs, got = run(one, photos)
            hits = sum(matches_at(t, g, 0.4) for t, g in zip(truth, got))
            fp = sum(map(len, got)) - hits
            rate = len(photos) / secs
            base = base or rate
            print(f"{name:10s} {'reduced' if reduce else 'full':8s} {'1/' + str(scale):>5s} "
                  f"{hits / faces:6.3f} {fp / len(photos):8.2f} {rate:12.1f} {rate / base:11.2f}x", flush=True)


def crops_table(n: int, seed: int, min_face: int) -> None:
    """The build's crops (from the full-resolution photo) against crops from the reduced decode the faces were found
    in: grey levels apart, and the CPU a second, full decode costs against the whole face_rows."""
    from realdata import encode, face_composites

    from preprocessing.faces import crop_square, face_rows, find_faces
    from preprocessing.images import Reject

    photos = [encode(p, ".jpg", quality=90) for p in face_composites(n, (min_face, 400), seed + 100)]
    print(f"Crops from the reduced decode vs the full-resolution photo: {len(photos)} composites, faces "
          f"{min_face}-400 px, min_face {min_face}, Haar, 64 x 64 crops.")
    for margin in (0.0, 0.25):
        cfg = BuildConfig(kind="faces", min_face=min_face, margin=margin)
        diffs, rows_s, decode_s, found = [], 0.0, 0.0, 0
        for data in photos:
            t = time.process_time()
            try:
                rows = face_rows("k", "s", data, cfg)
            except Reject:
                continue
            rows_s += time.process_time() - t
            t = time.process_time()
            decode(data, 10**9)
            decode_s += time.process_time() - t
            _, small, f = find_faces(data, cfg)
            found += 1
            diffs += [np.abs(r[1].astype(int) - crop_square(small, tuple(v / f for v in r[3]), margin, 64)).mean()
                      for r in rows]
        print(f"margin {margin}: {len(diffs)} crops from {found} photos (scale 1/{f}): mean {np.mean(diffs):.2f}, "
              f"max {np.max(diffs):.2f} grey levels apart; the full decode {1000 * decode_s / found:.1f} ms of "
              f"{1000 * rows_s / found:.1f} ms per photo with a face ({decode_s / rows_s:.0%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--composites", type=int, default=10, help="composite photos per band (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shrinks", type=float, nargs="*", default=[2.0], help="shrink factors to compare (default 2)")
    ap.add_argument("--detectors", action="store_true", help="only the Haar vs YuNet table")
    ap.add_argument("--yunet-model", type=Path, default=YUNET, help=f"YuNet ONNX file (default {YUNET})")
    ap.add_argument("--min-face", type=int, default=MIN_FACE, help="--detectors: build.min_face (default 64)")
    ap.add_argument("--crops", action="store_true", help="only the crop comparison (use --min-face 128)")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    if args.crops:
        crops_table(args.composites, args.seed, args.min_face)
        return
    if args.detectors:
        detectors_table(args.composites, args.seed, args.yunet_model, args.min_face)
        return
    fns = methods(args.shrinks)
    compared = [m for m in fns if m not in ("naive", "full")]
    rows = {}  # set name -> {"photos", "faces", "secs": {method: s}, "hits": {method: (matched, extra)}}
    for name, items in photo_sets(args.composites, args.seed).items():
        secs, answers = {}, {}
        for m, fn in fns.items():
            secs[m], answers[m] = run(fn, items)
        hits = {}
        for m in compared:
            hit = sum(matches(r, g) for r, g in zip(answers["full"], answers[m]))
            hits[m] = (hit, sum(map(len, answers[m])) - hit)
        rows[name] = {"photos": len(items), "faces": sum(map(len, answers["full"])), "secs": secs, "hits": hits}
    per_set = dict(rows)
    for group in ("benchmark photos", "composites", ""):  # overall rows
        part = [r for n, r in per_set.items() if n.startswith(group)]
        rows[f"{group or 'everything'}: overall"] = {
            "photos": sum(r["photos"] for r in part), "faces": sum(r["faces"] for r in part),
            "secs": {m: sum(r["secs"][m] for r in part) for m in fns},
            "hits": {m: tuple(sum(r["hits"][m][i] for r in part) for i in (0, 1)) for m in compared}}
    print(f"min_face {MIN_FACE}. Recall against the full-resolution detector (extra boxes), then speed against naive.")
    head = f"{'set':36s} {'photos':>6s} {'faces':>5s} | " + " ".join(f"{m:>13s}" for m in compared)
    print(head + "\n" + "-" * len(head))
    for name, r in rows.items():
        rec = " ".join(f"{r['hits'][m][0] / max(r['faces'], 1):6.3f} ({r['hits'][m][1]:+3d})" for m in compared)
        print(f"{name:36s} {r['photos']:6d} {r['faces']:5d} | {rec}")
    head = f"{'set':36s} | " + " ".join(f"{m:>8s}" for m in ["full"] + compared)
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in rows.items():
        print(f"{name:36s} | " + " ".join(f"{r['secs']['naive'] / r['secs'][m]:7.2f}x" for m in ["full"] + compared))


if __name__ == "__main__":
    main()
