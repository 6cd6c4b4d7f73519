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


def _centred_columns(maps: np.ndarray) -> np.ndarray:
    """``[N, C, h, w]`` -> float64 ``[N, h*w, C]`` centred per channel: each sample's ``X^T``
    in the column-major order LAPACK reads, written in one pass.

    The centring is the same float32 arithmetic as :func:`_centred_positions` (bit-equal), but
    NaNs are looked for only when a channel mean comes out non-finite (a NaN or an inf in that
    channel); then the slower NaN-to-0 path runs, as pytorch-grad-cam does.
    """
    n, c, h, w = maps.shape
    x = maps.reshape(n, c, h * w).astype(np.float32, copy=False).transpose(0, 2, 1)
    mean = x.mean(axis=1, keepdims=True)
    if not np.isfinite(mean).all():
        return _centred_positions(maps).astype(np.float64)
    out = np.empty((n, h * w, c), np.float32)
    np.subtract(x, mean, out=out)
    return out.astype(np.float64)


def first_component(maps: np.ndarray) -> np.ndarray:
    """Projection of each sample's centred features on its first principal axis: ``[N, h, w]``.

    ``X v_1 = s_1 u_1``, so only ``U`` and ``S`` are needed. When ``X`` is much wider than
    tall (``C >= 11/6 h*w``, e.g. [49, 2048] or [196, 768]) LAPACK's ``gesdd`` first
    factors ``X = L Q`` and takes ``U`` from the SVD of the small square ``L``; we do that
    explicitly (``L = R^T`` from the QR of ``X^T``, ``dgeqrf``, then ``dgesdd`` of ``L``),
    which gives the same ``U`` including its sign at a fraction of the cost (no ``[h*w, C]``
    right factor is ever formed). Both are called per sample through scipy's LAPACK
    wrappers on buffers laid out as LAPACK reads them: numpy's stacked ``qr`` / ``svd`` copy
    each matrix in and out (a third of the time on resnet50's [49, 2048]).
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
    from scipy.linalg import lapack  # scipy is a runtime dependency; imported where used

    x = _centred_columns(maps)
    out = np.empty((n, positions), np.float32)
    for i in range(n):  # one LAPACK factorization per sample: there is no batched LAPACK
        factor, _, _, info = lapack.dgeqrf(x[i].T, overwrite_a=True)
        _raise_for(info, "dgeqrf", maps.shape)
        lower = np.triu(factor[:positions]).T  # L = R^T, Fortran-ordered: no copy into dgesdd
        u, s, _, info = lapack.dgesdd(lower, compute_uv=True, full_matrices=False, overwrite_a=True)
        _raise_for(info, "dgesdd", maps.shape)
        out[i] = u[:, 0] * s[0]
    return out.reshape(n, h, w)


def _raise_for(info: int, routine: str, shape: tuple[int, ...]) -> None:
    """LAPACK's ``info != 0`` as numpy's error (the SVD did not converge, a bad argument)."""
    if info:
        raise np.linalg.LinAlgError(f"{routine} failed (info={info}) on maps of shape {shape}")


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
