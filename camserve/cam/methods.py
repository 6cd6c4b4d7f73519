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
"""

from __future__ import annotations

import numpy as np

from .projection import first_component, kernel_first_component


def weighted_sum(weights: np.ndarray, maps: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """``sum_c w_c A_c`` for ``weights [N, C]`` and ``maps [N, C, h, w]`` (``P(w A)`` if smoothing).

    Done as one batched matmul over whichever of NCHW / NHWC memory order ``maps`` has.
    """
    n, c, h, w = maps.shape
    if eigen_smooth:
        return first_component(weights[:, :, None, None] * maps)
    weights = weights.astype(np.float32, copy=False)
    if maps.flags.c_contiguous:
        return np.matmul(weights[:, None, :], maps.reshape(n, c, h * w)).reshape(n, h, w)
    channels_last = maps.transpose(0, 2, 3, 1)
    return np.matmul(channels_last.reshape(n, h * w, c), weights[:, :, None]).reshape(n, h, w)


def _channel_sum(elements: np.ndarray, eigen_smooth: bool) -> np.ndarray:
    return first_component(elements) if eigen_smooth else elements.sum(axis=1)


def gradcam(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """GradCAM: channels weighted by their mean gradient."""
    return weighted_sum(g.mean(axis=(2, 3)), a, eigen_smooth)


def gradcam_plus_plus(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """GradCAM++ (Chattopadhay et al. 2018, eq. 19): second/third-order gradient weighting."""
    g2 = g * g
    a_sum = a.sum(axis=(2, 3), keepdims=True)
    alpha = g2 / (2.0 * g2 + a_sum * (g2 * g) + 1e-6)
    alpha = np.where(g != 0, alpha, 0.0)
    return weighted_sum((np.maximum(g, 0) * alpha).sum(axis=(2, 3)), a, eigen_smooth)


def xgradcam(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """XGradCAM: gradients weighted by the channel's share of activation."""
    a_sum = a.sum(axis=(2, 3), keepdims=True)
    return weighted_sum((g * a / (a_sum + 1e-7)).sum(axis=(2, 3)), a, eigen_smooth)


def hirescam(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """HiResCAM: element-wise gradient x activation, summed over channels."""
    return _channel_sum(g * a, eigen_smooth)


def gradcam_elementwise(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """GradCAM element-wise: ReLU of gradient x activation, summed over channels."""
    return _channel_sum(np.maximum(g * a, 0), eigen_smooth)


def layercam(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """LayerCAM: positive gradients as per-position weights of the activations."""
    return _channel_sum(np.maximum(g, 0) * a, eigen_smooth)


def eigencam(a: np.ndarray, g: np.ndarray | None = None, eigen_smooth: bool = False) -> np.ndarray:
    """EigenCAM: first principal component of the activations (gradients unused)."""
    return first_component(a)


def eigengradcam(a: np.ndarray, g: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """EigenGradCAM: first principal component of gradient x activation."""
    return first_component(g * a)


def kpcacam(a: np.ndarray, g: np.ndarray | None = None, eigen_smooth: bool = False) -> np.ndarray:
    """KPCA-CAM: first sigmoid-kernel principal component of the activations."""
    return kernel_first_component(a)


def fem(a: np.ndarray, g: np.ndarray | None = None, eigen_smooth: bool = False, k: float = 2.0) -> np.ndarray:
    """FEM: channels weighted by the share of positions above their ``mean + k std``."""
    mean = a.mean(axis=(2, 3), keepdims=True)
    std = a.std(axis=(2, 3), keepdims=True)
    weights = (a > mean + k * std).mean(axis=(2, 3))
    return weighted_sum(weights.astype(np.float32), a)
