"""Projections of a batch of feature maps onto one principal direction (eigen smoothing).

For each sample, ``X`` is the ``[h*w, C]`` matrix of per-position feature vectors,
centred per channel (column means removed); NaNs are read as 0.

* :func:`first_component` (EigenCAM, ``eigen_smooth``): ``X v_1`` where ``v_1`` is the first
  right singular vector of ``X`` -> ``[N, h, w]``. The SVD's sign is LAPACK's, as in
  pytorch-grad-cam (which also takes numpy's float32 SVD), so maps agree including sign.
* :func:`kernel_first_component` (KPCA-CAM): kernel PCA with the sigmoid kernel
  ``K = tanh(X X^T / C + 1)``, double-centred; the map is ``sqrt(lambda_1) u_1`` with the
  sign chosen so that the entry of largest magnitude of ``u_1`` is positive (scikit-learn's
  ``KernelPCA(n_components=1, kernel="sigmoid")`` convention).

Narrow features (``C < 11/6 h*w``) and the kernel PCA are batched: one ``np.linalg.svd`` /
``np.linalg.eigh`` call on stacked matrices. Wide features (every CNN's last layer, ViT's
tokens) take a Cholesky factorization of the Gram matrix and the first vector of its
factor's SVD per sample, on the session's threads.
"""

from __future__ import annotations

import math

import numpy as np

from camserve.cam import lapack, parallel


