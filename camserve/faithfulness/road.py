"""ROAD's perturbation: remove a share of pixels by a CAM's order and impute them linearly.

ROAD (Remove And Debias, Rong et al. 2022, arXiv 2202.00449; pytorch-grad-cam's
``metrics/road.py``) removes pixels and fills each removed pixel with the weighted mean of
its 8 neighbours (4-neighbours 1/6, diagonals 1/12; outside the image a neighbour is left
out and its weight with it), so the removal leaves no sharp edge the model could react to.
The removed pixels of one mask are the unknowns of one sparse linear system ``A x = b``::

    A[i, i] = -sum of the in-image neighbour weights of i
    A[i, j] = w_ij           for a removed neighbour j
    b[i]    = -sum_j w_ij v_j for a kept neighbour j with value v_j     (one column per channel)

``-A`` is symmetric and diagonally dominant, strictly wherever a kept pixel is next door;
with at least one kept pixel it is positive definite, so it needs no pivoting. Each mask's
system is factorized once (SuperLU through ``scipy.sparse.linalg.splu``, no pivoting) and
solved for every channel; masks are solved on a thread pool (SuperLU releases the GIL).
The unknowns are numbered in a nested-dissection order of the pixel grid (computed once
per image size, :func:`grid_rank`): a row or column of pixels separates the 8-neighbour
stencil, and numbering separators last keeps the factor's fill near ``n log n``. Restricted
to any mask's pixels the order is still a nested dissection, and it factorizes 1.1-1.7x
faster than SuperLU's or qdldl's minimum-degree orderings at 224 px. Gaussian noise (std
``noise`` in normalized units) is added to the imputed pixels only.

Which pixels go (:func:`keep_masks`): at percentile ``p``, MoRF keeps the ``p`` % of pixels
with the lowest CAM values (so ``100 - p`` % of the most relevant are removed); LeRF keeps
the ``p`` % with the highest (the least relevant are removed).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

#: (row offset, column offset, weight) of the 8 neighbours in the imputation.
NEIGHBOURS: tuple[tuple[int, int, float], ...] = (
    (-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12),
    (0, -1, 1 / 6), (0, 1, 1 / 6),
    (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12),
)
#: Percentiles of ROADCombined (share of pixels kept, in percent).
PERCENTILES: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)
#: Noise std added to imputed pixels, in normalized input units (pytorch-grad-cam's).
NOISE = 0.01


def kept_count(pixels: int, percentile: int) -> int:
    """Pixels kept at ``percentile`` out of ``pixels``: as many as ``values < np.percentile(values, p)``
    keeps when no two values tie (``ceil((pixels - 1) * p / 100)``)."""
    return -(-(pixels - 1) * int(percentile) // 100)


def removal_rank(cams: np.ndarray, most_relevant_first: bool, seed: int = 0) -> np.ndarray:
    """Each pixel's rank int64 ``[R, H, W]`` in the order pixels are kept (0 = kept first).

    MoRF keeps the lowest CAM values first, LeRF the lowest ``1 - cam`` (both in float32, as
    the maps are). Ties are broken by a fixed pseudo-random order of the pixels (``seed``),
    so that among equal values the kept ones are scattered over the image.
    """
    values = np.asarray(cams, dtype=np.float32)
    if not most_relevant_first:
        values = np.float32(1.0) - values
    r, pixels = len(values), values[0].size if len(values) else 0
    flat = values.reshape(r, pixels)
    tie_break = np.random.default_rng(seed).random(pixels)
    order = np.lexsort((np.broadcast_to(tie_break, flat.shape), flat), axis=-1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(pixels)[None, :], axis=1)
    return rank.reshape(values.shape)


def keep_masks(cams: np.ndarray, percentile: int, most_relevant_first: bool, seed: int = 0) -> np.ndarray:
    """Pixels kept at ``percentile``: bool ``[R, H, W]`` from maps ``[R, H, W]`` in [0, 1]:
    the :func:`kept_count` pixels of lowest :func:`removal_rank`.

    Where no two values tie this is pytorch-grad-cam's ``cam < np.percentile(cam, p)``. Where
    they do, it is not, on purpose: a ReLU'd map (GradCAM) is exactly 0 on much of the image,
    and when more than ``p`` % of it is 0 that threshold keeps no pixel at all, which leaves
    the imputation without data (a singular system: NaN scores in pytorch-grad-cam).
    """
    rank = removal_rank(cams, most_relevant_first, seed)
    return rank < kept_count(rank[0].size if len(rank) else 0, percentile)


@functools.lru_cache(maxsize=8)
def grid_rank(h: int, w: int, leaf: int = 32) -> np.ndarray:
    """Each pixel's position in a nested-dissection order of the ``h x w`` grid: split the
    longer side at its middle row or column (the separator, numbered after both halves)
    until a part has at most ``leaf`` pixels."""
    rows, cols = np.divmod(np.arange(h * w), w)
    parts: list[np.ndarray] = []
    stack: list[tuple[np.ndarray, bool]] = [(np.arange(h * w), False)]
    while stack:  # depth-first: a part's left half, then its right half, then its separator
        index, is_separator = stack.pop()
        r, c = rows[index], cols[index]
        if is_separator or len(index) <= leaf:
            parts.append(index)
            continue
        along_rows = r.max() - r.min() >= c.max() - c.min()
        coord = r if along_rows else c
        middle = (int(coord.min()) + int(coord.max())) // 2
        stack += [(index[coord == middle], True), (index[coord > middle], False), (index[coord < middle], False)]
    order = np.concatenate(parts)  # each part after everything popped before it: halves, then their separator
    rank = np.empty(h * w, dtype=np.int64)
    rank[order] = np.arange(h * w)
    rank.setflags(write=False)
    return rank


def linear_system(keep: np.ndarray, image: np.ndarray) -> tuple[sp.csc_matrix, np.ndarray, np.ndarray]:
    """``(-A, -b, unknowns)`` of one mask: the positive form of the system in the module
    docstring, ``-b`` as ``[n, C]``, and the flat indices of the removed pixels in the
    order of the unknowns (:func:`grid_rank`'s)."""
    h, w = keep.shape
    kept = keep.ravel()
    unknown = np.flatnonzero(~kept)
    unknown = unknown[np.argsort(grid_rank(h, w)[unknown], kind="stable")]
    n = len(unknown)
    index = np.full(h * w, -1, dtype=np.int64)
    index[unknown] = np.arange(n)
    flat = image.reshape(image.shape[0], -1)
    row0, col0 = np.divmod(unknown, w)
    diagonal = np.zeros(n)
    rhs = np.zeros((n, image.shape[0]))
    rows, cols, vals = [np.arange(n)], [np.arange(n)], []
    for dr, dc, weight in NEIGHBOURS:
        r, c = row0 + dr, col0 + dc
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        diagonal[inside] += weight
        where = np.where(inside, r * w + c, 0)
        known = inside & kept[where]
        rhs[known] += weight * flat[:, where[known]].T
        free = np.flatnonzero(inside & ~kept[where])
        rows.append(free)
        cols.append(index[where[free]])
        vals.append(np.full(len(free), -weight))
    data = np.concatenate([diagonal, *vals])
    matrix = sp.csc_matrix((data, (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    return matrix, rhs, unknown


def _solve(matrix: sp.csc_matrix, rhs: np.ndarray) -> np.ndarray:
    """``matrix^-1 rhs`` in the unknowns' own order (SPD: no pivoting, no reordering)."""
    # small panels and supernode relaxation: 12-15% faster than SuperLU's defaults on these
    # grid systems (measured at 224 px over the MoRF/LeRF masks of 10-50 %)
    factor = spla.splu(matrix, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True},
                       panel_size=4, relax=1)
    return factor.solve(rhs)


def impute_one(image: np.ndarray, keep: np.ndarray, noise: float = NOISE, seed: int = 0) -> np.ndarray | None:
    """``image`` [C, H, W] with the pixels where ``keep`` is False imputed (a new array), or
    None when no pixel is kept (nothing to impute from)."""
    if not keep.any():
        return None
    out = np.array(image, dtype=np.float32, copy=True)
    if keep.all():
        return out
    matrix, rhs, unknown = linear_system(keep, image)
    values = _solve(matrix, rhs).T.astype(np.float32)  # [C, n]
    if noise:
        values += np.float32(noise) * np.random.default_rng(seed).standard_normal(values.shape, dtype=np.float32)
    out.reshape(out.shape[0], -1)[:, unknown] = values
    return out


def impute(images: np.ndarray, keep: np.ndarray, noise: float = NOISE, seed: int = 0,
           threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Impute every ``images[i]`` [M, C, H, W] where ``keep[i]`` [M, H, W] is False.

    Returns ``(imputed [M, C, H, W] float32, ok [M] bool)``; a row with no kept pixel is left
    as is with ``ok`` False. Each row's noise comes from its own generator seeded with
    ``seed``, so a row's result does not depend on the rest of the batch.
    """
    threads = threads or min(len(images), os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda i: impute_one(images[i], keep[i], noise, seed), range(len(images))))
    ok = np.array([r is not None for r in results], dtype=bool)
    out = np.stack([r if r is not None else np.asarray(images[i], dtype=np.float32) for i, r in enumerate(results)])
    return out, ok
