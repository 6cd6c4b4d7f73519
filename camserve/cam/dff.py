"""Deep Feature Factorization (DFF, Collins et al. 2018) of a layer's activations ``A``.

For each image ``n`` of batched NCHW float32 activations ``A: [N, C, h, w]`` the layer is read
as a non-negative matrix ``V [C, h*w]`` (NaN -> 0) and factorized with NMF after removing each
channel's minimum ``o_c = min_ij V_cij`` (so the input is non-negative):

* ``V - o 1^T ~= W H``  with ``W [C, k] >= 0``, ``H [k, h*w] >= 0`` (Frobenius loss,
  ``sklearn.decomposition.NMF(init='random', random_state=0)``, other settings sklearn's defaults)
* concepts ``W + o 1^T`` ``[C, k]``: one channel-space vector per concept
* maps ``H`` reshaped to ``[k, h, w]``: where each concept sits in the image (raw, not scaled)

Each image is factorized on its own, so no image changes another's answer (pytorch-grad-cam
factorizes a whole batch as one ``[C, N*h*w]`` matrix with shared concepts; for ``N = 1`` the
two agree). NMF runs in float32, as pytorch-grad-cam's does on float32 activations.

A concept vector is scored by the model's head, ``head: [M, C] -> [M, K]`` logits, and the
softmax over the ``K`` classes says which classes the concept stands for (:func:`top_classes`).
"""

from __future__ import annotations

import operator
import warnings
from typing import Callable

import numpy as np
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning

#: Number of concepts per image (pytorch-grad-cam's ``DeepFeatureFactorization.__call__`` default).
DEFAULT_COMPONENTS = 16
#: Classes reported per concept.
DEFAULT_TOP_K = 2


def _check_components(n_components: int, channels: int, positions: int) -> int:
    """``n_components`` as an int in ``[1, min(C, h*w)]`` (the most a rank-``min`` ``V`` supports)."""
    try:
        k = operator.index(n_components)
    except TypeError:
        raise ValueError(f"n_components must be an integer, got {n_components!r}") from None
    limit = min(channels, positions)
    if isinstance(n_components, bool) or not 1 <= k <= limit:
        raise ValueError(f"n_components={n_components!r} is not in [1, {limit}] "
                         f"(min of C={channels} channels and h*w={positions} positions)")
    return k


def factorize(activations: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Concepts ``[N, C, k]`` and raw maps ``[N, k, h, w]`` (float32) of ``A [N, C, h, w]``.

    ``activations`` is not modified. Raises ``ValueError`` for a non-4-D input or an
    ``n_components`` outside ``[1, min(C, h*w)]``.
    """
    if activations.ndim != 4:
        raise ValueError(f"activations must be NCHW [N, C, h, w], got shape {activations.shape}")
    n, c, h, w = activations.shape
    k = _check_components(n_components, c, h * w)
    # A new float32 array (the caller's is never written to), NaN -> 0.
    v = np.asarray(activations, dtype=np.float32).reshape(n, c, h * w)
    v = np.where(np.isnan(v), np.float32(0), v)
    offsets = v.min(axis=2, keepdims=True)  # [N, C, 1]
    shifted = v - offsets
    concepts = np.empty((n, c, k), dtype=np.float32)
    maps = np.empty((n, k, h * w), dtype=np.float32)
    with warnings.catch_warnings():
        # max_iter=200 often stops short of tol; that is the reference's setting, not an error.
        warnings.simplefilter("ignore", ConvergenceWarning)
        # NMF has no batched form: one fit per image is the price of per-image answers.
        for i in range(n):
            model = NMF(n_components=k, init="random", random_state=0)
            concepts[i] = model.fit_transform(shifted[i])
            maps[i] = model.components_
    concepts += offsets
    return concepts, maps.reshape(n, k, h, w)


def concept_scores(concepts: np.ndarray,
                   head: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Class probabilities ``[N, k, K]`` float32 of concepts ``[N, C, k]``.

    ``head`` maps float32 ``[M, C]`` to logits ``[M, K]``; it is called once on all ``N*k``
    concept vectors, and the softmax over ``K`` is taken of its output.
    """
    n, c, k = concepts.shape
    vectors = np.ascontiguousarray(concepts.transpose(0, 2, 1), dtype=np.float32).reshape(n * k, c)
    logits = np.asarray(head(vectors), dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] != n * k:
        raise ValueError(f"head returned shape {logits.shape}, expected [{n * k}, K]")
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs.astype(np.float32).reshape(n, k, -1)


def top_classes(scores: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` classes of each concept: indices ``[N, k, top_k]`` (most probable first,
    ties by lower index) and their probabilities, from ``scores [N, k, K]``."""
    classes = scores.shape[-1]
    if not 1 <= top_k <= classes:
        raise ValueError(f"top_k={top_k!r} is not in [1, {classes}]")
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :top_k]
    return order, np.take_along_axis(scores, order, axis=-1)
