"""Scaling, resizing and multi-layer combination of raw CAMs, as pytorch-grad-cam does it.

Per target layer ``l`` a raw map ``m_l`` ``[N, h_l, w_l]`` becomes::

    s_l = resize(minmax(relu(m_l)))          # minmax(x) = (x - min x) / (1e-7 + max(x - min x))
    cam = minmax(mean_l relu(s_l))           # [N, H, W], float32, in [0, 1]

``resize`` is OpenCV's ``INTER_LINEAR`` (half-pixel centres). Bilinear interpolation is
separable and linear, so it is computed as ``R_v @ m @ R_w`` with two small matrices
*built by cv2.resize itself* from identity matrices (cached per shape): one batched matmul
instead of one cv2 call per image, equal to per-image ``cv2.resize`` up to float rounding.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

EPS = 1e-7


@lru_cache(maxsize=64)
def cv2_linear_matrices(src: tuple[int, int], dst: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(R_v [H, h], R_w [w, W])`` such that ``R_v @ m @ R_w == cv2.resize(m, (W, H))``.

    Resizing the identity ``I_w`` along its columns to width ``W`` gives each input
    column's weight in each output column, i.e. ``R_w``; likewise for the rows.
    """
    (h, w), (big_h, big_w) = src, dst
    r_w = cv2.resize(np.eye(w, dtype=np.float64), (big_w, w), interpolation=cv2.INTER_LINEAR)
    r_v = cv2.resize(np.eye(h, dtype=np.float64), (h, big_h), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(r_v, dtype=np.float32), np.ascontiguousarray(r_w.reshape(w, big_w), dtype=np.float32)


@lru_cache(maxsize=64)
def align_corners_matrices(src: tuple[int, int], dst: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear ``align_corners=True`` resize matrices ``(R_v [H, h], R_w [w, W])``.

    Output pixel ``d`` samples input coordinate ``d * (n_in - 1) / (n_out - 1)``; this is
    ``torch.nn.UpsamplingBilinear2d``, which pytorch-grad-cam's ScoreCAM uses for masks.
    """

    def axis(n_in: int, n_out: int) -> np.ndarray:
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        pos = np.arange(n_out, dtype=np.float64) * scale
        lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = pos - lo
        mat = np.zeros((n_out, n_in), dtype=np.float64)
        np.add.at(mat, (np.arange(n_out), lo), 1.0 - frac)
        np.add.at(mat, (np.arange(n_out), hi), frac)
        return mat

    (h, w), (big_h, big_w) = src, dst
    return axis(h, big_h).astype(np.float32), np.ascontiguousarray(axis(w, big_w).T, dtype=np.float32)


def resize_maps(maps: np.ndarray, size: tuple[int, int], *, align_corners: bool = False) -> np.ndarray:
    """Resize ``[..., h, w]`` maps to ``[..., H, W]`` (``size = (H, W)``) in one batched matmul."""
    src = (maps.shape[-2], maps.shape[-1])
    if src == tuple(size):
        return np.array(maps, dtype=np.float32, copy=True)
    build = align_corners_matrices if align_corners else cv2_linear_matrices
    r_v, r_w = build(src, (int(size[0]), int(size[1])))
    return np.matmul(np.matmul(r_v, maps.astype(np.float32, copy=False)), r_w)


def minmax(maps: np.ndarray) -> np.ndarray:
    """Per-map ``(x - min) / (1e-7 + max(x - min))`` over the last two axes (float32)."""
    maps = maps.astype(np.float32, copy=True)
    maps -= maps.min(axis=(-2, -1), keepdims=True)
    maps /= EPS + maps.max(axis=(-2, -1), keepdims=True)
    return maps


def scale_layer(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One layer's raw CAMs ``[N, h, w]`` -> ReLU, min-max, resize to ``size`` ``[N, H, W]``."""
    return resize_maps(minmax(np.maximum(raw, 0)), size)


def combine_layers(raw_per_layer: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Raw per-layer CAMs -> final ``[N, H, W]`` float32 CAMs in [0, 1] (see module doc).

    One layer (the common case) skips the stack, ReLU and mean: its scaled map is already
    >= 0 (bilinear weights are) and the mean of one value is that value, so the result is
    the same to the bit without three full-size copies."""
    if len(raw_per_layer) == 1:
        return minmax(scale_layer(raw_per_layer[0], size))
    scaled = np.stack([scale_layer(raw, size) for raw in raw_per_layer], axis=1)
    return minmax(np.maximum(scaled, 0).mean(axis=1))
