"""Turn a target layer's activations (or gradients) into NCHW maps.

The graph returns each layer in its own layout (see :class:`camserve.manifest.LayerSpec`):
``NCHW`` CNN feature maps, ``NHWC`` maps (torchvision Swin stages) and ``tokens``
``[N, T, C]`` with ``prefix_tokens`` leading special tokens (ViT's class token) followed by
a row-major ``grid``. CAM methods work on ``[N, C, h, w]``; this module is the only place
that knows the difference. Results are views where numpy allows (no copy of a
``[N, 197, 768]`` ViT tensor per request).
"""

from __future__ import annotations

import numpy as np

from camserve.errors import InputError
from camserve.manifest import LayerSpec


def to_nchw(array: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """Return ``array`` (layout ``spec.layout``, batch first) as ``[N, C, h, w]``.

    tokens: ``x[:, prefix:, :]`` reshaped to ``[N, gh, gw, C]`` then moved channel-first,
    exactly pytorch-grad-cam's ViT ``reshape_transform``; NHWC: ``permute(0, 3, 1, 2)``.
    """
    expected = (array.shape[0], *spec.shape)
    if array.shape != expected:
        raise InputError(f"layer {spec.name!r}: expected an array of shape {list(expected)}, got {list(array.shape)}")
    if spec.layout == "NCHW":
        return array
    if spec.layout == "NHWC":
        return array.transpose(0, 3, 1, 2)
    gh, gw = spec.spatial
    n, _, c = array.shape
    return array[:, spec.prefix_tokens :, :].reshape(n, gh, gw, c).transpose(0, 3, 1, 2)


def channel_axis(spec: LayerSpec) -> int:
    """Axis of the channels in a batched array of this layout (1 for NCHW, else last)."""
    return 1 if spec.layout == "NCHW" else -1
