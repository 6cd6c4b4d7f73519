"""Decoding and preprocessing: formats, conversions, EXIF orientation, bomb refusal."""

from __future__ import annotations

import struct
import time
import zlib

import cv2
import numpy as np
import pytest

from camserve.errors import InputError
from camserve.pipeline.imageio import (
    ImageTooLarge,
    NotAnImage,
    apply_orientation,
    decode,
    exif_orientation,
    preprocess,
    read_header,
)

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (30, 50, 3), dtype=np.uint8)
LIMIT = 10**6


def encode(image: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    assert ok
    return buf.tobytes()


def exif_blob(orientation: int, big_endian: bool = False) -> bytes:
    e = ">" if big_endian else "<"
    ifd = struct.pack(e + "H", 1) + struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(e + "I", 0)
    return (b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8) + ifd


def with_exif(image_bgr: np.ndarray, ext: str, orientation: int) -> bytes:
    blob = np.frombuffer(exif_blob(orientation), np.uint8)
    ok, buf = cv2.imencodeWithMetadata(ext, image_bgr, [cv2.IMAGE_METADATA_EXIF], [blob])
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("ext", [".png", ".bmp", ".webp"])
def test_lossless_formats_round_trip_to_rgb(ext):
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else None
    data = encode(RGB[:, :, ::-1], ext, params)  # OpenCV writes BGR
    assert read_header(data).width == 50 and read_header(data).height == 30
    out = decode(data, LIMIT)
    assert out.dtype == np.uint8 and out.shape == (30, 50, 3)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("ext", [".jpg", ".webp"])
def test_lossy_formats_decode_close_to_source(ext):
    smooth = cv2.GaussianBlur(RGB, (9, 9), 3)
    out = decode(encode(smooth[:, :, ::-1], ext, [cv2.IMWRITE_JPEG_QUALITY, 98, cv2.IMWRITE_WEBP_QUALITY, 98]), LIMIT)
    assert out.shape == (30, 50, 3)
    assert np.abs(out.astype(int) - smooth).mean() < 4


def test_progressive_jpeg_header():
    data = encode(RGB, ".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    h = read_header(data)
    assert (h.format, h.width, h.height) == ("jpeg", 50, 30)


def test_grayscale_becomes_three_equal_channels():
    gray = RGB[:, :, 0]
    out = decode(encode(gray, ".png"), LIMIT)
    assert out.shape == (30, 50, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_sixteen_bit_png_scaled_to_eight_bit():
    deep = np.minimum(RGB[:, :, ::-1].astype(np.int64) * 257 + 100, 65535).astype(np.uint16)  # +100/257 rounds away
    out = decode(encode(deep, ".png"), LIMIT)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("ext", [".png", ".webp"])
def test_rgba_composited_over_white(ext):
    alpha = np.zeros((30, 50), np.uint8)
    alpha[:, 25:] = 255
    bgra = np.dstack([RGB[:, :, ::-1], alpha])
    out = decode(encode(bgra, ext, [cv2.IMWRITE_WEBP_QUALITY, 101]), LIMIT)
    np.testing.assert_array_equal(out[:, 25:], RGB[:, 25:])  # opaque: the colour
    assert (out[:, :25] == 255).all()  # transparent: the white background


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_exif_orientation_matches_opencv_color_mode(ext, orientation):
    """Our unchanged-mode decode + own orientation equals OpenCV's EXIF-aware colour decode."""
    smooth = cv2.GaussianBlur(RGB, (5, 5), 2)
    data = with_exif(smooth[:, :, ::-1], ext, orientation)
    ours = decode(data, LIMIT)
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    assert ours.shape == reference.shape
    assert np.abs(ours.astype(int) - reference).max() <= 1


def test_exif_orientation_6_is_a_clockwise_quarter_turn():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:5, :10] = 255  # bright block at the top-left
    out = decode(with_exif(image, ".png", 6), LIMIT)
    assert out.shape == (40, 20, 3)
    np.testing.assert_array_equal(out, np.rot90(image, k=-1))  # now at the top-right


def test_exif_parser_both_byte_orders_and_garbage():
    assert exif_orientation(exif_blob(8, big_endian=True)) == 8
    assert exif_orientation(b"Exif\x00\x00" + exif_blob(3)) == 3
    assert exif_orientation(b"junk") == 1
    assert exif_orientation(exif_blob(42)) == 1
    np.testing.assert_array_equal(apply_orientation(RGB, 3), RGB[::-1, ::-1])


def png_bomb(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header declares width x height gray pixels (zero rows, compressed)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compressobj(9)
    idat = b"".join(rows.compress(b"\x00" * (width + 1)) for _ in range(64)) + rows.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding():
    data = png_bomb(20000, 20000)
    assert len(data) < 100_000
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="20000 x 20000") as info:
        decode(data, max_pixels=40_000_000)
    assert time.perf_counter() - start < 0.05  # refused from the header, not by decoding 400 MP
    assert info.value.status == 413 and isinstance(info.value, InputError)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp"])
def test_pixel_limit_applies_to_every_format(ext):
    data = encode(RGB, ext)
    assert decode(data, max_pixels=1500).shape == (30, 50, 3)  # exactly at the limit
    with pytest.raises(ImageTooLarge, match="1500 pixels, more than the limit of 1499"):
        decode(data, max_pixels=1499)


def test_empty_body_not_an_image_and_truncation():
    with pytest.raises(NotAnImage, match="empty"):
        decode(b"", LIMIT)
    with pytest.raises(NotAnImage, match="not a JPEG, PNG, WebP or BMP"):
        decode(b"hello, this is text and not an image", LIMIT)
    with pytest.raises(NotAnImage, match="not a JPEG"):
        decode(b"GIF89a" + bytes(100), LIMIT)
    jpeg = encode(RGB, ".jpg")
    for cut in (len(jpeg) // 2, len(jpeg) - 2):
        with pytest.raises(NotAnImage, match="JPEG"):
            decode(jpeg[:cut], LIMIT)
    with pytest.raises(NotAnImage, match="header is truncated"):
        decode(jpeg[:6], LIMIT)
    with pytest.raises(NotAnImage, match="PNG"):
        decode(encode(RGB, ".png")[:60], LIMIT)


def test_preprocess_matches_manual_formula():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    batch = preprocess([RGB, RGB[:20, :20]], (16, 24), mean, std)
    assert batch.shape == (2, 3, 16, 24) and batch.dtype == np.float32
    resized = cv2.resize(RGB, (24, 16), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    expected = ((resized - np.array(mean)) / np.array(std)).transpose(2, 0, 1)
    np.testing.assert_allclose(batch[0], expected, rtol=1e-5, atol=1e-5)
    bgr = preprocess([RGB], (16, 24), mean, std, channel_order="BGR")
    flipped = ((resized[..., ::-1] - np.array(mean)) / np.array(std)).transpose(2, 0, 1)
    np.testing.assert_allclose(bgr[0], flipped, rtol=1e-5, atol=1e-5)


def test_gray_alpha_and_unused_alpha_channels():
    from camserve.pipeline.imageio import to_rgb8

    ga = np.dstack([RGB[:, :, 0], np.full((30, 50), 255, np.uint8)])
    np.testing.assert_array_equal(to_rgb8(ga), np.repeat(RGB[:, :, :1], 3, axis=2))  # opaque: the gray
    ga[:, :10, 1] = 0
    assert (to_rgb8(ga)[:, :10] == 255).all()  # transparent: white
    bgr0 = np.dstack([RGB[:, :, ::-1], np.zeros((30, 50), np.uint8)])  # 32-bit BMP style, alpha unused
    np.testing.assert_array_equal(to_rgb8(bgr0), RGB)
    with pytest.raises(NotAnImage, match="pixel type float32"):
        to_rgb8(RGB.astype(np.float32))
