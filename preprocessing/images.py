"""Encoded bytes -> checked RGB pixels, and the center crop + area resize every dataset row goes through.

Bad input is a `Reject` (a stable `reason` plus a human `detail`), never an exception that stops a build and never a
silent drop. The checks run cheapest first: empty -> magic bytes -> header dimensions (the decompression-bomb cap is
enforced *before* any pixel is decoded) -> truncation -> decode. OpenCV's colour decode converts what can be
converted: grey -> RGB, alpha dropped, 16-bit scaled to 8, CMYK JPEG -> RGB, and EXIF orientation applied.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

# Reject reasons of malformed input (stable strings: they are manifest keys and reject-row values).
EMPTY = "empty"
NOT_IMAGE = "not_image"
UNSUPPORTED = "unsupported_format"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
TOO_LARGE = "too_large"
TOO_SMALL = "too_small"

# (format, magic test) in the order they are tried.
_MAGIC = (
    ("jpeg", lambda b: b[:3] == b"\xff\xd8\xff"),
    ("png", lambda b: b[:8] == b"\x89PNG\r\n\x1a\n"),
    ("webp", lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"),
    ("gif", lambda b: b[:6] in (b"GIF87a", b"GIF89a")),
    ("bmp", lambda b: b[:2] == b"BM"),
    ("tiff", lambda b: b[:4] in (b"II*\x00", b"MM\x00*")),
    ("heif", lambda b: b[4:8] == b"ftyp" and b[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif")),
)
# What this OpenCV build decodes (GIF and HEIF/AVIF are not built into opencv-python-headless 4.x).
DECODABLE = {"jpeg", "png", "webp", "bmp", "tiff"}


class Reject(Exception):
    """An input that cannot become a row; `reason` is a stable key, `detail` says what exactly was wrong."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def sniff(data: bytes) -> str | None:
    """The image format by magic bytes (file names and Content-Type headers lie; LSUN mixes JPEG and WebP)."""
    for name, test in _MAGIC:
        if test(data):
            return name
    return None


# ------------------------------------------------------------------------------------------------ headers


def _jpeg_header(b: bytes) -> tuple[int, int, int] | None:
    """(width, height, offset of the first scan) by walking the marker segments.

    None if the header is cut short; ValueError if it is not a marker structure at all.
    """
    i, n, size = 2, len(b), None
    while i + 4 <= n:
        if b[i] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {i}")
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        seg = struct.unpack(">H", b[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and i + 9 <= n:
            h, w = struct.unpack(">HH", b[i + 5 : i + 9])
            size = (w, h)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return (size[0], size[1], i) if size else None
        i += 2 + seg
    return None


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from the header alone, or None where the format's header is not parsed here."""
    try:
        if fmt == "jpeg":
            h = _jpeg_header(data)
            return (h[0], h[1]) if h else None
        if fmt == "png" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if fmt == "gif":
            return struct.unpack("<HH", data[6:10])
        if fmt == "bmp":
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if fmt == "webp":
            chunk = data[12:16]
            if chunk == b"VP8X":
                w = 1 + int.from_bytes(data[24:27], "little")
                h = 1 + int.from_bytes(data[27:30], "little")
                return w, h
            if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if chunk == b"VP8L" and data[20] == 0x2F:
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    except (struct.error, IndexError, TypeError, ValueError):
        return None
    return None


def _truncated(data: bytes, fmt: str) -> bool:
    """Cheap end-of-stream checks: decoders often 'succeed' on a cut file and fill the rest with grey."""
    if fmt == "jpeg":
        try:
            h = _jpeg_header(data)
        except ValueError as err:
            raise Reject(CORRUPT, f"jpeg header: {err}") from None
        # No scan header, or no end-of-image marker after the first scan (thumbnails' EOIs sit before it).
        return h is None or data.find(b"\xff\xd9", h[2]) < 0
    if fmt == "png":
        return data.rfind(b"IEND") < 0
    if fmt == "webp":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    return False


# ------------------------------------------------------------------------------------------------ decoding


@dataclass(frozen=True)
class Checked:
    """Bytes that passed every check short of decoding."""

    fmt: str
    width: int | None
    height: int | None


def check(data: bytes, max_pixels: int) -> Checked:
    """Every check that needs no decode; raises Reject."""
    if not data:
        raise Reject(EMPTY, "0 bytes")
    fmt = sniff(data)
    if fmt is None:
        raise Reject(NOT_IMAGE, f"unknown magic bytes {data[:8].hex()}")
    if fmt not in DECODABLE:
        raise Reject(UNSUPPORTED, f"{fmt} is not decodable by this OpenCV build")
    size = header_size(data, fmt)
    if size is not None:
        w, h = size
        if w <= 0 or h <= 0:
            raise Reject(CORRUPT, f"{fmt} header gives {w}x{h}")
        if w * h > max_pixels:
            raise Reject(TOO_LARGE, f"{w}x{h} = {w * h:,} pixels > max_pixels {max_pixels:,}")
    if _truncated(data, fmt):
        raise Reject(TRUNCATED, f"{fmt} stream ends early ({len(data):,} bytes)")
    return Checked(fmt, *(size or (None, None)))


_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def reduce_factor(checked: Checked, target: int) -> int:
    """The largest JPEG DCT-domain downscale (1, 2, 4 or 8) that keeps the short side >= target.

    Only JPEG scales inside the decoder (libjpeg); for other formats OpenCV would decode fully and then resize with
    a cruder filter, so they decode at full size.
    """
    if checked.fmt != "jpeg" or checked.width is None:
        return 1
    short = min(checked.width, checked.height)
    f = 1
    while f < 8 and short // (f * 2) >= target:
        f *= 2
    return f


def decode(data: bytes, max_pixels: int, target: int | None = None) -> np.ndarray:
    """Bytes -> RGB uint8 (H, W, 3) with EXIF orientation applied; raises Reject.

    `target` (the short side the caller needs) lets JPEGs decode at 1/2, 1/4 or 1/8 scale, which is 2-4x faster.
    """
    checked = check(data, max_pixels)
    factor = reduce_factor(checked, target) if target else 1
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[factor])
    except cv2.error as err:
        raise Reject(CORRUPT, f"{checked.fmt}: {str(err).strip().splitlines()[-1][:200]}") from None
    if bgr is None or bgr.size == 0:
        raise Reject(CORRUPT, f"OpenCV could not decode this {checked.fmt} ({len(data):,} bytes)")
    h, w = bgr.shape[:2]
    if h * w * factor * factor > max_pixels:  # formats whose header was not parsed
        raise Reject(TOO_LARGE, f"{w * factor}x{h * factor} pixels > max_pixels {max_pixels:,}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def center_crop_resize(img: np.ndarray, size: int) -> np.ndarray:
    """The largest centred square, resized to size x size with area interpolation (the LSUN/ImageNet recipe)."""
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = img[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(crop)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


def square_image(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Bytes -> (size, size, 3) RGB center crop; rejects images whose short side is below `size` (no upscaling)."""
    img = decode(data, max_pixels, target=size)
    if min(img.shape[:2]) < size:
        raise Reject(TOO_SMALL, f"{img.shape[1]}x{img.shape[0]} is smaller than {size} px on its short side")
    return center_crop_resize(img, size)
