"""Output forms of a CAM: grayscale PNG, coloured overlay, float16 array (its log summary:
:mod:`camserve.pipeline.summary`).

Every function takes CAMs the way the CAM core returns them: ``float32`` of shape
``N x H x W`` with values in ``[0, 1]``. Array work is batched (one NumPy/OpenCV call per
batch); only the final encoders run once per map, because each map becomes its own byte
string. ``python -m camserve.pipeline.render`` prints the cost of each form per 224 x 224 map.

PNG settings, chosen by measurement (``measure()``; 224 x 224 maps, 2-core box): deflate
level 1 with the fixed SUB row filter. CAMs are smooth, so SUB turns each row into small
deltas that level 1 already packs well: with zlib ~0.5 ms and ~9 KB per map, against ~1 ms /
12 KB for level 1 with libpng's adaptive filter choice, ~3 ms / 9 KB for level 6 and ~20 ms
for level 9; ISA-L's level 1 (:mod:`camserve.pipeline.png`) then cut it to ~0.06 ms and
~7.5 KB. On the request path CPU is scarce and loopback bytes are cheap, so faster wins.
Overlays are photographs plus colour: PNG costs ~3.5 ms and ~100 KB per map there, JPEG
(quality 90) ~0.2 ms and ~14 KB, hence JPEG is the overlay default.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from camserve.cam import parallel
from camserve.errors import InputError
from camserve.pipeline import png

#: Deflate level of PNGs written on the request path (see the module docstring; rows are
#: SUB-filtered: :mod:`camserve.pipeline.png`).
PNG_COMPRESSION = 1
#: Values this far outside [0, 1] are float noise (resize, normalization) and are clipped.
RANGE_TOLERANCE = 1e-5

ImageFormat = Literal["png", "jpeg"]


# ---------------------------------------------------------------- validation ---------


def check_cams(cams: Any, name: str = "cams") -> np.ndarray:
    """Return ``cams`` as C-contiguous float32 ``N x H x W`` in [0, 1], or raise InputError."""
    if not isinstance(cams, np.ndarray):
        raise InputError(f"{name} must be a numpy array, got {type(cams).__name__}")
    if cams.ndim != 3 or 0 in cams.shape:
        raise InputError(f"{name} must have shape [N, H, W] with no empty dimension, got {list(cams.shape)}")
    if cams.dtype.kind != "f":
        raise InputError(f"{name} must be a floating array (float32), got dtype {cams.dtype}")
    lo, hi = float(cams.min()), float(cams.max())  # NaN propagates and fails the test below
    if not (lo >= -RANGE_TOLERANCE and hi <= 1.0 + RANGE_TOLERANCE):
        raise InputError(f"{name} must lie in [0, 1], got values in [{lo}, {hi}]")
    out = np.ascontiguousarray(cams, dtype=np.float32)
    if lo < 0.0 or hi > 1.0:
        out = np.clip(out, 0.0, 1.0)
    return out


def check_image(image: Any, name: str = "image") -> np.ndarray:
    """Return ``image`` as uint8 RGB ``H x W x 3`` (contiguous), or raise InputError."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise InputError(f"{name} must be an RGB image of shape [H, W, 3], got {list(image.shape)}")
    if image.dtype != np.uint8:
        raise InputError(f"{name} must have dtype uint8, got {image.dtype}")
    return np.ascontiguousarray(image)


def colormap_id(colormap: str | int) -> int:
    """OpenCV colour-map constant from a name (``"jet"``, ``"turbo"``, ...) or an id."""
    if isinstance(colormap, (int, np.integer)) and not isinstance(colormap, bool):
        if 0 <= int(colormap) <= 21:
            return int(colormap)
    elif isinstance(colormap, str):
        value = getattr(cv2, f"COLORMAP_{colormap.upper()}", None)
        if isinstance(value, int):
            return value
    names = sorted(n[9:].lower() for n in dir(cv2) if n.startswith("COLORMAP_"))
    raise InputError(f"unknown colormap {colormap!r}; known: {', '.join(names)}")


# ---------------------------------------------------------------- heatmap PNG --------


def to_uint8(cams: np.ndarray) -> np.ndarray:
    """Quantize ``N x H x W`` maps in [0, 1] to uint8 (``round(255 * v)``)."""
    cams = check_cams(cams)
    return np.rint(cams * 255.0).astype(np.uint8)


