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

Both are batched: one ``np.linalg.svd`` / ``np.linalg.eigh`` call on stacked matrices.
"""

from __future__ import annotations

import numpy as np


def _centred_positions(maps: np.ndarray) -> np.ndarray:
    """``[N, C, h, w]`` -> ``[N, h*w, C]`` float32 with per-channel means removed, NaN -> 0."""
    n, c, h, w = maps.shape
    x = np.nan_to_num(maps.reshape(n, c, h * w).astype(np.float32), nan=0.0, posinf=np.inf, neginf=-np.inf)
    # Mean over the contiguous position axis of the transposed view, as pytorch-grad-cam
    # does per image: the same summation order gives bit-equal centred features, which
    # matters because LAPACK's singular-vector sign can flip on last-bit differences.
    x = x.transpose(0, 2, 1)
    return np.ascontiguousarray(x - x.mean(axis=1, keepdims=True))


def first_component(maps: np.ndarray) -> np.ndarray:
    """Projection of each sample's centred features on its first principal axis: ``[N, h, w]``.

    ``X v_1 = s_1 u_1``, so only ``U`` and ``S`` are needed. When ``X`` is much wider than
    tall (``C >= 11/6 h*w``, e.g. [49, 2048] or [196, 768]) LAPACK's ``gesdd`` first
    factors ``X = L Q`` and takes ``U`` from the SVD of the small square ``L``; we do that
    explicitly (``L = R^T`` from the QR of ``X^T``), which gives the same ``U`` including
    its sign at a fraction of the cost (no ``[h*w, C]`` right factor is ever formed).
    LAPACK's sign is a discontinuous function of the input: last-bit differences (ONNX
    Runtime vs PyTorch activations) can flip it where a Householder pivot is near zero.
    """
    n, _, h, w = maps.shape
    x = _centred_positions(maps)
    positions, channels = x.shape[1:]
    wide = channels >= int(positions * 11 / 6)
    if wide:
        x = np.linalg.qr(x.transpose(0, 2, 1), mode="r").transpose(0, 2, 1)
    # Otherwise the same call as pytorch-grad-cam (full_matrices=True: the same LAPACK path).
    u, s, _ = np.linalg.svd(x, full_matrices=not wide)
    return (u[:, :, 0] * s[:, :1]).reshape(n, h, w).astype(np.float32)


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
