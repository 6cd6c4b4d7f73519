"""Guided Backprop and Guided Grad-CAM from the ``guided`` extra graph's input gradients.

The graph gives the guided input gradient ``gb [R, 3, H, W]`` (every ``nn.ReLU``'s backward
replaced by ``grad * [x > 0] * [grad > 0]``, see :mod:`camserve.export.extras`). As in
pytorch-grad-cam's example:

* Guided Backprop's picture is ``deprocess(gb)``;
* Guided Grad-CAM's is ``deprocess(cam * gb)`` with ``cam [R, H, W]`` the GradCAM map of the
  same target (broadcast over the colour channels);

``deprocess(x) = uint8(255 * clip(0.1 * (x - mean x) / (std x + 1e-5) + 0.5, 0, 1))`` with the
mean and standard deviation over the whole picture of each row (pytorch-grad-cam answers
image 0 of a batch; camserve answers every row). Beside the picture each method gives a map
``[R, H, W]`` in [0, 1] for summaries and heatmaps: the min-max of ``sum_c |picture term|``.
"""

from __future__ import annotations

import numpy as np

from camserve.cam.scaling import minmax


def deprocess(x: np.ndarray) -> np.ndarray:
    """``[R, H, W, 3]`` float -> uint8 pictures, normalized per row (see the module docstring)."""
    x = x.astype(np.float64)
    axes = tuple(range(1, x.ndim))
    x = x - x.mean(axis=axes, keepdims=True)
    x = x / (x.std(axis=axes, keepdims=True) + 1e-5)
    return np.uint8(np.clip(x * 0.1 + 0.5, 0, 1) * 255)


def guided_pictures(gb: np.ndarray, cam: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pictures uint8 ``[R, H, W, 3]``, maps float32 ``[R, H, W]``) of ``gb [R, 3, H, W]``,
    times ``cam [R, H, W]`` for Guided Grad-CAM."""
    term = gb.transpose(0, 2, 3, 1)
    if cam is not None:
        term = term * cam[..., None]
    return deprocess(term), minmax(np.abs(term).sum(axis=-1))