def encode_png(image: np.ndarray, compression: int = PNG_COMPRESSION) -> bytes:
    """PNG bytes of a uint8 image: ``H x W`` grayscale or ``H x W x 3`` RGB."""
    try:
        return png.encode(np.ascontiguousarray(image), int(compression))
    except ValueError as exc:
        raise InputError(str(exc)) from None


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a uint8 RGB ``H x W x 3`` image (``quality`` in 1..100)."""
    if not 1 <= quality <= 100:
        raise InputError(f"JPEG quality must be in 1..100, got {quality}")
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover
        raise InputError(f"JPEG encoding failed for an image of shape {list(image.shape)}")
    return buf.tobytes()


def encode_image(image: np.ndarray, fmt: ImageFormat = "png", *, quality: int = 90,
                 compression: int = PNG_COMPRESSION) -> bytes:
    """Encode a uint8 RGB (or grayscale) image as ``"png"`` or ``"jpeg"``."""
    if fmt == "png":
        return encode_png(image, compression)
    if fmt in ("jpeg", "jpg"):
        return encode_jpeg(image, quality)
    raise InputError(f"unknown image format {fmt!r}; expected 'png' or 'jpeg'")


def decode_image(data: bytes, *, grayscale: bool = False) -> np.ndarray:
    """Decode PNG/JPEG bytes to uint8 RGB ``H x W x 3`` (or ``H x W`` when ``grayscale``)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(f"{len(data)} bytes are not a decodable image")
    return img if grayscale else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def heatmap_png(cams: np.ndarray, compression: int = PNG_COMPRESSION) -> list[bytes]:
    """One 8-bit grayscale PNG per map: pixel = ``round(255 * cam)``; on the request's
    threads (``camserve.cam.parallel``: OpenCV's encoder releases the GIL; 8 maps 4.9 -> 3.3 ms
    on 2 threads)."""
    return parallel.map_items(functools.partial(encode_png, compression=compression), list(to_uint8(cams)))


# ---------------------------------------------------------------- overlays -----------


