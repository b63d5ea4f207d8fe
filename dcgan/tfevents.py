"""TensorBoard event files written directly: scalars and PNG pictures, the two kinds of record the project logs
(layer: dcgan).

Why: `torch.utils.tensorboard` imports TensorBoard's summary stack (~0.27 s) and encodes every picture again through
PIL, also the evaluation's, which are PNG files already: 0.64 s of a ~2.5 s `dcgan evaluate --suite samples` in a
profile (benchmarks/RESULTS.md, thirtieth session; benchmarks/startup.py's evaluate row is that command as a Ray
job). The format is small and stable: TFRecord framing (the length, its masked CRC-32C, the bytes, their masked
CRC-32C) around `Event` protocol buffers, of which only the fields below are written, encoded here by hand.
TensorBoard reads these files as its own (tests/test_evaluate.py, tests/test_flows.py read them with its
EventAccumulator).
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from pathlib import Path

import numpy as np


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # CRC-32C (Castagnoli), reflected
        table.append(c)
    return table


_CRC = _crc_table()
_FLOAT32_MAX = 3.4028234663852886e38
FLUSH_S = 120.0  # as torch's writer: what is logged reaches the file at least this often


def crc32c(data: bytes) -> int:
    c, table = 0xFFFFFFFF, _CRC
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(data: bytes) -> bytes:
    c = crc32c(data)
    return struct.pack("<I", (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf writes it: a negative number in ten bytes
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: bytes | int) -> bytes:
    """A length-delimited field (bytes) or a varint field (int)."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _event(step: int, summary: bytes | None = None, file_version: bytes | None = None) -> bytes:
    # Event: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5 (Summary)
    out = _varint(1 << 3 | 1) + struct.pack("<d", time.time()) + _field(2, int(step))
    if file_version is not None:
        out += _field(3, file_version)
    if summary is not None:
        out += _field(5, summary)
    return out


_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # a PNG's colour type: grey, RGB, palette, grey+alpha, RGBA


def png_size(png: bytes) -> tuple[int, int, int]:
    """(height, width, channels) from a PNG's IHDR; ValueError for bytes that are not a PNG."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR" or len(png) < 26 or png[25] not in _CHANNELS:
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", png[16:24])
    return height, width, _CHANNELS[png[25]]


class EventWriter:
    """One event file under `logdir`, named as TensorBoard's writers name theirs (`suffix` at the end)."""

    _count = 0

    def __init__(self, logdir: str | Path, suffix: str = ""):
        EventWriter._count += 1
        self.path = Path(logdir) / (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                                    f"{os.getpid()}.{EventWriter._count}{suffix}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        self._flushed = time.monotonic()
        self._record(_event(0, file_version=b"brain.Event:2"))

    def _record(self, event: bytes) -> None:
        header = struct.pack("<Q", len(event))
        self._file.write(header + _masked(header) + event + _masked(event))
        if time.monotonic() - self._flushed >= FLUSH_S:
            self.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        # Summary.value = 1 (Value: tag = 1, simple_value = 2 as a 32-bit float)
        value = float(value)
        if math.isfinite(value) and abs(value) > _FLOAT32_MAX:  # as torch's writer stores it: +-inf, not an error
            value = math.copysign(math.inf, value)
        value_ = _field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)
        self._record(_event(step, _field(1, value_)))

    def png(self, tag: str, png: bytes, step: int) -> None:
        """A picture already encoded as PNG, as it is."""
        height, width, channels = png_size(png)
        # Value.image = 4 (Image: height = 1, width = 2, colorspace = 3, encoded_image_string = 4)
        image = _field(1, height) + _field(2, width) + _field(3, channels) + _field(4, png)
        self._record(_event(step, _field(1, _field(1, tag.encode()) + _field(4, image))))

    def image(self, tag: str, picture: np.ndarray, step: int) -> None:
        """An (H, W, 3) RGB or (H, W) / (H, W, 1) grey uint8 picture, encoded as PNG."""
        import cv2

        colour = picture.ndim == 3 and picture.shape[2] == 3
        ok, png = cv2.imencode(".png", np.ascontiguousarray(picture[:, :, ::-1] if colour else picture))
        if not ok:
            raise ValueError(f"could not encode a {picture.shape} picture as PNG")
        self.png(tag, png.tobytes(), step)

    def flush(self) -> None:
        self._file.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        self._file.close()
