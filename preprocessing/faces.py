"""Face boxes in photos (paper section 4.2: "an OpenCV face detector, keeping sufficiently high resolution detections").

The default is OpenCV's Haar frontal-face cascade (`build.detector: haar`; any cascade XML through `build.cascade`);
`build.detector: yunet` runs OpenCV's YuNet CNN (`cv2.FaceDetectorYN`) from the ONNX file `build.detector_model`
names (a local path or s3://, which the user supplies), or, with `build.yunet_device: cuda`, the same graph in torch
on the GPU Ray gives the build task (`onnx_torch`, `YuNetDetector`). Both keep faces of side >= min_face and crop
them with the same margin rule, in the same Ray tasks. A JPEG is searched on a libjpeg decode at 1/2, 1/4 or 1/8
scale when a min_face face still spans the detector's `face_px` there (`find_faces`); at the default min_face 64
neither shrinks.

For a cascade, the faces are those of OpenCV's `detectMultiScale(grey, scale_factor, min_neighbors, minSize=min_face)`
on the photo at full resolution, and `detect_stride: 1` runs exactly that. It slides the window over every position of
each pyramid level from factor 2 up (every other position below) and groups the windows that pass the cascade.
`detect_stride: 2`, the default, rebuilds the same level images bit for bit, visits every other row and column of them
first, then every position around each window that passed, and groups as OpenCV does: the same boxes, 1.6-2.6x
faster; a face is lost only when none of its windows lies on the sparse grid (under 0.5% of them, see
benchmarks/RESULTS.md). What this module did before, a search on a copy shrunk so that a min_face face is 32 px, lost
1-6%: resampling flips OpenCV's borderline faces, and a shrunk copy is faster only through OpenCV's coarser stride
below factor 2.

Layer: preprocessing.
"""

from __future__ import annotations

from preprocessing.errors import InputError, MissingError

import functools
import math
import os
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from preprocessing.config import BuildConfig

HAAR_FACE_PX = 48  # Haar: a min_face face is searched at this side at the least (2 x the 24-px window: the reduced
# photo's pyramid starts at factor 2, where OpenCV visits every position; at 32 px, a 64-px face in a 2x reduced photo,
# it lost faces the full-resolution search finds: benchmarks/RESULTS.md)
DETECT_FACE_PX = 64  # YuNet: a min_face face is searched for at this size (photo shrunk to it, never enlarged); 32
# is ~3x faster but misses more small faces (benchmarks/face_detect.py --detectors); `build.yunet_face_px`
REACH = 0.5  # the dense pass covers window origins within REACH x side of a first-pass hit ...
SIZE_RANGE = 1.5  # ... and window sides within this ratio (OpenCV groups windows of sides within 1.4x)
SYNC = 8  # level pixels scanned left of a dense crop: OpenCV skips the position after a first-stage rejection, and
# a scan started a little to the left falls into step with its scan from the row's start before the crop begins

Box = tuple[int, int, int, int]  # x, y, w, h in source pixels


class Detector(Protocol):
    face_px: int  # a min_face face may be shrunk to this side before detection (JPEGs decode that small: face_rows)

    def detect(self, rgb: np.ndarray, min_face: int) -> list[Box]:
        """Faces with side >= min_face in an RGB image, in source pixels."""


def _to_source(boxes, scale: float, min_face: int) -> list[Box]:
    out = []
    for x, y, w, h in boxes:
        b = tuple(int(round(v * scale)) for v in (x, y, w, h))
        if min(b[2], b[3]) >= min_face:
            out.append(b)
    return sorted(out, key=lambda b: (b[1], b[0], b[2], b[3]))  # a stable order: box index is part of the row key


def _pyramid(shape: tuple[int, int], window: tuple[int, int], scale_factor: float, min_face: int) -> list[np.float32]:
    """The scale factors detectMultiScale visits (OpenCV 4 cascadedetect.cpp: double product, stored as float)."""
    h, w = shape
    out, factor = [], 1.0
    while True:
        side = (round(window[0] * factor), round(window[1] * factor))
        if side[0] > w or side[1] > h:
            return out
        if min(side) >= min_face:
            out.append(np.float32(factor))
        factor *= scale_factor


