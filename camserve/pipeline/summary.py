"""The summary of a CAM that answers and logs carry: peak, top-mass box, mass share, entropy.

Batched over maps (``float32`` ``N x H x W`` in ``[0, 1]``, as the CAM core returns them),
with no Python loop over images; coordinates are mapped to the input image's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from camserve.errors import InputError
from camserve.pipeline.render import check_cams

#: Share of the total mass that the summary's "top set" must reach.
TOP_MASS = 0.2


@dataclass(frozen=True)
class Summary:
    """Per-map statistics for logs, batched (arrays with leading dimension N).

    Coordinates are integer pixels of the *input image* ((x, y), x to the right), boxes are
    inclusive ``[x0, y0, x1, y1]``. A map whose mass is zero has ``empty = True``; its peak
    and box are ``-1`` and its entropies ``NaN`` (``as_dicts`` turns them into ``None``).
    """

    peak: np.ndarray            # int64 [N, 2]: (x, y) of the maximum (first in raster order on ties)
    box: np.ndarray             # int64 [N, 4]: bounding box of the top-mass set
    box_mass: np.ndarray        # float64 [N]: share of the total mass inside ``box``
    box_area: np.ndarray        # float64 [N]: box area / map area
    entropy_bits: np.ndarray    # float64 [N]: -sum p log2 p, p = cam / sum(cam)
    entropy_norm: np.ndarray    # float64 [N]: entropy_bits / log2(H * W), in [0, 1]
    empty: np.ndarray           # bool [N]
    top_mass: float = TOP_MASS

    def as_dicts(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per map (``None`` for the peak, box and entropies of an empty map)."""
        out = []
        for i, empty in enumerate(self.empty.tolist()):
            out.append({
                "peak": None if empty else self.peak[i].tolist(),
                "box": None if empty else self.box[i].tolist(),
                "box_mass": round(float(self.box_mass[i]), 6),
                "box_area": round(float(self.box_area[i]), 6),
                "entropy_bits": None if empty else round(float(self.entropy_bits[i]), 6),
                "entropy_norm": None if empty else round(float(self.entropy_norm[i]), 6),
                "top_mass": self.top_mass,
                "empty": empty,
            })
        return out


