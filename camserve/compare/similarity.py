"""CAM similarity between two batches of maps: pure numpy, vectorized over the batch.

Every function takes ``a`` and ``b`` float arrays ``[N, H, W]`` (the same shape; see
:func:`match_sizes`) and returns one float64 value per pair, ``[N]``.

* Pearson: ``r = sum(da * db) / sqrt(sum(da^2) sum(db^2))`` with ``d = x - mean(x)`` over
  the ``H*W`` pixels; NaN when a map is constant (no variance, correlation undefined).
* Spearman: Pearson of the average ranks (ties share the mean of their ranks, as in
  ``scipy.stats.rankdata(method="average")``), so monotone rescalings do not matter.
* Top-region IoU: each map's region is the pixels ``>=`` its ``k``-th largest value,
  ``k = ceil(share * H*W)`` (``share`` 0.2 = the top 20 %; ties at the threshold are all
  in, so the region does not depend on sort order); ``|A & B| / |A | B|``.
* Peak distance: Euclidean distance in pixels between the two argmax positions (first in
  row-major order when several), and the same divided by the map's diagonal.
"""

from __future__ import annotations

import numpy as np

from camserve.errors import InputError

TOP_SHARE = 0.2


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 3 or a.shape != b.shape:
        raise InputError(f"CAM batches must both be [N, H, W] of one shape, got {list(a.shape)} and {list(b.shape)}")
    return a.reshape(len(a), -1), b.reshape(len(b), -1)


def _pearson_flat(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    dx = x - x.mean(axis=1, keepdims=True)
    dy = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((dx * dx).sum(axis=1) * (dy * dy).sum(axis=1))
    num = (dx * dy).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return np.clip(r, -1.0, 1.0)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Row-wise 1-based ranks of ``x`` ``[N, P]``, ties given their mean rank (float64)."""
    x = np.asarray(x)
    n, p = x.shape
    order = np.argsort(x, axis=1, kind="stable")
    s = np.take_along_axis(x, order, axis=1)
    pos = np.broadcast_to(np.arange(p), (n, p))
    new = np.ones((n, p), bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    first = np.maximum.accumulate(np.where(new, pos, 0), axis=1)  # start of each tie group
    last_new = np.ones((n, p), bool)
    last_new[:, :-1] = new[:, 1:]
    last = np.minimum.accumulate(np.where(last_new, pos, p - 1)[:, ::-1], axis=1)[:, ::-1]  # its end
    ranks = np.empty((n, p), np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=1)
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of maps over their pixels, ``[N]`` (NaN if constant)."""
    return _pearson_flat(*_pair(a, b))


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each pair (Pearson of average ranks), ``[N]``."""
    x, y = _pair(a, b)
    return _pearson_flat(average_ranks(x), average_ranks(y))


def top_regions(maps: np.ndarray, share: float = TOP_SHARE) -> np.ndarray:
    """Boolean ``[N, H*W]``: pixels at or above each map's ``ceil(share * H*W)``-th largest value."""
    if not 0.0 < share <= 1.0:
        raise InputError(f"the top-region share must be in (0, 1], got {share}")
    flat = np.asarray(maps, np.float64).reshape(len(maps), -1)
    p = flat.shape[1]
    k = max(1, int(np.ceil(share * p)))
    thr = np.partition(flat, p - k, axis=1)[:, p - k]
    return flat >= thr[:, None]


def top_iou(a: np.ndarray, b: np.ndarray, share: float = TOP_SHARE) -> np.ndarray:
    """IoU of the two maps' top-``share`` regions, ``[N]`` in [0, 1]."""
    _pair(a, b)
    ra, rb = top_regions(a, share), top_regions(b, share)
    inter = (ra & rb).sum(axis=1)
    union = (ra | rb).sum(axis=1)
    return inter / np.maximum(union, 1)


def peaks(maps: np.ndarray) -> np.ndarray:
    """``[N, 2]`` int (x, y) of each map's maximum (first one in row-major order)."""
    maps = np.asarray(maps)
    idx = maps.reshape(len(maps), -1).argmax(axis=1)
    y, x = np.divmod(idx, maps.shape[2])
    return np.stack([x, y], axis=1)


def peak_distance(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, share of the diagonal) between the two maps' peaks, each ``[N]``."""
    _pair(a, b)
    d = np.linalg.norm((peaks(a) - peaks(b)).astype(np.float64), axis=1)
    h, w = np.asarray(a).shape[1:]
    return d, d / float(np.hypot(h - 1, w - 1) or 1.0)


def match_sizes(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bring two ``[N, H, W]`` batches to one size (the smaller one's, bilinear) when they differ."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[1:] == b.shape[1:]:
        return a, b
    from camserve.pipeline.render import resize_maps

    a, b = a.astype(np.float32), b.astype(np.float32)

    ha, wa = a.shape[1:]
    hb, wb = b.shape[1:]
    size = (min(ha, hb), min(wa, wb))
    return (a if a.shape[1:] == size else resize_maps(a, size)), (b if b.shape[1:] == size else resize_maps(b, size))


def similarity(a: np.ndarray, b: np.ndarray, share: float = TOP_SHARE) -> dict[str, np.ndarray]:
    """Every measure at once: ``pearson``, ``spearman``, ``iou``, ``peak_px``, ``peak_norm`` (each ``[N]``)."""
    a, b = match_sizes(a, b)
    px, norm = peak_distance(a, b)
    return {"pearson": pearson(a, b), "spearman": spearman(a, b), "iou": top_iou(a, b, share),
            "peak_px": px, "peak_norm": norm}