def resize_maps(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize float32 ``N x h x w`` maps to ``N x H x W`` (``size = (H, W)``).

    OpenCV resizes every channel of an ``h x w x C`` image in one call, so the batch is
    moved to the channel axis (in chunks of 512, OpenCV's channel limit).
    """
    n, h, w = cams.shape
    if (h, w) == tuple(size):
        return cams
    out = np.empty((n, size[0], size[1]), dtype=np.float32)
    for start in range(0, n, 512):  # one iteration up to N = 512
        chunk = np.ascontiguousarray(cams[start : start + 512].transpose(1, 2, 0), dtype=np.float32)
        res = cv2.resize(chunk, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        out[start : start + 512] = res.reshape(size[0], size[1], -1).transpose(2, 0, 1)
    return out


def colorize(cams: np.ndarray, colormap: str | int = "jet") -> np.ndarray:
    """Colour maps ``N x H x W`` -> uint8 RGB ``N x H x W x 3`` (one applyColorMap call)."""
    u8 = to_uint8(cams)
    n, h, w = u8.shape
    bgr = cv2.applyColorMap(u8.reshape(n * h, w), colormap_id(colormap))
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).reshape(n, h, w, 3)


def overlay_batch(images: np.ndarray, cams: np.ndarray, *, colormap: str | int = "jet",
                  weight: float = 0.5) -> np.ndarray:
    """Blend coloured CAMs onto same-size images.

    ``images`` uint8 RGB ``N x H x W x 3``; ``cams`` ``N x h x w`` (resized to ``H x W``).
    ``out = round((1 - weight) * image + weight * colormap(cam))``; ``weight`` in [0, 1]
    is the heatmap's share. Returns uint8 RGB ``N x H x W x 3``.
    """
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        desc = f"shape {list(images.shape)} dtype {images.dtype}" if isinstance(images, np.ndarray) else type(images).__name__
        raise InputError(f"images must be uint8 RGB of shape [N, H, W, 3], got {desc}")
    cams = check_cams(cams)
    if cams.shape[0] != images.shape[0]:
        raise InputError(f"{cams.shape[0]} cams for {images.shape[0]} images")
    if not 0.0 <= weight <= 1.0:
        raise InputError(f"overlay weight must be in [0, 1], got {weight}")
    n, h, w, _ = images.shape
    heat = colorize(resize_maps(cams, (h, w)), colormap)
    flat = cv2.addWeighted(np.ascontiguousarray(images).reshape(n * h, w * 3), 1.0 - weight,
                           heat.reshape(n * h, w * 3), weight, 0.0)
    return flat.reshape(n, h, w, 3)


def overlay(image: np.ndarray, cam: np.ndarray, *, colormap: str | int = "jet", weight: float = 0.5) -> np.ndarray:
    """One image (uint8 RGB ``H x W x 3``, any size) with one ``h x w`` CAM blended on it."""
    image = check_image(image)
    if not isinstance(cam, np.ndarray) or cam.ndim != 2:
        raise InputError(f"cam must be a 2-d [H, W] array, got {getattr(cam, 'shape', type(cam).__name__)}")
    return overlay_batch(image[None], cam[None], colormap=colormap, weight=weight)[0]


def overlay_bytes(image: np.ndarray, cam: np.ndarray, fmt: ImageFormat = "jpeg", *, colormap: str | int = "jet",
                  weight: float = 0.5, quality: int = 90, compression: int = PNG_COMPRESSION) -> bytes:
    """``overlay`` encoded as PNG or JPEG (``quality`` for JPEG, ``compression`` for PNG)."""
    return encode_image(overlay(image, cam, colormap=colormap, weight=weight), fmt,
                        quality=quality, compression=compression)


# ---------------------------------------------------------------- raw float16 --------


@dataclass(frozen=True)
class RawMaps:
    """CAMs as little-endian float16 bytes (half the size of float32, error <= 2.5e-4 in [0, 1])."""

    data: bytes
    shape: tuple[int, ...]
    dtype: str = "float16"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form: ``{"data": base64, "shape": [...], "dtype": "<f2"}``."""
        return {"data": base64.b64encode(self.data).decode("ascii"), "shape": list(self.shape), "dtype": "<f2"}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RawMaps:
        try:
            data = base64.b64decode(obj["data"], validate=True)
            shape = tuple(int(s) for s in obj["shape"])
            dtype = str(obj.get("dtype", "<f2"))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"raw CAM payload is malformed: {exc!r}") from exc
        if dtype not in ("<f2", "float16"):
            raise InputError(f"raw CAM payload dtype must be '<f2', got {dtype!r}")
        return cls(data=data, shape=shape)


def to_float16(cams: np.ndarray) -> RawMaps:
    """Pack ``N x H x W`` CAMs as float16 bytes plus their shape."""
    cams = check_cams(cams)
    return RawMaps(data=cams.astype("<f2").tobytes(), shape=tuple(cams.shape))


def from_float16(raw: RawMaps | dict[str, Any]) -> np.ndarray:
    """Unpack :func:`to_float16`'s output (or its JSON form) back to float32 ``N x H x W``."""
    if isinstance(raw, dict):
        raw = RawMaps.from_json(raw)
    count = int(np.prod(raw.shape)) if raw.shape else 0
    if len(raw.data) != 2 * count:
        raise InputError(f"raw CAM payload has {len(raw.data)} bytes, shape {list(raw.shape)} needs {2 * count}")
    return np.frombuffer(raw.data, dtype="<f2").astype(np.float32).reshape(raw.shape)


# ---------------------------------------------------------------- cost ---------------


def measure(n: int = 8, size: int = 224, repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Milliseconds per ``size x size`` map for each output form (best of ``repeats``).

    Maps are smooth (upsampled 7 x 7 grids, like a ResNet CAM); overlay images are smooth
    colour fields plus pixel noise (harder to compress than most photographs).
    """
    import time

    from camserve.pipeline.summary import summarize

    rng = np.random.default_rng(seed)
    low = rng.random((n, 7, 7), dtype=np.float32)
    cams = resize_maps(low, (size, size))
    cams = (cams - cams.min()) / (cams.max() - cams.min())
    base = cv2.resize(rng.integers(0, 256, (n * 16, 16, 3), dtype=np.uint8), (size, n * size))
    images = cv2.add(base, rng.integers(0, 16, base.shape, dtype=np.uint8)).reshape(n, size, size, 3)
    jobs: dict[str, Any] = {
        f"resize 7->{size} + uint8": lambda: to_uint8(resize_maps(low, (size, size))),
        "heatmap png (level 1, SUB)": lambda: heatmap_png(cams),
        "heatmap png (level 6, SUB)": lambda: heatmap_png(cams, 6),
        "overlay blend only": lambda: overlay_batch(images, cams),
        "overlay + png": lambda: [encode_png(o) for o in overlay_batch(images, cams)],
        "overlay + jpeg q90": lambda: [encode_jpeg(o) for o in overlay_batch(images, cams)],
        "float16 + base64": lambda: to_float16(cams).to_json(),
        "summary + dicts": lambda: summarize(cams, (size, size)).as_dicts(),
    }
    result = {}
    for name, job in jobs.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            job()
            times.append(time.perf_counter() - t0)
        result[name] = 1000.0 * min(times) / n
    return result


if __name__ == "__main__":
    print("camserve.pipeline.render: ms per 224 x 224 map (batch of 8, best of 5)")  # measure() defaults
    for key, value in measure().items():
        print(f"  {key:28s} {value:7.3f}")