def _centred_positions(maps: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """``[N, C, h, w]`` -> ``[N, h*w, C]`` with per-channel means removed, NaN -> 0: computed in
    float32 as pytorch-grad-cam does, stored as ``dtype`` in the same pass."""
    n, c, h, w = maps.shape
    x = maps.reshape(n, c, h * w).astype(np.float32, copy=False)
    if x.size and math.isnan(x.max()):  # the max is NaN where any entry is: only then a copy
        x = x.astype(np.float32, copy=True)
        np.copyto(x, 0.0, where=np.isnan(x))
    # Mean over the position axis of the transposed view, as pytorch-grad-cam does per image:
    # the same summation order gives bit-equal centred features, which matters because
    # LAPACK's singular-vector sign can flip on last-bit differences.
    x = x.transpose(0, 2, 1)
    out = np.empty((n, h * w, c), dtype)
    np.subtract(x, x.mean(axis=1, keepdims=True), out=out, dtype=np.float32)
    return out


def _channel_means(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(x, mean)``: ``x = [N, C, h*w]`` float32 and its per-channel means ``[N, C, 1]``,
    the same float32 arithmetic as :func:`_centred_positions` (bit-equal); ``mean`` is None
    when a channel mean is not finite (a NaN or an inf in that channel: NaNs must then be
    read as 0 first, as pytorch-grad-cam does; only then are they looked for)."""
    n, c, h, w = maps.shape
    x = maps.reshape(n, c, h * w).astype(np.float32, copy=False)
    mean = x.transpose(0, 2, 1).mean(axis=1, keepdims=True).transpose(0, 2, 1)
    return x, (mean if np.isfinite(mean).all() else None)


def first_component(maps: np.ndarray) -> np.ndarray:
    """Projection of each sample's centred features on its first principal axis: ``[N, h, w]``.

    ``X v_1 = s_1 u_1``, so only ``U`` and ``S`` are needed. When ``X`` is much wider than
    tall (``C >= 11/6 h*w``, e.g. [49, 2048] or [196, 768]) numpy's ``gesdd`` first factors
    ``X = L Q`` and takes ``U`` from the SVD of the small square ``L``. We get that ``L`` from
    the Cholesky factor of the Gram matrix ``X X^T`` (:func:`_lower_factor`) and take ``u_1``
    from ``L`` by ``dgesdd``'s own steps (:func:`camserve.cam.lapack.first_singular`), one
    sample per job on the session's threads (:mod:`camserve.cam.parallel`).

    Why the sign is numpy's: ``dgesdd``'s ``u_1`` of ``L`` does not change when columns of
    ``L`` change sign (the bidiagonalization carries the signs through exactly), and the
    factor here is the QR's ``L`` with its columns' signs made positive, up to rounding,
    the last pivot included (see :func:`_lower_factor`). The sign has to be computed in
    float64 (a float32 SVD flips it often), and on data with no dominant direction it can
    hang on that last, tiny pivot: an approximate one (a Cholesky factor of the Gram matrix
    shifted by 1e-10 of its mean eigenvalue) flipped one sign in 9 random samples.
    """
    n, c, h, w = maps.shape
    positions = h * w
    if c < int(positions * 11 / 6):
        # The same call as pytorch-grad-cam (full_matrices=True: the same LAPACK path).
        u, s, _ = np.linalg.svd(_centred_positions(maps), full_matrices=True)
        return (u[:, :, 0] * s[:, :1]).reshape(n, h, w).astype(np.float32)
    x, mean = _channel_means(maps)
    if mean is None:
        x = _centred_positions(maps).transpose(0, 2, 1)
        mean = np.zeros((n, c, 1), np.float32)
    out = np.empty((n, positions), np.float32)

    def project(i: int) -> None:
        # X [h*w, C] C-ordered: centred in float32 as the oracle, stored as float64, in the
        # job's thread
        centred = np.empty((positions, c), np.float64)
        np.subtract(x[i].T, mean[i].T, out=centred, dtype=np.float32)
        u, s = lapack.first_singular(_lower_factor(centred))
        out[i] = u * s

    parallel.for_each(project, n)
    return out.reshape(n, h, w)


#: Squared Cholesky pivots below this share of the largest squared position norm are read
#: as rounding: the QR is taken instead (see :func:`_lower_factor`).
PIVOT_FLOOR = 1e-8


def _lower_factor(centred: np.ndarray) -> np.ndarray:
    """``L`` (lower triangular, Fortran-ordered) with ``L L^T = X X^T`` for the ``[h*w, C]``
    float64 centred ``X``: the QR's ``L`` up to its columns' signs, at a third of its cost.

    Centring makes ``X X^T`` singular in exact arithmetic (``X^T 1 = 0``); in float32 the
    positions sum to a residue ``r = X^T 1`` of about 1e-7 of their scale, and the last
    pivot of ``L`` is that residue's distance from the other positions' span (the last
    position is ``r`` minus the others). A float64 Gram matrix holds that pivot at the level
    of its own rounding, and LAPACK's sign can depend on it, so the Cholesky factor of the
    Gram matrix gives every entry but that one, which is computed from ``r`` directly:
    ``L_pp^2 = |r|^2 - |L_11^-1 X_1 r|^2`` (``X_1``: the other positions), with no
    cancellation (``r`` is noise, mostly outside a span of h*w - 1 vectors in C >= 11/6 h*w
    dimensions). Where the other positions are nearly dependent (a pivot below 1e-4 of the
    longest position: equal positions, for one) or an entry is not finite, the QR of ``X^T``
    itself."""
    positions = len(centred)
    gram = centred @ centred.T  # symmetric (numpy's syrk fills both triangles): its .T is it in Fortran order
    scale = float(np.trace(gram))
    if positions > 1 and 0 < scale < np.inf:
        norm2 = float(gram.diagonal().max())
        gram[-1, -1] += scale  # any positive pivot: it is replaced below
        lower = lapack.cholesky_lower(gram.T)
        # a pivot within 1e-4 of the longest position's norm is the Gram matrix's rounding
        # (equal positions; 1e-8 of its square, 1e-6 relative error at C = 2048) -> the QR
        if lower is not None and float(lower.diagonal()[:-1].min()) ** 2 > PIVOT_FLOOR * norm2:
            residue = centred.sum(axis=0)
            inside = lapack.solve_lower(lower, centred[:-1] @ residue, positions - 1)
            lower[-1, -1] = math.sqrt(max(float(residue @ residue - inside @ inside), 0.0))
            return lower
    return lapack.lq_lower(np.asfortranarray(centred.T))


def kernel_first_component(maps: np.ndarray) -> np.ndarray:
    """First sigmoid-kernel principal component of each sample's positions: ``[N, h, w]``."""
    n, c, h, w = maps.shape
    x = _centred_positions(maps, np.float64)
    k = np.tanh(np.matmul(x, x.transpose(0, 2, 1)) / c + 1.0)
    k = k - k.mean(axis=1, keepdims=True) - k.mean(axis=2, keepdims=True) + k.mean(axis=(1, 2), keepdims=True)
    values, vectors = np.linalg.eigh(k)
    lam = np.maximum(values[:, -1], 0.0)
    top = vectors[:, :, -1]
    pivot = np.take_along_axis(top, np.abs(top).argmax(axis=1)[:, None], axis=1)
    top = top * np.sign(pivot)
    return (top * np.sqrt(lam)[:, None]).reshape(n, h, w).astype(np.float32)