def _level(grey: np.ndarray, f: np.float32) -> np.ndarray:
    """OpenCV's image for one pyramid level, bit for bit."""
    h, w = grey.shape
    size = (int(np.rint(np.float32(w) / f)), int(np.rint(np.float32(h) / f)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_LINEAR_EXACT)


@dataclass
class HaarDetector:
    """cv2.CascadeClassifier with the usual knobs; `stride` 2 is the two-pass search of the module docstring."""

    path: str
    scale_factor: float = 1.1
    min_neighbors: int = 5
    stride: int = 2

    def __post_init__(self):
        try:
            self._cascade = cv2.CascadeClassifier(self.path)
        except (cv2.error, SystemError) as err:  # OpenCV raises while parsing a malformed XML
            raise InputError(f"cascade: {self.path} is not a loadable OpenCV cascade XML ({err})") from None
        if self._cascade.empty():
            raise InputError(f"cascade: {self.path} is not a loadable OpenCV cascade XML")
        self._window = tuple(int(v) for v in self._cascade.getOriginalWindowSize())
        # exact where the two passes cannot be: old-format XML (another OpenCV code path), no grouping (every window)
        self._two_pass = self.stride == 2 and self.min_neighbors > 0 and not self._cascade.isOldFormatCascade()
        # detect_stride 1 is the full-resolution reference: never searched on a reduced decode
        self.face_px = max(HAAR_FACE_PX, 2 * max(self._window)) if self.stride == 2 else 1 << 30

    def detect(self, rgb: np.ndarray, min_face: int) -> list[Box]:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if self._two_pass:
            found = self._detect_two_pass(grey, min_face)
        else:
            found = self._cascade.detectMultiScale(grey, self.scale_factor, self.min_neighbors,
                                                   minSize=(min_face, min_face))
        return _to_source(found if len(found) else [], 1.0, min_face)

    def _scan(self, img: np.ndarray, every: bool) -> list[tuple[int, int]]:
        """Positions (x, y) of the windows that pass the whole cascade in one level image, without grouping.

        OpenCV visits every position at pyramid factors >= 2 and every other row and column below (and, everywhere,
        skips the position after a first-stage rejection). every=False: `img` searched at factor 1 only. every=True:
        `img` doubled by pixel repetition and searched at factor 2 only, whose level image is `img` again.
        """
        k = 2 if every else 1
        if every:
            img = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)
        win = (k * self._window[0], k * self._window[1])
        found = self._cascade.detectMultiScale(img, 2.0, 0, minSize=win, maxSize=win)
        return [(int(x) // k, int(y) // k) for x, y, _, _ in found] if len(found) else []

    def _window_box(self, f: np.float32, x: int, y: int) -> Box:
        """A level position as OpenCV reports it in source pixels (float arithmetic, rounded)."""
        ww, wh = self._window
        return tuple(int(np.rint(np.float32(v) * f)) for v in (x, y, ww, wh))

    def _detect_two_pass(self, grey: np.ndarray, min_face: int) -> list[Box]:
        """detectMultiScale's boxes, from every other window of its pyramid and every window near those that pass."""
        ww, wh = self._window
        levels = {f: _level(grey, f) for f in _pyramid(grey.shape, self._window, self.scale_factor, min_face)}
        windows, hits = set(), []
        for f, img in levels.items():
            passed = [self._window_box(f, x, y) for x, y in self._scan(img, every=False)]
            if f < 2:  # OpenCV's own stride is 2 below factor 2: these are its windows already
                windows.update(passed)
            else:
                hits += passed
        for f, img in levels.items():
            if f < 2 or not hits or img.shape[0] < wh or img.shape[1] < ww:
                continue
            near = np.zeros((img.shape[0] - wh + 1, img.shape[1] - ww + 1), np.uint8)  # window origins to visit
            for x, y, w, h in hits:
                if w / SIZE_RANGE <= ww * f <= w * SIZE_RANGE:
                    x0, x1 = max(0, math.floor((x - REACH * w) / f)), math.ceil((x + REACH * w) / f)
                    y0, y1 = max(0, math.floor((y - REACH * h) / f)), math.ceil((y + REACH * h) / f)
                    near[y0 : y1 + 1, x0 : x1 + 1] = 1
            n, _, stats, _ = cv2.connectedComponentsWithStats(near, connectivity=8)
            for x0, y0, w, h, _ in stats[1:n]:
                left = max(0, x0 - SYNC)
                crop = img[y0 : y0 + h - 1 + wh, left : x0 + w - 1 + ww]
                windows.update(self._window_box(f, left + x, y0 + y) for x, y in self._scan(crop, every=True)
                               if left + x >= x0)
        if not windows:
            return []
        grouped, _ = cv2.groupRectangles(list(windows), self.min_neighbors, 0.2)  # as detectMultiScale groups
        return [tuple(int(v) for v in b) for b in grouped]


@dataclass
class YuNetDetector:
    """cv2.FaceDetectorYN (the YuNet ONNX model, which the user supplies); boxes are made square around the face.

    The model is read through `preprocessing.storage` (a local path or s3://) and loaded from memory: no temp file.
    `device` "opencv" runs it in OpenCV's DNN (CPU); a torch device ("cuda": the GPU Ray gave the task, or "cpu")
    runs the same graph in torch (`onnx_torch`) with FaceDetectorYN's own input padding, decoding and NMS
    (`_yunet_faces`): the same faces (tests/test_faces.py compares them on the CPU), on a GPU where the task has one."""

    path: str
    score_threshold: float = 0.8
    face_px: int = DETECT_FACE_PX
    device: str = "opencv"

    def __post_init__(self):
        from preprocessing import storage

        try:
            data = storage.read_bytes(self.path)
        except storage.StorageUnreachable:
            raise  # the store, not the model, is failing: transient
        except storage.StorageError as err:
            raise MissingError(f"build.detector_model: {err}") from None
        if self.device != "opencv":
            self._graph = _torch_graph(self.path, data, self.device)
            return
        try:
            self._net = cv2.FaceDetectorYN.create("onnx", np.frombuffer(data, np.uint8), np.zeros(0, np.uint8),
                                                  (320, 320), self.score_threshold)
        except cv2.error as err:
            first = str(err).strip().splitlines()[-1][:200]
            raise InputError(f"build.detector_model: {self.path} is not a loadable YuNet ONNX model "
                             f"({first})") from None

    def faces(self, bgr: np.ndarray) -> np.ndarray:
        """FaceDetectorYN's rows (N, 15): box x, y, w, h, five landmarks, score; best first."""
        if self.device != "opencv":
            return _yunet_faces(self._graph, bgr, self.score_threshold)
        self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self._net.detect(bgr)
        return np.zeros((0, 15), np.float32) if faces is None else faces

    def detect(self, rgb: np.ndarray, min_face: int) -> list[Box]:
        scale = max(1.0, min_face / self.face_px)
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if scale > 1.0:
            h, w = bgr.shape[:2]
            bgr = cv2.resize(bgr, (max(1, round(w / scale)), max(1, round(h / scale))), interpolation=cv2.INTER_AREA)
        boxes = []
        for f in self.faces(bgr):
            x, y, w, h = f[:4]
            side = max(w, h)
            boxes.append((x + (w - side) / 2, y + (h - side) / 2, side, side))
        return _to_source(boxes, scale, min_face)


YUNET_STRIDES = (8, 16, 32)  # FaceDetectorYN's heads: cls_8 ... kps_32, one row per cell of each stride's grid
YUNET_NMS, YUNET_TOP_K = 0.3, 5000  # FaceDetectorYN's defaults (nms_threshold, top_k)


def _torch_graph(path: str, data: bytes, device: str):
    """The YuNet graph on `device`, or a one-line error naming the setting."""
    import torch

    from preprocessing.onnx_torch import OnnxError, OnnxGraph

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"build.yunet_device: {device}, but this process sees no CUDA GPU (torch "
                         f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
                         f"give the build's tasks a GPU (build.yunet_gpus) or use yunet_device: opencv")
    try:
        graph = OnnxGraph(data)
    except OnnxError as err:
        raise InputError(f"build.detector_model: {path}: {err}") from None
    missing = [f"{k}_{s}" for k in ("cls", "obj", "bbox", "kps") for s in YUNET_STRIDES
               if f"{k}_{s}" not in graph.outputs]
    if missing:
        raise InputError(f"build.detector_model: {path}: not a YuNet model (no output {missing[0]})")
    graph.to(device)
    try:  # weights of the wrong shapes fail here, once, not on every photo
        with torch.no_grad():
            graph.run(torch.zeros((1, 3, 64, 64), device=device))
    except (RuntimeError, ValueError, IndexError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise InputError(f"build.detector_model: {path}: the torch runner cannot run it ({type(err).__name__}: "
                         f"{first})") from None
    return graph


def _yunet_faces(graph, bgr: np.ndarray, score_threshold: float) -> np.ndarray:
    """FaceDetectorYN.detect in torch: the BGR photo zero-padded right and bottom to a multiple of 32, the graph run
    on it, each stride's cells decoded (score sqrt(cls x obj), clamped; box centre (cell + offset) x stride, side
    exp(d) x stride; landmarks likewise), the cells at or above the threshold kept and cv2.dnn.NMSBoxes on their
    boxes truncated to integers, as OpenCV's C++ does."""
    import torch

    h, w = bgr.shape[:2]
    ph, pw = (h - 1) // 32 * 32 + 32, (w - 1) // 32 * 32 + 32
    device = graph.device
    x = torch.zeros((1, 3, ph, pw), dtype=torch.float32, device=device).contiguous(memory_format=torch.channels_last)
    x[0, :, :h, :w] = torch.from_numpy(np.ascontiguousarray(bgr)).to(device).permute(2, 0, 1)
    # fp32 convolutions on a GPU too (cuDNN may use TF32 on Ampere and later): the faces of the CPU's run
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out = graph.run(x)
        rows = []
        for s in YUNET_STRIDES:
            cols = pw // s
            score = torch.sqrt(out[f"cls_{s}"].reshape(-1).clamp(0, 1) * out[f"obj_{s}"].reshape(-1).clamp(0, 1))
            idx = torch.nonzero(score >= score_threshold).reshape(-1)
            if not len(idx):
                continue
            cell = torch.stack([idx % cols, idx // cols], 1).float()                 # (c, r)
            bbox, kps = out[f"bbox_{s}"].reshape(-1, 4)[idx], out[f"kps_{s}"].reshape(-1, 10)[idx]
            centre = (cell + bbox[:, :2]) * s
            size = torch.exp(bbox[:, 2:]) * s
            marks = ((kps.reshape(-1, 5, 2) + cell[:, None]) * s).reshape(-1, 10)
            rows.append(torch.cat([centre - size / 2, size, marks, score[idx, None]], 1))
    if not rows:
        return np.zeros((0, 15), np.float32)
    faces = torch.cat(rows).cpu().numpy()
    if len(faces) == 1:
        return faces
    keep = cv2.dnn.NMSBoxes(faces[:, :4].astype(np.int32).tolist(), faces[:, 14].tolist(), score_threshold,
                            YUNET_NMS, top_k=YUNET_TOP_K)
    return faces[np.asarray(keep, np.intp).reshape(-1)]


def resolve_model(name: str) -> str:
    """A cascade name under cv2.data.haarcascades, or a path to a cascade XML / ONNX model."""
    if os.path.isfile(name):
        return name
    bundled = os.path.join(cv2.data.haarcascades, name)
    if os.path.isfile(bundled):
        return bundled
    raise MissingError(f"cascade: {name!r} is neither a file nor a cascade under {cv2.data.haarcascades}")


@functools.lru_cache(maxsize=4)
def _cached(name: str, scale_factor: float, min_neighbors: int, stride: int) -> Detector:
    path = resolve_model(name)  # here, not per photo: a missing model still raises (errors are not cached)
    if path.lower().endswith(".onnx"):
        return YuNetDetector(path)
    return HaarDetector(path, scale_factor, min_neighbors, stride)


@functools.lru_cache(maxsize=4)
def _yunet(model: str, face_px: int, device: str) -> Detector:
    return YuNetDetector(model, face_px=face_px, device=device)


def detector(cfg: BuildConfig) -> Detector:
    """The configured detector, built once per process (Ray workers reuse it across batches)."""
    if cfg.detector == "yunet":
        return _yunet(cfg.detector_model, cfg.yunet_face_px, cfg.yunet_device)
    return _cached(cfg.cascade, cfg.scale_factor, cfg.min_neighbors, cfg.detect_stride)


def crop_square(rgb: np.ndarray, box: Box, margin: float, size: int) -> np.ndarray:
    """A square around the face with `margin` x side of context on each side, resized to size x size.

    The square is moved inside the photo rather than padded (no invented pixels); if it is larger than the photo's
    short side it shrinks to that.
    """
    h, w = rgb.shape[:2]
    x, y, bw, bh = box
    side = int(round(max(bw, bh) * (1 + 2 * margin)))
    side = max(1, min(side, h, w))
    cx, cy = x + bw / 2, y + bh / 2
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    crop = rgb[top : top + side, left : left + side]
    interp = cv2.INTER_AREA if side >= size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


NO_FACE = "no_face"  # a photo without a usable face: a filter outcome, recorded but not counted as bad input


def find_faces(data: bytes, cfg: BuildConfig, reduce: bool = True, det: Detector | None = None
               ) -> tuple[list[Box], np.ndarray, int]:
    """A photo's faces of side >= min_face in source pixels, with the RGB image they were found in and its scale 1/f.

    Detection cost grows with the pixels searched, so a JPEG is decoded in libjpeg at 1/2, 1/4 or 1/8 scale when a
    min_face face still spans the detector's `face_px` there (`reduce=False`: full size, and `det`, another
    detector than the configured one: for benchmarks/face_detect.py)."""
    from preprocessing.images import Reject, check, decode_checked, jpeg_factor

    checked = check(data, cfg.max_pixels)
    det = det or detector(cfg)
    f = jpeg_factor(checked, cfg.min_face / det.face_px) if reduce else 1
    rgb = decode_checked(data, checked, f)  # EXIF orientation applied
    boxes = _to_source(det.detect(rgb, max(1, cfg.min_face // f)), f, cfg.min_face)
    if not boxes:
        raise Reject(NO_FACE, f"no face of side >= {cfg.min_face} px in {checked.width}x{checked.height}"
                              + (f" (searched at 1/{f} scale)" if f > 1 else ""))
    return boxes, rgb, f


def face_rows(key: str, source: str, data: bytes, cfg: BuildConfig) -> list[tuple[str, np.ndarray, str, Box]]:
    """One photo -> a row per face of side >= min_face: key `<key>#<i>`, the square crop, the source, the box.

    The crops come from the full-resolution photo (decoded again only when a face was found at reduced scale): a
    crop from the reduced decode would save 6% of such a photo's CPU but move the square by up to half a reduced
    pixel (`benchmarks/face_detect.py --crops`)."""
    from preprocessing.images import decode

    boxes, rgb, f = find_faces(data, cfg)
    if f > 1:
        rgb = decode(data, cfg.max_pixels)
    return [(f"{key}#{i}", crop_square(rgb, b, cfg.margin, cfg.resolution), source, b) for i, b in enumerate(boxes)]
