"""CAM methods computed from a layer's activations ``A`` and gradients ``G`` alone.

Every function takes batched NCHW float32 arrays ``A, G: [N, C, h, w]`` (``G`` is
``d(target score)/dA`` for the row's target) and returns the *raw* per-layer map
``[N, h, w]`` (before ReLU, scaling and resize; see :mod:`camserve.cam.scaling`).
Sums ``sum_ij`` run over the ``h x w`` positions; ``P(.)`` is the first-principal-component
projection of :mod:`camserve.cam.projection` used when ``eigen_smooth`` is set.

Channel-weight methods produce ``cam = sum_c w_c A_c`` (or ``P(w_c A_c)``):

* GradCAM:   ``w_c = mean_ij G_cij``
* GradCAM++: ``a_cij = G^2 / (2 G^2 + (sum_ij A_cij) G^3 + 1e-6)`` (0 where ``G == 0``),
  ``w_c = sum_ij relu(G_cij) a_cij``
* XGradCAM:  ``w_c = sum_ij G_cij A_cij / (sum_ij A_cij + 1e-7)``
* FEM:       ``w_c = mean_ij [A_cij > mean_ij A_c + 2 std_ij A_c]`` (no eigen smoothing)

Element-wise methods produce ``cam = sum_c E_c`` (or ``P(E)``):

* HiResCAM: ``E = G * A``;  GradCAM element-wise: ``E = relu(G * A)``;  LayerCAM: ``E = relu(G) * A``

Projection methods: EigenCAM ``P(A)``, EigenGradCAM ``P(G * A)``, KPCA-CAM the sigmoid
kernel PCA of ``A`` (these always project; ``eigen_smooth`` changes nothing).

Each summing method is split into its channel *terms* (``<method>_weights(A, G) -> w [N, C]``
or ``<method>_elements(A, G) -> E [N, C, h, w]``) and a shared reduction,
:func:`reduce_terms`, which returns the raw map together with its signal ratio
``max_ij |sum_c T| / max_ij sum_c |T|`` ``[N]`` (:mod:`camserve.cam.degenerate`) from the
same terms. The per-method functions (``gradcam(A, G, eigen_smooth)`` etc.) are the
reduction of their terms without the ratio.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from camserve.cam.degenerate import cancellation_ratio, not_applicable
from camserve.cam.projection import first_component, kernel_first_component

#: How a method's raw map is formed from its terms: ``sum_c w_c A_c`` ("weights"),
#: ``sum_c E_c`` ("elements"), or a projection with no channel terms ("projection").
Form = Literal["weights", "elements", "projection"]


def weighted_sum(weights: np.ndarray, maps: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """``sum_c w_c A_c`` for ``weights [N, C]`` and ``maps [N, C, h, w]`` (``P(w A)`` if smoothing).

    Done as one batched matmul over whichever of NCHW / NHWC memory order ``maps`` has.
    """
    if eigen_smooth:
        return first_component(weights[:, :, None, None] * maps)
    return weighted_sum_rows(weights[:, None, :], maps)[:, 0]


def weighted_sum_rows(weights: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """``sum_c w_kc A_c`` for ``weights [N, K, C]`` and ``maps [N, C, h, w]`` -> ``[N, K, h, w]``.

    K weight rows over the same maps cost one pass over ``maps`` (one batched matmul over
    whichever of NCHW / NHWC memory order ``maps`` has), not K.
    """
    n, c, h, w = maps.shape
    k = weights.shape[1]
    weights = weights.astype(np.float32, copy=False)
    if maps.flags.c_contiguous:
        return np.matmul(weights, maps.reshape(n, c, h * w)).reshape(n, k, h, w)
    channels_last = maps.transpose(0, 2, 3, 1).reshape(n, h * w, c)
    rows = np.matmul(channels_last, weights.transpose(0, 2, 1))  # [N, hw, K]
    return rows.transpose(0, 2, 1).reshape(n, k, h, w)


def _nonnegative(a: np.ndarray) -> bool:
    """True when no element of ``a`` is negative or NaN (then ``|a| == a``): one read of ``a``."""
    return bool(a.size == 0 or a.min() >= 0)


def channel_sum(elements: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """``sum_c E_c`` for ``elements [N, C, h, w]`` -> ``[N, h, w]`` (``P(E)`` if smoothing)."""
    return first_component(elements) if eigen_smooth else elements.sum(axis=1)


def reduce_terms(form: Form, terms: np.ndarray, maps: np.ndarray | None = None,
                 eigen_smooth: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raw map ``[N, h, w]`` and signal ratio ``[N]`` float64 of a sum over channel terms.

    ``form == "weights"``: ``terms`` are ``w [N, C]`` of ``maps`` ``A [N, C, h, w]``; the map
    is :func:`weighted_sum` and the magnitude ``|w| @ |A|`` (with ``A >= 0``, e.g. after a
    ReLU, both are rows of one matmul, a single pass over ``A``).
    ``form == "elements"``: ``terms`` are ``E [N, C, h, w]`` (``maps`` unused); the map is
    :func:`channel_sum` and the magnitude ``sum_c |E|``. With ``eigen_smooth`` the map is
    the projection and the ratio nan (see :mod:`camserve.cam.degenerate`).
    """
    if form == "weights":
        assert maps is not None, "a weighted sum needs its maps"
        if eigen_smooth:
            cam = weighted_sum(terms, maps, eigen_smooth)
            return cam, not_applicable(cam.shape[0])
        if _nonnegative(maps):  # |A| == A: map and magnitude are two rows of one matmul
            rows = weighted_sum_rows(np.stack([terms, np.abs(terms)], axis=1), maps)
            return rows[:, 0], cancellation_ratio(rows[:, 0], rows[:, 1])
        cam = weighted_sum(terms, maps)
        return cam, cancellation_ratio(cam, weighted_sum(np.abs(terms), np.abs(maps)))
    if form == "elements":
        cam = channel_sum(terms, eigen_smooth)
        if eigen_smooth:
            return cam, not_applicable(cam.shape[0])
        # Non-negative terms (GradCAM element-wise; LayerCAM on A >= 0) are their own magnitude.
        magnitude = cam if _nonnegative(terms) else np.abs(terms).sum(axis=1)
        return cam, cancellation_ratio(cam, magnitude)
    raise ValueError(f"form {form!r} has no channel terms")


