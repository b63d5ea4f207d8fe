"""Decoding, checks and the center crop on real photos, and every kind of bad input becoming a Reject."""

from __future__ import annotations

import io
import os
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


def tiff(width: int, height: int, pixels: bytes | None = None, order: str = "<", long: bool = False,
         tile: tuple[int, int] | None = None) -> bytes:
    """A deflate RGB TIFF written by hand, in either byte order with SHORT or LONG sizes: one strip of `pixels`, or
    of zeros streamed through zlib (a bomb costs no memory to make); or one tile of `tile` zeros."""
    n = 3 * (tile[0] * tile[1] if tile else width * height)
    z = zlib.compressobj(9)
    if pixels is None:
        zeros = bytes(1 << 22)
        pixels_z = b"".join(z.compress(zeros[: min(1 << 22, n - i)]) for i in range(0, n, 1 << 22)) + z.flush()
    else:
        pixels_z = z.compress(pixels) + z.flush()
    size = ("I", 4) if long else ("H", 3)
    tags = [(256, *size, width), (257, *size, height), (258, "H", 3, None), (259, "H", 3, 8), (262, "H", 3, 2),
            (277, "H", 3, 3), (284, "H", 3, 1)]
    tags += ([(322, *size, tile[0]), (323, *size, tile[1]), (324, "I", 4, None), (325, "I", 4, len(pixels_z))]
             if tile else [(273, "I", 4, None), (278, "I", 4, height), (279, "I", 4, len(pixels_z))])
    tags.sort()
    bits_at = 8 + 2 + 12 * len(tags) + 4  # BitsPerSample's three values follow the IFD, then the pixels
    out = (b"II" if order == "<" else b"MM") + struct.pack(order + "HIH", 42, 8, len(tags))
    for tag, fmt, typ, value in tags:
        if tag == 258:
            out += struct.pack(order + "HHII", tag, typ, 3, bits_at)
        else:
            value = bits_at + 6 if value is None else value
            out += struct.pack(order + "HHI", tag, typ, 1) + struct.pack(order + fmt, value).ljust(4, b"\0")
    return out + struct.pack(order + "IHHH", 0, 8, 8, 8) + pixels_z


def test_tiff_size_from_the_first_ifd_in_both_byte_orders(astro):
    crop = np.ascontiguousarray(astro[100:148, 200:264])  # 64 wide, 48 tall
    for order in "<>":
        for long in (False, True):
            data = tiff(64, 48, crop.tobytes(), order, long)
            assert im.sniff(data) == "tiff" and im.header_size(data, "tiff") == (64, 48)
            assert (im.decode(data, 10**8) == crop).all(), (order, long)  # OpenCV reads the same file
    assert im.header_size(encode(astro[:300], ".tiff"), "tiff") == (512, 300)  # libtiff's own layout (IFD last)
    assert reason(tiff(64, 48, crop.tobytes())[:40]) == im.TRUNCATED


def test_every_decodable_format_is_capped_before_decoding(astro):
    wide = np.ascontiguousarray(astro[:300])
    core_bmp = struct.pack("<2sIHHIIHHHH", b"BM", 26 + 512 * 300 * 3, 0, 0, 26, 12, 512, 300, 1, 24)
    core_bmp += wide[::-1, :, ::-1].tobytes()  # OS/2 bitmap: 16-bit sizes, bottom-up BGR rows
    samples = {ext: encode(wide, ext) for ext in (".jpg", ".png", ".webp", ".bmp", ".tiff")}
    samples |= {"lossless webp": encode(wide, ".webp", quality=101), "os/2 bmp": core_bmp}
    assert {im.sniff(d) for d in samples.values()} == im.DECODABLE
    assert (im.decode(core_bmp, 10**8) == wide).all()
    for name, data in samples.items():
        assert im.check(data, 512 * 300).width == 512, name
        with pytest.raises(im.Reject) as exc:
            im.check(data, 512 * 300 - 1)
        assert exc.value.reason == im.TOO_LARGE, name


def test_tiff_bomb_is_rejected_without_decoding():
    """8000x8000 pixels in 187 KB: decoding costs 420 MB (192 MB of it the returned array); the header costs nothing.
    A 16x16 TIFF with a huge tile is a bomb too: OpenCV allocates (and libtiff fills) a whole tile."""
    import tracemalloc

    bomb = tiff(8000, 8000)
    assert len(bomb) < 310_000
    tracemalloc.start()  # sees numpy buffers, so also the array cv2.imdecode would return
    try:
        assert reason(bomb) == im.TOO_LARGE
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak
    with pytest.raises(im.Reject, match="16x16 with a 1024x1024 tile") as exc:
        im.check(tiff(16, 16, tile=(1024, 1024)), 1_000_000)
    assert exc.value.reason == im.TOO_LARGE


def test_opencv_pixel_cap_is_a_second_guard(tmp_path):
    """OPENCV_IO_MAX_IMAGE_PIXELS (read when cv2 loads, as in build workers) rejects as too_large too."""
    import subprocess
    import sys

    png = tmp_path / "a.png"
    png.write_bytes(encode(np.zeros((100, 100, 3), np.uint8) + 9, ".png"))
    code = ("import sys; from preprocessing import images as im\n"
            "try: im.decode(open(sys.argv[1], 'rb').read(), 10**8)\n"
            "except im.Reject as r: print(r.reason, r.detail)")
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "9999"}
    out = subprocess.run([sys.executable, "-c", code, str(png)], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("too_large ") and "MAX_IMAGE_PIXELS" in out.stdout, out
