"""Degenerate maps: the signal ratio of a raw CAM that is a sum over channel terms.

Most methods' raw map of one layer is a signed sum over channels ``c`` of terms ``T``
``[N, C, h, w]`` (see :mod:`camserve.cam.methods`):

* weighted sum (GradCAM, GradCAM++, XGradCAM, FEM, ScoreCAM, AblationCAM, FinerCAM):
  ``T_cij = w_c A_cij`` for weights ``w [N, C]`` and activations ``A [N, C, h, w]``;
* element-wise (HiResCAM, GradCAM element-wise, LayerCAM): ``T_cij = E_cij``.

The *signal ratio* of each row ``n`` (per layer) compares the signed sum, i.e. the raw
map itself, with the sum of the magnitudes of its terms::

    r_n = max_ij |sum_c T_ncij| / max_ij sum_c |T_ncij|           in [0, 1]   -> [N] float64

For the weighted sum ``sum_c |w_c A_cij| = (|w| @ |A|)_ij``: one more batched matmul, the
same as the map's own (:func:`camserve.cam.methods.weighted_sum`); element-wise it is
``sum_c |E_cij|``, one more pass over ``E``. Nothing else is recomputed: the signed sum
is the raw map the method returns, the terms are computed once.

``r`` near 1 means the channel terms agree in sign where the map peaks. ``r`` at the
level of float32 rounding means the terms cancel: the map is what is left of large
opposite contributions, i.e. rounding noise, and min-max scaling would still stretch it to
a full [0, 1] heatmap. This happens for a layer followed by a LayerNorm over channels
(e.g. swin_v2_t's ``features.-1``): the gradient through a LayerNorm is orthogonal to
the centred activations, so ``sum_c G_c A_c`` is 0 at every position up to the eps term
(there ``max |sum_c G A| / max sum_c |G A| = 4.4e-7`` and the served HiResCAM was noise).

Conventions:

* ``max_ij sum_c |T| == 0`` (every term is 0, an empty map): ``r = 1.0``, not degenerate;
  only real cancellation is flagged.
* ``r = nan`` where the check does not apply: methods that project instead of summing
  (EigenCAM, EigenGradCAM, KPCA-CAM) and any method whose map ``eigen_smooth`` replaces by
  the projection ``P(T)``. NaNs in the map itself also give nan.
* several target layers: a row's ratio is the minimum over the layers (every layer enters
  the final mean with the same weight, so one noise layer spoils the map);
* ``aug_smooth``: the minimum over the row's augmented copies.

:data:`DEGENERATE_RATIO` is the threshold below which a map is reported as degenerate
(:func:`degenerate_reason`).
"""

from __future__ import annotations

import math

import numpy as np

#: Signal ratio below which a raw map is float rounding noise. Summing ``C`` float32
#: terms leaves an accumulated rounding error of about ``sqrt(C) * 6e-8`` (unit roundoff
#: ``2**-24``) of ``sum_c |T_c|``: 1.7e-6 for C = 768, 2.7e-6 for C = 2048 (before the
#: rounding already carried by ``A`` and ``G``). A map that keeps less than 1e-4 (0.01%)
#: of the magnitude of its terms is within a factor ~40 of that floor, so its shape is
#: dominated by rounding; the maps of working layers in the tests keep 0.4 to 1. A residue
#: above rounding is not flagged: e.g. behind a LayerNorm whose input variance is small,
#: ``sum_c G A`` keeps ~eps / var (2e-4 in tests/test_degenerate.py before its weights are
#: scaled), a deterministic map.
DEGENERATE_RATIO: float = 1e-4


def cancellation_ratio(signed: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """``max_ij |signed| / max_ij magnitude`` per row: ``[N, h, w]`` x2 -> ``[N]`` float64.

    ``signed`` is the raw map ``sum_c T_c``, ``magnitude`` is ``sum_c |T_c|``; rows whose
    magnitude is 0 everywhere give 1.0 (empty, not degenerate).
    """
    n = signed.shape[0]
    top = np.abs(signed).reshape(n, -1).max(axis=1).astype(np.float64)
    scale = magnitude.reshape(n, -1).max(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = top / scale
    return np.where(scale == 0, 1.0, ratio)


def not_applicable(n: int) -> np.ndarray:
    """The ratio of ``n`` rows where the check does not apply: ``[n]`` nan."""
    return np.full(n, np.nan)


def combine_ratios(per_layer: list[np.ndarray]) -> np.ndarray:
    """Per-layer ratios ``[N]`` each -> ``[N]``: the minimum over layers (nan if any is nan)."""
    return np.min(np.stack(per_layer), axis=0)


def degenerate_reason(ratio: float) -> str | None:
    """Why a map with signal ratio ``ratio`` is not a heatmap, or None.

    None when ``ratio >= DEGENERATE_RATIO`` (the map is fine) or nan (the check does not
    apply); else one sentence with the ratio and the threshold.
    """
    ratio = float(ratio)
    if math.isnan(ratio) or ratio >= DEGENERATE_RATIO:
        return None
    return (
        f"the channel terms cancel: max |sum_c T_c| is {ratio:.1e} of max sum_c |T_c| "
        f"(threshold {DEGENERATE_RATIO:.0e}); the map is float rounding noise"
    )
