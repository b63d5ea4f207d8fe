"""Decoding, checks and the center crop on real photos, and every kind of bad input becoming a Reject."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from preprocessing import images as im
from realdata import encode, grace_hopper_path, skimage_rgb


def reason(data: bytes, max_pixels: int = 50_000_000, **kw) -> str:
    with pytest.raises(im.Reject) as exc:
        im.decode(data, max_pixels, **kw)
    return exc.value.reason


@pytest.fixture(scope="module")
def astro() -> np.ndarray:
    return skimage_rgb("astronaut")


def test_formats_are_sniffed_and_sized_from_the_header(astro):
    wide = astro[:300]
    for ext, fmt in ((".jpg", "jpeg"), (".png", "png"), (".webp", "webp"), (".bmp", "bmp")):
        data = encode(wide, ext)
        assert im.sniff(data) == fmt
        assert im.header_size(data, fmt) == (512, 300)
    lossless = encode(wide, ".webp", quality=101)  # VP8L
    assert im.header_size(lossless, "webp") == (512, 300)
    jpeg = grace_hopper_path().read_bytes()
    assert im.header_size(jpeg, "jpeg") == (512, 600)


def test_conversions_grey_alpha_16bit_cmyk(astro):
    grey = encode(astro[..., 0], ".png")
    out = im.decode(grey, 10**8)
    assert out.shape == (512, 512, 3) and (out[..., 2] == astro[..., 0]).all()
    rgba = cv2.imencode(".png", np.dstack([astro[..., ::-1], np.full(astro.shape[:2], 9, np.uint8)]))[1].tobytes()
    assert (im.decode(rgba, 10**8) == astro).all()
    sixteen = cv2.imencode(".png", astro[..., ::-1].astype(np.uint16) * 257)[1].tobytes()
    out = im.decode(sixteen, 10**8)
    assert out.dtype == np.uint8 and (out == astro).all()
    buf = io.BytesIO()
    Image.fromarray(astro).convert("CMYK").save(buf, "JPEG", quality=95)
    out = im.decode(buf.getvalue(), 10**8)
    assert out.shape == astro.shape and np.abs(out.astype(int) - astro).mean() < 4


def test_exif_orientation_is_honoured(astro):
    wide = astro[:, :300]  # 300 wide, 512 tall as displayed
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(np.rot90(wide, 1)))  # stored rotated: 512 wide, 300 tall
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(buf, "JPEG", quality=95, exif=exif)
    out = im.decode(buf.getvalue(), 10**8)
    assert out.shape == (512, 300, 3)
    assert np.abs(out.astype(int) - wide).mean() < 4


def test_bad_inputs_become_rejects_with_reasons(astro):
    jpeg = encode(astro, ".jpg")
    assert reason(b"") == im.EMPTY
    assert reason(b"hello, this is text\n") == im.NOT_IMAGE
    assert reason(jpeg[: len(jpeg) // 2]) == im.TRUNCATED
    assert reason(jpeg[:200]) == im.TRUNCATED
    png = encode(astro, ".png")
    assert reason(png[: len(png) - 100]) == im.TRUNCATED
    webp = encode(astro, ".webp")
    assert reason(webp[: len(webp) // 2]) == im.TRUNCATED
    gif = io.BytesIO()
    Image.fromarray(astro).save(gif, "GIF")
    assert reason(gif.getvalue()) == im.UNSUPPORTED
    # A bogus Huffman table behind a valid header and end marker: libjpeg gives up.
    i = jpeg.find(b"\xff\xc4")
    assert reason(jpeg[: i + 4] + b"\xff" * 40 + jpeg[i + 44 :]) == im.CORRUPT
    assert reason(jpeg, max_pixels=512 * 512 - 1) == im.TOO_LARGE


def test_decompression_bomb_is_caught_from_the_header_alone():
    """A PNG that claims 100k x 100k pixels: rejected before any decode (the IDAT is not even valid)."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"x") + chunk(b"IEND", b"")
    with pytest.raises(im.Reject) as exc:
        im.check(bomb, 50_000_000)
    assert exc.value.reason == im.TOO_LARGE and "100000x100000" in exc.value.detail


def test_center_crop_resize_matches_an_independent_computation(astro):
    wide = np.ascontiguousarray(astro[100:400])  # 512 wide, 300 tall
    out = im.center_crop_resize(wide, 64)
    ref = cv2.resize(wide[:, 106:406], (64, 64), interpolation=cv2.INTER_AREA)
    assert out.shape == (64, 64, 3) and (out == ref).all()


def test_reduced_jpeg_decode_is_close_to_full_decode(astro):
    jpeg = encode(astro, ".jpg", quality=90)
    assert im.reduce_factor(im.check(jpeg, 10**8), 64) == 8
    assert im.reduce_factor(im.check(jpeg, 10**8), 200) == 2
    fast = im.square_image(jpeg, 64, 10**8)
    full = im.center_crop_resize(im.decode(jpeg, 10**8), 64)
    assert np.abs(fast.astype(int) - full).mean() < 3


def test_too_small_is_rejected_not_upscaled(astro):
    small = encode(cv2.resize(astro, (40, 40), interpolation=cv2.INTER_AREA), ".png")
    with pytest.raises(im.Reject) as exc:
        im.square_image(small, 64, 10**8)
    assert exc.value.reason == im.TOO_SMALL
