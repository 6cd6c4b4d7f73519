"""PNG files of 8-bit images: rows SUB-filtered in numpy, deflated by ISA-L.

Every answer carries its heatmaps as PNG, so the encoder is on the request path: at batch 1
on resnet50, OpenCV's ``imencode`` (zlib, level 1, SUB filter) took 0.2-0.4 ms for one
224 x 224 map, about a third of a gradient method's whole post-processing. ISA-L's level-1
deflate (``isal``, Intel's Intelligent Storage Acceleration Library) does the same stream in
0.06 ms, and smaller on heatmaps (7.4 against 8.3 kB). The file around it is the minimal
PNG: signature, ``IHDR``, one ``IDAT`` holding a zlib stream, ``IEND`` (ISO/IEC 15948).

Filter: every row is SUB-filtered (type 1: each byte minus the byte one pixel to its left,
modulo 256), which suits smooth maps and costs one vectorized subtraction; OpenCV was given
the same filter before.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from isal import isal_zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour types by channel count: grayscale (0), RGB (2)
COLOR_TYPES = {1: 0, 3: 2}
#: ``compression`` levels that ISA-L serves (its 1..3); 0 is stored, 4..9 go to zlib
ISAL_LEVELS = range(1, 4)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def sub_filtered(image: np.ndarray) -> np.ndarray:
    """The scanlines PNG compresses: ``[H, 1 + W * C]`` uint8, each row its filter byte (1,
    SUB) followed by ``x[i] - x[i - C]`` (the first pixel as it is)."""
    h, w = image.shape[:2]
    row = image.reshape(h, -1)
    bpp = row.shape[1] // w if w else 1
    out = np.empty((h, 1 + row.shape[1]), np.uint8)
    out[:, 0] = 1
    out[:, 1 : 1 + bpp] = row[:, :bpp]
    np.subtract(row[:, bpp:], row[:, :-bpp], out=out[:, 1 + bpp :])
    return out


def deflate(data: np.ndarray | bytes, level: int) -> bytes:
    """A zlib stream of ``data`` at ``level`` (0..9): 0 stored, 1..3 ISA-L, 4..9 zlib."""
    if level in ISAL_LEVELS:
        return isal_zlib.compress(data, level)
    return zlib.compress(data, level)


def encode(image: np.ndarray, level: int = 1) -> bytes:
    """PNG bytes of a C-contiguous uint8 ``H x W`` (grayscale) or ``H x W x 3`` (RGB) image."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in COLOR_TYPES):
        raise ValueError(f"PNG encoding needs uint8 [H, W] or [H, W, 3], got {image.dtype} {list(image.shape)}")
    if 0 in image.shape:
        raise ValueError(f"PNG encoding needs a non-empty image, got shape {list(image.shape)}")
    if not 0 <= level <= 9:
        raise ValueError(f"PNG compression must be in 0..9, got {level}")
    h, w = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    header = struct.pack(">IIBBBBB", w, h, 8, COLOR_TYPES[channels], 0, 0, 0)
    return b"".join((SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", deflate(sub_filtered(image), level)),
                     _chunk(b"IEND", b"")))
