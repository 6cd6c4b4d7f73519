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
tokens) take two LAPACK calls per sample, on the session's threads.
"""

from __future__ import annotations

import numpy as np

from camserve.cam import lapack, parallel


def _centred_positions(maps: np.ndarray) -> np.ndarray:
    """``[N, C, h, w]`` -> ``[N, h*w, C]`` float32 with per-channel means removed, NaN -> 0."""
    n, c, h, w = maps.shape
    x = np.nan_to_num(maps.reshape(n, c, h * w).astype(np.float32), nan=0.0, posinf=np.inf, neginf=-np.inf)
    # Mean over the contiguous position axis of the transposed view, as pytorch-grad-cam
    # does per image: the same summation order gives bit-equal centred features, which
    # matters because LAPACK's singular-vector sign can flip on last-bit differences.
    x = x.transpose(0, 2, 1)
    return np.ascontiguousarray(x - x.mean(axis=1, keepdims=True))


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
    ``X = L Q`` and takes ``U`` from the SVD of the small square ``L``; we make those two
    steps ourselves (:mod:`camserve.cam.lapack`: ``L = R^T`` from the QR of ``X^T``, then
    ``dgesdd`` of ``L``), which gives the same ``U``
    including its sign at a fraction of the cost (no ``[C, C]`` right factor is formed),
    one sample per job on the session's threads (:mod:`camserve.cam.parallel`).
    LAPACK's sign is a discontinuous function of the input: last-bit differences (ONNX
    Runtime vs PyTorch activations) can flip it where a Householder pivot is near zero, and
    it must be computed in float64 as numpy does (a float32 factorization flips it often).
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
        # X^T [C, h*w] Fortran-ordered is X [h*w, C] C-ordered: centred, in float64, in one
        # pass (computed in float32, as the oracle, stored as float64), in the job's thread
        centred = np.empty((positions, c), np.float64)
        np.subtract(x[i].T, mean[i].T, out=centred, dtype=np.float32)
        u, s = lapack.first_singular(lapack.lq_lower(centred.T))
        out[i] = u * s

    parallel.for_each(project, n)
    return out.reshape(n, h, w)


def kernel_first_component(maps: np.ndarray) -> np.ndarray:
    """First sigmoid-kernel principal component of each sample's positions: ``[N, h, w]``."""
    n, c, h, w = maps.shape
    x = _centred_positions(maps).astype(np.float64)
    k = np.tanh(np.matmul(x, x.transpose(0, 2, 1)) / c + 1.0)
    k = k - k.mean(axis=1, keepdims=True) - k.mean(axis=2, keepdims=True) + k.mean(axis=(1, 2), keepdims=True)
    values, vectors = np.linalg.eigh(k)
    lam = np.maximum(values[:, -1], 0.0)
    top = vectors[:, :, -1]
    pivot = np.take_along_axis(top, np.abs(top).argmax(axis=1)[:, None], axis=1)
    top = top * np.sign(pivot)
    return (top * np.sqrt(lam)[:, None]).reshape(n, h, w).astype(np.float32)
