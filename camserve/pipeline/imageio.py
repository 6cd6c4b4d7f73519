"""Image bytes -> 8-bit RGB -> the model's float32 input, with the pixel limit enforced first.

Only JPEG, PNG, WebP and BMP are accepted, recognised by their magic bytes. Their headers
are parsed here (a few dozen bytes) so that ``width * height`` is checked against the
configured limit *before* OpenCV allocates anything: a 100 kB PNG that declares
20000 x 20000 pixels is refused without being decoded.

Decoding uses OpenCV with ``IMREAD_UNCHANGED`` (native depth and channels) and then:
EXIF orientation applied (OpenCV's unchanged mode ignores it, so it is read from the
metadata and applied here), 16-bit scaled to 8-bit (``round(v / 257)``), grayscale
replicated to three channels, alpha composited over white, channels ordered RGB.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

from camserve.errors import InputError

FORMATS = ("jpeg", "png", "webp", "bmp")
ALPHA_BACKGROUND = 255.0


class NotAnImage(InputError):
    """Bytes that are not one of the accepted image formats, or that fail to decode."""

    kind = "not_an_image"
    status = 415


class ImageTooLarge(InputError):
    """An image whose declared size exceeds the pixel limit (refused before decoding)."""

    kind = "image_too_large"
    status = 413


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, read without decoding pixels."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def sniff_format(data: bytes) -> str:
    """The format from the magic bytes; :class:`NotAnImage` if none of :data:`FORMATS`."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if not data:
        raise NotAnImage("the request body is empty (expected JPEG, PNG, WebP or BMP image bytes)")
    raise NotAnImage(f"the bytes are not a JPEG, PNG, WebP or BMP image (starts with {data[:8].hex()})")


def read_header(data: bytes) -> ImageHeader:
    """Width and height from the header of a JPEG, PNG, WebP or BMP file."""
    fmt = sniff_format(data)
    try:
        width, height = _HEADER_READERS[fmt](data)
    except (struct.error, IndexError):
        raise NotAnImage(f"the {fmt.upper()} header is truncated or malformed ({len(data)} bytes)") from None
    if width <= 0 or height <= 0:
        raise NotAnImage(f"the {fmt.upper()} header declares an empty image ({width} x {height})")
    return ImageHeader(fmt, width, height)


