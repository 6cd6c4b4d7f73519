"""The aggregate view: each side's mean map per method over the image set.

Only inputs where both sides have a map count (so A and B are averaged over the same
inputs). Maps of other sizes are resized (bilinear) to the most common size among them
before averaging. The two means are compared with the per-input measures of
:mod:`.similarity`, which shows whether B looks, on the whole, where A looks.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from camserve.compare.data import Pair
from camserve.compare.similarity import TOP_SHARE, similarity


def _mean_at(maps: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Mean of ``maps`` (``[H, W]`` each) at ``size``: one resize call per distinct map size."""
    from camserve.pipeline.render import resize_maps

    total = np.zeros(size, np.float64)
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for cam in maps:
        groups.setdefault(cam.shape, []).append(cam)
    for shape, group in groups.items():
        stack = np.stack(group).astype(np.float32)
        total += (stack if shape == size else resize_maps(stack, size)).sum(axis=0, dtype=np.float64)
    return total / len(maps)


def mean_maps(pairs: list[Pair], method: str) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(mean map of A, mean map of B, inputs averaged) for ``method``, or None when no input
    has a map on both sides (an audit log without stored heatmaps)."""
    both = [(p.a.cams.get(method), p.b.cams.get(method)) for p in pairs]
    both = [(a, b) for a, b in both if a is not None and b is not None]
    if not both:
        return None
    size = Counter(m.shape for pair in both for m in pair).most_common(1)[0][0]
    return _mean_at([a for a, _ in both], size), _mean_at([b for _, b in both], size), len(both)


def aggregate(pairs: list[Pair], methods: list[str], share: float = TOP_SHARE) -> dict[str, dict[str, Any]]:
    """``{method: {"n", "size", "max_a", "max_b", "pearson", "spearman", "iou", "peak_px"}}``
    of the two mean maps (``max_*``: each mean's highest value; raw floats, NaN where
    undefined); methods without maps on both sides are left out."""
    out = {}
    for m in methods:
        means = mean_maps(pairs, m)
        if means is None:
            continue
        a, b, n = means
        sim = similarity(a[None], b[None], share)
        out[m] = {"n": n, "size": list(a.shape), "max_a": float(a.max()), "max_b": float(b.max()),
                  **{k: float(sim[k][0]) for k in ("pearson", "spearman", "iou", "peak_px")}}
    return out