def summarize(cams: np.ndarray, image_size: tuple[int, int] | None = None, top_mass: float = TOP_MASS) -> Summary:
    """Peak, top-mass box, mass share and entropy of each map, vectorized over the batch.

    Definitions, for one map ``c`` of ``H x W`` pixels with total mass ``M = sum(c) > 0``:

    - peak: ``argmax c`` (ties: the first in row-major order).
    - top-mass set: the smallest *superlevel set* ``S = {p : c[p] >= t}`` with
      ``sum_S c >= top_mass * M`` (up to 1e-6 M of float rounding). Equivalently: sort
      values in decreasing order, take the first ``k`` whose running sum reaches
      ``top_mass * M``, set ``t`` to the k-th value and keep every pixel ``>= t`` (ties are
      all in or all out, so the set does not depend on pixel order). ``box`` is the
      bounding box of ``S``.
    - box_mass: ``sum(c inside box) / M`` (>= top_mass, more when the box holds other mass).
    - entropy: ``p = c / M``, ``H = -sum p log2 p`` bits (0 log 0 = 0); normalized by
      ``log2(H * W)``, so a uniform map gives 1 and a single hot pixel 0.

    ``image_size = (height, width)`` of the input image maps coordinates from the CAM grid
    to image pixels (CAM pixel ``x`` covers image span ``[x * sx, (x + 1) * sx)``): the peak
    becomes ``floor((x + 0.5) * sx)``, a box ``[floor(x0 * sx), ceil((x1 + 1) * sx) - 1]``.
    """
    cams = check_cams(cams)
    if not 0.0 < top_mass <= 1.0:
        raise InputError(f"top_mass must be in (0, 1], got {top_mass}")
    n, h, w = cams.shape
    flat = cams.reshape(n, h * w)
    total = flat.sum(axis=1, dtype=np.float64)
    empty = total <= 0.0
    safe_total = np.where(empty, 1.0, total)
    b = np.arange(n)

    peak_idx = flat.argmax(axis=1)
    peak = np.stack([peak_idx % w, peak_idx // w], axis=1)

    # Threshold t of the top-mass superlevel set. With values sorted ascending, a_0..a_{m-1},
    # and C_i = a_0 + ... + a_i, the top j values hold M - C_{m-j-1}; that reaches
    # top_mass * M once C_{m-j-1} <= (1 - top_mass) * M, so the smallest such set starts at
    # index count(C <= (1 - top_mass) * M).
    asc = np.sort(flat, axis=1)
    first = np.minimum(_count_prefix_at_most(asc, 1.0 - top_mass), h * w - 1)
    threshold = asc[b, first]
    mask = (cams >= threshold[:, None, None]) & ~empty[:, None, None]
    rows, cols = mask.any(axis=2), mask.any(axis=1)
    y0, y1 = rows.argmax(axis=1), h - 1 - rows[:, ::-1].argmax(axis=1)
    x0, x1 = cols.argmax(axis=1), w - 1 - cols[:, ::-1].argmax(axis=1)

    row_in = ((np.arange(h) >= y0[:, None]) & (np.arange(h) <= y1[:, None])).astype(np.float32)
    col_in = ((np.arange(w) >= x0[:, None]) & (np.arange(w) <= x1[:, None])).astype(np.float32)
    inside = (np.einsum("nhw,nh->nw", cams, row_in).astype(np.float64) * col_in).sum(axis=1)
    box_mass = np.where(empty, 0.0, np.minimum(inside / safe_total, 1.0))
    box_area = np.where(empty, 0.0, (x1 - x0 + 1) * (y1 - y0 + 1) / float(h * w))

    # H = -sum (c/M) log2 (c/M) = log2 M - sum(c log2 c) / M; c = 0 contributes 0 * finite = 0.
    c_log_c = (flat * np.log2(np.maximum(flat, np.float32(1e-30)))).sum(axis=1, dtype=np.float64)
    entropy = np.log2(safe_total) - c_log_c / safe_total
    norm = entropy / np.log2(h * w) if h * w > 1 else np.zeros(n)
    entropy = np.where(empty, np.nan, np.maximum(entropy, 0.0))
    norm = np.where(empty, np.nan, np.clip(norm, 0.0, 1.0))

    box = np.stack([x0, y0, x1, y1], axis=1)
    if image_size is not None:
        ih, iw = _check_size(image_size)
        sx, sy = iw / w, ih / h
        peak = np.stack([np.floor((peak[:, 0] + 0.5) * sx), np.floor((peak[:, 1] + 0.5) * sy)], axis=1)
        box = np.stack([np.floor(x0 * sx), np.floor(y0 * sy),
                        np.ceil((x1 + 1) * sx - 1e-9) - 1, np.ceil((y1 + 1) * sy - 1e-9) - 1], axis=1)
    peak = np.where(empty[:, None], -1, peak).astype(np.int64)
    box = np.where(empty[:, None], -1, box).astype(np.int64)
    return Summary(peak=peak, box=box, box_mass=box_mass, box_area=box_area, entropy_bits=entropy,
                   entropy_norm=norm, empty=empty, top_mass=float(top_mass))


def _count_prefix_at_most(asc: np.ndarray, share: float, block: int = 256) -> np.ndarray:
    """Per row of nonnegative ascending ``asc``: how many prefix sums are <= share * row sum.

    Blocked prefix sums: float32 within blocks of ``block`` values, float64 across blocks,
    which is as exact as a float64 running sum at a third of its cost (no 8-byte copy of the
    whole batch). The front is padded with zeros (which keep the order) to whole blocks.
    """
    n, m = asc.shape
    pad = (-m) % block
    if pad:
        asc = np.concatenate([np.zeros((n, pad), dtype=np.float32), asc], axis=1)
    local = np.cumsum(asc.reshape(n, -1, block), axis=2)
    block_sums = local[:, :, -1].astype(np.float64)
    offsets = np.cumsum(block_sums, axis=1) - block_sums
    limit = (share + 1e-6) * block_sums.sum(axis=1)  # float32 partial sums: allow 1e-6 M
    rhs = (limit[:, None] - offsets).astype(np.float32)
    return (local <= rhs[:, :, None]).sum(axis=(1, 2)) - pad


def _check_size(size: Any) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise InputError(f"image_size must be (height, width), got {size!r}") from exc
    if h <= 0 or w <= 0:
        raise InputError(f"image_size must be positive, got {size!r}")
    return h, w