def _png_size(data: bytes) -> tuple[int, int]:
    if data[12:16] != b"IHDR":
        raise struct.error("no IHDR")
    return struct.unpack(">II", data[16:24])


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Walk the marker segments to the first start-of-frame (SOFn) and read its size."""
    pos = 2
    while True:
        if data[pos] != 0xFF:
            raise struct.error("marker expected")
        while data[pos] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos]
        pos += 1
        if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers carry no length
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            raise struct.error("no frame header")
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if marker in _SOF_MARKERS:
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            return width, height
        pos += length


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    body = data[20:]
    if chunk == b"VP8 ":  # lossy: 3-byte frame tag, start code, 14-bit sizes
        if body[3:6] != b"\x9d\x01\x2a":
            raise struct.error("bad VP8 start code")
        w, h = struct.unpack("<HH", body[6:10])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":  # lossless: signature byte, then 14-bit (size - 1) fields
        if body[0] != 0x2F:
            raise struct.error("bad VP8L signature")
        (bits,) = struct.unpack("<I", body[1:5])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: 24-bit (canvas size - 1) fields
        w = int.from_bytes(body[4:7], "little") + 1
        h = int.from_bytes(body[7:10], "little") + 1
        if len(body) < 10:
            raise struct.error("short VP8X")
        return w, h
    raise struct.error("unknown WebP chunk")


def _bmp_size(data: bytes) -> tuple[int, int]:
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # OS/2 BITMAPCOREHEADER
        return struct.unpack("<HH", data[18:22])
    w, h = struct.unpack("<ii", data[18:26])
    return abs(w), abs(h)  # negative height = top-down rows


_HEADER_READERS = {"png": _png_size, "jpeg": _jpeg_size, "webp": _webp_size, "bmp": _bmp_size}


def exif_orientation(exif: bytes) -> int:
    """The EXIF orientation tag (1..8) from a TIFF-structured EXIF blob; 1 if absent."""
    if exif[:6] == b"Exif\x00\x00":
        exif = exif[6:]
    try:
        endian = {b"II": "<", b"MM": ">"}[exif[:2]]
        (ifd,) = struct.unpack(endian + "I", exif[4:8])
        (count,) = struct.unpack(endian + "H", exif[ifd : ifd + 2])
        for i in range(count):
            entry = exif[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, typ = struct.unpack(endian + "HH", entry[:4])
            if tag == 0x0112 and typ == 3:
                (value,) = struct.unpack(endian + "H", entry[8:10])
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an [H, W, ...] image as EXIF orientation 1..8 says, into its upright view."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: a.swapaxes(0, 1)[:, ::-1],
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
        8: lambda a: a.swapaxes(0, 1)[::-1],
    }
    return np.ascontiguousarray(ops.get(orientation, ops[1])(image))


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """OpenCV's unchanged decode (gray, BGR or BGRA; 8 or 16 bit) -> uint8 RGB [H, W, 3].

    Stays in uint8 (OpenCV colour conversions) unless there is real transparency to blend,
    so a large opaque image costs no float copy.
    """
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)  # exact round(v / 257)
    elif image.dtype != np.uint8:
        raise NotAnImage(f"unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels in (2, 4):
        alpha = image[:, :, -1]
        if alpha.min() == 255 or alpha.max() == 0:  # opaque, or unused (32-bit BMPs often write 0)
            image = image[:, :, :-1]
        else:  # composite over a white background
            a = alpha[:, :, None].astype(np.float32) / 255.0
            blended = image[:, :, :-1].astype(np.float32) * a + ALPHA_BACKGROUND * (1.0 - a)
            image = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    raise NotAnImage(f"unsupported channel count {channels}")


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """Image bytes -> upright uint8 RGB [H, W, 3]; refuses more than ``max_pixels`` before decoding."""
    header = read_header(bytes(data[:65536]) if len(data) > 65536 else bytes(data))
    if header.pixels > max_pixels:
        raise ImageTooLarge(
            f"the {header.format.upper()} image declares {header.width} x {header.height} = {header.pixels} pixels, "
            f"more than the limit of {max_pixels}"
        )
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        image, types, metadata = cv2.imdecodeWithMetadata(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        image, types, metadata = None, [], []
    if image is None or image.size == 0:
        raise NotAnImage(f"the {header.format.upper()} image could not be decoded (truncated or corrupt, {len(data)} bytes)")
    if header.format == "jpeg" and not _jpeg_complete(data):
        raise NotAnImage(f"the JPEG image is truncated (no end-of-image marker in {len(data)} bytes)")
    orientation = 1
    for kind, blob in zip(list(types), list(metadata)):
        if kind == cv2.IMAGE_METADATA_EXIF:
            orientation = exif_orientation(np.asarray(blob, dtype=np.uint8).tobytes())
    return to_rgb8(apply_orientation(image, orientation))


def _jpeg_complete(data: bytes) -> bool:
    """libjpeg pads a truncated stream with grey and succeeds; refuse it instead.

    Marker bytes cannot occur inside entropy-coded data (0xFF is stuffed), so a complete
    file has its last end-of-image marker after its last start-of-scan marker.
    """
    data = bytes(data)
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` (``[H, W]`` or ``[H, W, C]``) at ``size`` (h, w) as the graph sees it: area
    averaging when shrinking both sides, bilinear otherwise; unchanged at that size already."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    shrink = image.shape[0] > h and image.shape[1] > w
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def preprocess(images: list[np.ndarray], input_size: tuple[int, int], mean, std, channel_order: str = "RGB") -> np.ndarray:
    """uint8 RGB [H, W, 3] images -> float32 [N, 3, h, w] for the graph.

    Each image is resized to the manifest's ``input_size`` (bilinear, area when shrinking),
    scaled to [0, 1], put in the manifest's channel order and normalised:
    ``x = (pixel / 255 - mean) / std`` per channel.
    """
    batch = np.stack([resize(img, input_size) for img in images]).astype(np.float32) / 255.0
    if channel_order == "BGR":
        batch = batch[..., ::-1]
    batch = (batch - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
