"""Encoded bytes -> checked RGB pixels, and the center crop + area resize every dataset row goes through.

Bad input is a `Reject` (a stable `reason` plus a human `detail`), never an exception that stops a build and never a
silent drop. The checks run cheapest first: empty -> magic bytes -> header dimensions -> truncation -> decode. The
decompression-bomb cap holds *before* any pixel is decoded: every format handed to OpenCV has its size read from its
header here (a file whose header gives none is rejected), and TIFF tiles count too, because OpenCV allocates a whole
tile whatever the image size. OpenCV's own cap (OPENCV_IO_MAX_IMAGE_PIXELS, read once when cv2 loads) is a second
guard in build workers. OpenCV's colour decode converts what can be converted: grey -> RGB, alpha dropped, 16-bit
scaled to 8, CMYK JPEG -> RGB, and EXIF orientation applied.

Layer: preprocessing.
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
# What we hand to OpenCV: formats whose headers `header_size` reads. OpenCV 4.14's wheels also decode GIF and AVIF,
# but those stay unsupported here (animations and palette images; AVIF's header is not parsed).
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


def _tiff_ifd0(b: bytes) -> dict[int, int]:
    """The first IFD's single-valued SHORT/LONG tags (the page OpenCV decodes), in either byte order."""
    order = "<" if b[:2] == b"II" else ">"
    (at,) = struct.unpack(order + "I", b[4:8])
    (n,) = struct.unpack(order + "H", b[at : at + 2])
    tags = {}
    for e in range(at + 2, at + 2 + 12 * n, 12):
        tag, typ, count = struct.unpack(order + "HHI", b[e : e + 8])
        if count == 1 and typ in (3, 4):  # SHORT or LONG, stored left-justified in the value field
            tags[tag] = struct.unpack(order + ("H" if typ == 3 else "I"), b[e + 8 : e + (10 if typ == 3 else 12)])[0]
    return tags


TIFF_WIDTH, TIFF_LENGTH, TIFF_TILE_WIDTH, TIFF_TILE_LENGTH = 256, 257, 322, 323


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from the header alone, or None where the header does not give it (cut short, malformed)."""
    try:
        if fmt == "jpeg":
            h = _jpeg_header(data)
            return (h[0], h[1]) if h else None
        if fmt == "png" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if fmt == "gif":
            return struct.unpack("<HH", data[6:10])
        if fmt == "bmp":
            if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
                return struct.unpack("<HH", data[18:22])
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if fmt == "tiff":
            tags = _tiff_ifd0(data)
            return tags[TIFF_WIDTH], tags[TIFF_LENGTH]
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
    except (struct.error, IndexError, KeyError, TypeError, ValueError):
        return None
    return None


def _decoder_pixels(data: bytes, fmt: str, size: tuple[int, int]) -> tuple[int, str]:
    """(pixels the decoder allocates, how): the image, or for a tiled TIFF its tile if that is larger."""
    w, h = size
    if fmt == "tiff":
        tags = _tiff_ifd0(data)
        tw, th = tags.get(TIFF_TILE_WIDTH, 0), tags.get(TIFF_TILE_LENGTH, 0)
        if tw * th > w * h:
            return tw * th, f"{w}x{h} with a {tw}x{th} tile"
    return w * h, f"{w}x{h}"


def _truncated(data: bytes, fmt: str) -> bool:
    """Cheap end-of-stream checks: decoders often 'succeed' on a cut file and fill the rest with grey."""
    if fmt == "jpeg":
        try:
            h = _jpeg_header(data)
        except ValueError as err:
            raise Reject(CORRUPT, f"jpeg header: {err}") from None
        # No scan header, or no end-of-image marker after the first scan (thumbnails' EOIs sit before it). Searched
        # from the end, where an intact file's EOI is: a forward search read the whole scan (~3% of a chunk's CPU in a profile).
        return h is None or data.rfind(b"\xff\xd9", h[2]) < 0
    if fmt == "png":
        return data.rfind(b"IEND") < 0
    if fmt == "webp":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    if fmt == "tiff":  # the first IFD (a count, then 12 bytes a tag) runs past the end
        order = "little" if data[:2] == b"II" else "big"
        at = int.from_bytes(data[4:8], order)
        return at + 2 + 12 * int.from_bytes(data[at : at + 2], order) > len(data)
    return False


# ------------------------------------------------------------------------------------------------ decoding


@dataclass(frozen=True)
class Checked:
    """Bytes that passed every check short of decoding."""

    fmt: str
    width: int
    height: int


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
    if size is None:  # never decode what the cap cannot be checked on
        if _truncated(data, fmt):
            raise Reject(TRUNCATED, f"{fmt} stream ends before its image size ({len(data):,} bytes)")
        raise Reject(CORRUPT, f"no image size in the {fmt} header")
    w, h = size
    if w <= 0 or h <= 0:
        raise Reject(CORRUPT, f"{fmt} header gives {w}x{h}")
    pixels, what = _decoder_pixels(data, fmt, size)
    if pixels > max_pixels:
        raise Reject(TOO_LARGE, f"{what} = {pixels:,} pixels > max_pixels {max_pixels:,}")
    if _truncated(data, fmt):
        raise Reject(TRUNCATED, f"{fmt} stream ends early ({len(data):,} bytes)")
    return Checked(fmt, w, h)


_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def jpeg_factor(checked: Checked, most: float) -> int:
    """The largest JPEG DCT-domain downscale (1, 2, 4 or 8) not above `most`.

    Only JPEG scales inside the decoder (libjpeg); for other formats OpenCV would decode fully and then resize with
    a cruder filter, so they decode at full size.
    """
    if checked.fmt != "jpeg":
        return 1
    f = 1
    while f < 8 and f * 2 <= most:
        f *= 2
    return f


def reduce_factor(checked: Checked, target: int) -> int:
    """The largest JPEG downscale that keeps the short side >= target."""
    return jpeg_factor(checked, min(checked.width, checked.height) / target)


def decode_checked(data: bytes, checked: Checked, factor: int = 1) -> np.ndarray:
    """Checked bytes -> RGB uint8, decoded at 1/factor scale (`jpeg_factor`; 1 for other formats); raises Reject."""
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[factor])
    except cv2.error as err:
        msg = str(err).strip().splitlines()[-1][:200]
        # OpenCV's own cap (OPENCV_IO_MAX_IMAGE_PIXELS), checked on its header before it allocates.
        raise Reject(TOO_LARGE if "MAX_IMAGE_PIXELS" in msg else CORRUPT, f"{checked.fmt}: {msg}") from None
    if bgr is None or bgr.size == 0:
        raise Reject(CORRUPT, f"OpenCV could not decode this {checked.fmt} ({len(data):,} bytes)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode(data: bytes, max_pixels: int, target: int | None = None) -> np.ndarray:
    """Bytes -> RGB uint8 (H, W, 3) with EXIF orientation applied; raises Reject.

    `target` (the short side the caller needs) lets JPEGs decode at 1/2, 1/4 or 1/8 scale, which is 2-4x faster.
    """
    checked = check(data, max_pixels)
    return decode_checked(data, checked, reduce_factor(checked, target) if target else 1)


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
