"""camserve.pipeline.png: the files decode (OpenCV's libpng checks every CRC) to the pixels
that went in, at every level and shape, and the chunks are the ones the format asks for."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from camserve.errors import InputError
from camserve.pipeline import png, render


def _decode(data: bytes) -> np.ndarray:
    out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert out is not None, "OpenCV could not decode the PNG"
    return out if out.ndim == 2 else cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("shape", [(224, 224), (1, 1), (1, 17), (31, 1), (5, 7, 3), (1, 1, 3), (64, 33, 3)])
@pytest.mark.parametrize("level", [0, 1, 2, 3, 6, 9])
def test_round_trip(shape: tuple[int, ...], level: int) -> None:
    image = np.random.default_rng(level).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(_decode(png.encode(image, level)), image)


def test_chunks_and_filter() -> None:
    image = np.array([[10, 5, 250], [0, 1, 2]], np.uint8)
    data = png.encode(image)
    assert data[:8] == png.SIGNATURE
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.append((kind, body))
        at += 12 + length
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (3, 2, 8, 0, 0, 0, 0)
    # SUB: each byte minus its left neighbour, modulo 256, after the filter byte 1
    assert zlib.decompress(chunks[1][1]) == bytes([1, 10, 251, 245, 1, 0, 1, 1])


def test_rgb_filters_by_pixel() -> None:
    image = np.array([[[1, 2, 3], [4, 6, 8]]], np.uint8)
    np.testing.assert_array_equal(png.sub_filtered(image), [[1, 1, 2, 3, 3, 4, 5]])


def test_smooth_maps_compress() -> None:
    """A CAM-like map (smooth) is far below its raw 50 kB at the served level."""
    y, x = np.mgrid[0:224, 0:224]
    cam = np.exp(-((x - 90.0) ** 2 + (y - 120.0) ** 2) / 3000.0).astype(np.float32)
    data = render.heatmap_png(cam[None])[0]
    assert len(data) < 12_000
    np.testing.assert_array_equal(_decode(data), render.to_uint8(cam[None])[0])


@pytest.mark.parametrize("image, message", [
    (np.zeros((4, 4), np.float32), "uint8"),
    (np.zeros((4, 4, 2), np.uint8), "uint8"),
    (np.zeros((0, 4), np.uint8), "non-empty"),
])
def test_bad_images_are_named(image: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        png.encode(image)


def test_bad_level_is_an_input_error() -> None:
    with pytest.raises(InputError, match="0..9, got 10"):
        render.encode_png(np.zeros((2, 2), np.uint8), 10)
