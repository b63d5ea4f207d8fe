"""Face boxes in photos (paper section 4: "an OpenCV face detector, keeping sufficiently high resolution detections").

The default is OpenCV's Haar frontal-face cascade; any cascade XML or a `cv2.FaceDetectorYN` ONNX model the user
supplies plugs in through `BuildConfig.cascade`. Detection runs on a grey copy downscaled so that the smallest face
we keep (`min_face`) is about `DETECT_FACE_PX` pixels: faces below `min_face` are discarded anyway, so searching for
them at full resolution is wasted work (see benchmarks/face_detect.py). Boxes are mapped back to source pixels.
"""

from __future__ import annotations

from preprocessing.errors import InputError, MissingError

import functools
import os
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from preprocessing.config import BuildConfig

DETECT_FACE_PX = 32  # a min_face face is searched for at this size (the Haar window is 24 px)

Box = tuple[int, int, int, int]  # x, y, w, h in source pixels


class Detector(Protocol):
    def detect(self, rgb: np.ndarray, min_face: int) -> list[Box]:
        """Faces with side >= min_face in an RGB image, in source pixels."""


def _downscaled_grey(rgb: np.ndarray, min_face: int) -> tuple[np.ndarray, float]:
    scale = max(1.0, min_face / DETECT_FACE_PX)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if scale > 1.0:
        h, w = grey.shape
        grey = cv2.resize(grey, (max(1, round(w / scale)), max(1, round(h / scale))), interpolation=cv2.INTER_AREA)
    return grey, scale


def _to_source(boxes, scale: float, min_face: int) -> list[Box]:
    out = []
    for x, y, w, h in boxes:
        b = tuple(int(round(v * scale)) for v in (x, y, w, h))
        if min(b[2], b[3]) >= min_face:
            out.append(b)
    return sorted(out, key=lambda b: (b[1], b[0], b[2], b[3]))  # a stable order: box index is part of the row key


@dataclass
class HaarDetector:
    """cv2.CascadeClassifier with the usual knobs."""

    path: str
    scale_factor: float = 1.1
    min_neighbors: int = 5

    def __post_init__(self):
        try:
            self._cascade = cv2.CascadeClassifier(self.path)
        except (cv2.error, SystemError) as err:  # OpenCV raises while parsing a malformed XML
            raise InputError(f"cascade: {self.path} is not a loadable OpenCV cascade XML ({err})") from None
        if self._cascade.empty():
            raise InputError(f"cascade: {self.path} is not a loadable OpenCV cascade XML")

    def detect(self, rgb: np.ndarray, min_face: int) -> list[Box]:
        grey, scale = _downscaled_grey(rgb, min_face)
        side = max(1, int(min_face / scale))
        found = self._cascade.detectMultiScale(grey, self.scale_factor, self.min_neighbors, minSize=(side, side))
        return _to_source(found if len(found) else [], scale, min_face)


@dataclass
class YuNetDetector:
    """cv2.FaceDetectorYN (the YuNet ONNX model, which the user supplies); boxes are made square around the face."""

    path: str
    score_threshold: float = 0.8

    def __post_init__(self):
        try:
            self._net = cv2.FaceDetectorYN.create(self.path, "", (320, 320), self.score_threshold)
        except cv2.error as err:
            raise InputError(f"cascade: {self.path} is not a loadable FaceDetectorYN ONNX model ({err})") from None

    def detect(self, rgb: np.ndarray, min_face: int) -> list[Box]:
        scale = max(1.0, min_face / DETECT_FACE_PX)
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if scale > 1.0:
            h, w = bgr.shape[:2]
            bgr = cv2.resize(bgr, (max(1, round(w / scale)), max(1, round(h / scale))), interpolation=cv2.INTER_AREA)
        self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self._net.detect(bgr)
        boxes = []
        for f in faces if faces is not None else []:
            x, y, w, h = f[:4]
            side = max(w, h)
            boxes.append((x + (w - side) / 2, y + (h - side) / 2, side, side))
        return _to_source(boxes, scale, min_face)


def resolve_model(name: str) -> str:
    """A cascade name under cv2.data.haarcascades, or a path to a cascade XML / ONNX model."""
    if os.path.isfile(name):
        return name
    bundled = os.path.join(cv2.data.haarcascades, name)
    if os.path.isfile(bundled):
        return bundled
    raise MissingError(f"cascade: {name!r} is neither a file nor a cascade under {cv2.data.haarcascades}")


@functools.lru_cache(maxsize=4)
def _cached(name: str, scale_factor: float, min_neighbors: int) -> Detector:
    path = resolve_model(name)  # here, not per photo: a missing model still raises (errors are not cached)
    if path.lower().endswith(".onnx"):
        return YuNetDetector(path)
    return HaarDetector(path, scale_factor, min_neighbors)


def detector(cfg: BuildConfig) -> Detector:
    """The configured detector, built once per process (Ray workers reuse it across batches)."""
    return _cached(cfg.cascade, cfg.scale_factor, cfg.min_neighbors)


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


def face_rows(key: str, source: str, data: bytes, cfg: BuildConfig) -> list[tuple[str, np.ndarray, str, Box]]:
    """One photo -> a row per face of side >= min_face: key `<key>#<i>`, the square crop, the source, the box."""
    from preprocessing.images import Reject, decode

    rgb = decode(data, cfg.max_pixels)  # full resolution: crops keep every source pixel (EXIF orientation applied)
    boxes = detector(cfg).detect(rgb, cfg.min_face)
    if not boxes:
        raise Reject(NO_FACE, f"no face of side >= {cfg.min_face} px in {rgb.shape[1]}x{rgb.shape[0]}")
    return [(f"{key}#{i}", crop_square(rgb, b, cfg.margin, cfg.resolution), source, b) for i, b in enumerate(boxes)]