# Channel terms of the summing methods: weights [N, C] or elements [N, C, h, w].


def gradcam_weights(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """GradCAM weights ``mean_ij G_cij`` ``[N, C]``."""
    return g.mean(axis=(2, 3))


def gradcam_plus_plus_weights(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """GradCAM++ weights ``[N, C]`` (Chattopadhay et al. 2018, eq. 19):
    ``sum_ij relu(G) alpha`` with ``alpha = G^2 / (2 G^2 + sum_ij A * G^3 + 1e-6)``.

    In place, in the oracle's float32 operations (bit-equal to them): seven passes over
    ``[N, C, h, w]`` instead of twelve (1.5-1.75x faster). The oracle's ``alpha = 0 where
    G == 0`` needs no pass of its own: there ``relu(G) = 0`` and ``alpha = 0 / 1e-6 = 0``."""
    g2 = np.square(g)
    alpha = np.multiply(g2, g)
    alpha *= a.sum(axis=(2, 3), keepdims=True)
    alpha += g2 * np.float32(2.0)
    alpha += np.float32(1e-6)
    np.divide(g2, alpha, out=alpha)
    alpha *= np.maximum(g, 0)
    return alpha.sum(axis=(2, 3))


def xgradcam_weights(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """XGradCAM weights ``sum_ij G A / (sum_ij A + 1e-7)`` ``[N, C]``."""
    a_sum = a.sum(axis=(2, 3), keepdims=True)
    return (g * a / (a_sum + 1e-7)).sum(axis=(2, 3))


def fem_weights(a: np.ndarray, g: np.ndarray | None = None, k: float = 2.0) -> np.ndarray:
    """FEM weights: share of positions above ``mean + k std`` per channel, ``[N, C]`` float32."""
    mean = a.mean(axis=(2, 3), keepdims=True)
    std = a.std(axis=(2, 3), keepdims=True)
    return (a > mean + k * std).mean(axis=(2, 3)).astype(np.float32)


def hirescam_elements(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """HiResCAM terms ``G * A``."""
    return g * a


def gradcam_elementwise_elements(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """GradCAM element-wise terms ``relu(G * A)``."""
    return np.maximum(g * a, 0)


def layercam_elements(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """LayerCAM terms ``relu(G) * A``."""
    return np.maximum(g, 0) * a


# Raw maps per method (the reductions of the terms above, and the projections).


def gradcam(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """GradCAM: channels weighted by their mean gradient."""
    return weighted_sum(gradcam_weights(a, g), a, eigen_smooth)


def gradcam_plus_plus(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """GradCAM++ (Chattopadhay et al. 2018, eq. 19): second/third-order gradient weighting."""
    return weighted_sum(gradcam_plus_plus_weights(a, g), a, eigen_smooth)


def xgradcam(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """XGradCAM: gradients weighted by the channel's share of activation."""
    return weighted_sum(xgradcam_weights(a, g), a, eigen_smooth)


def hirescam(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """HiResCAM: element-wise gradient x activation, summed over channels."""
    return channel_sum(hirescam_elements(a, g), eigen_smooth)


def gradcam_elementwise(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """GradCAM element-wise: ReLU of gradient x activation, summed over channels."""
    return channel_sum(gradcam_elementwise_elements(a, g), eigen_smooth)


def layercam(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """LayerCAM: positive gradients as per-position weights of the activations."""
    return channel_sum(layercam_elements(a, g), eigen_smooth)


def eigencam(a: np.ndarray, g: np.ndarray | None = None, eigen_smooth: bool = False) -> np.ndarray:
    """EigenCAM: first principal component of the activations (gradients unused)."""
    return first_component(a)


def eigengradcam(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """EigenGradCAM: first principal component of gradient x activation."""
    return first_component(g * a)


def segeigencam(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """SegEigenCAM (Chung & Ying 2025): first principal component of ``|gradient| x activation``,
    its sign chosen so that the extreme of larger magnitude is positive (SVD's sign is arbitrary)."""
    p = first_component(np.abs(g) * a)
    flip = np.abs(p.min(axis=(1, 2))) > np.abs(p.max(axis=(1, 2)))
    return np.where(flip[:, None, None], -p, p).astype(np.float32)


def kpcacam(a: np.ndarray, g: np.ndarray | None = None, eigen_smooth: bool = False) -> np.ndarray:
    """KPCA-CAM: first sigmoid-kernel principal component of the activations."""
    return kernel_first_component(a)


def fem(a: np.ndarray, g: np.ndarray | None = None, eigen_smooth: bool = False, k: float = 2.0) -> np.ndarray:
    """FEM: channels weighted by the share of positions above their ``mean + k std`` (never smoothed)."""
    return weighted_sum(fem_weights(a, g, k), a)
