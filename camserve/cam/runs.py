"""Channel weights of the methods that run the model again: ScoreCAM and AblationCAM.

Both loop only over *batches of graph runs*; each batch is built with array indexing over
flattened (image, channel) pairs, so images of one request share batches.

ScoreCAM (Wang et al. 2020), per image ``x`` and target class ``t``::

    M_c = minmax_1e-8(up(A_c))      up = bilinear, align_corners=True, to the input size
    s_c = logit_t(x * M_c)          w = softmax_c(s)         cam = sum_c w_c A_c

AblationCAM (Desai & Ramaswamy 2020), through the head graph ``f`` (activations -> logits)::

    s_c = f_t(A with channel c set to v)      w_c = (y_t - s_c) / y_t

with ``y_t`` the unablated logit and the ablation value ``v = 0`` when the image's
activations have minimum 0 (ReLU outputs), else ``min(A) - 1e7``. pytorch-grad-cam uses
the same rule but, within one ablation batch, re-reads the minimum after each ablated
row, so its value drifts to ``min - 2e7, min - 3e7, ...`` down the batch; ours is the
same for every channel (equal to its value at batch size 1).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from camserve.manifest import LayerSpec
from camserve.cam.layouts import channel_axis
from camserve.cam.scaling import resize_maps

#: Masked images per graph run for ScoreCAM (pytorch-grad-cam's default is 16; the
#: result does not depend on it beyond float rounding).
SCORECAM_BATCH = 32
#: Ablated activation sets per head-graph run.
ABLATION_BATCH = 64
ABLATION_OFFSET = 1e7


class LogitRunner(Protocol):
    def logits(self, images: np.ndarray) -> np.ndarray: ...

    def head_logits(self, activations: np.ndarray, images: np.ndarray | None = None) -> np.ndarray: ...


def _pairs(num_images: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    return np.repeat(np.arange(num_images), channels), np.tile(np.arange(channels), num_images)


def _class_columns(row_class: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct classes needed, and each row's column among them."""
    needed, column = np.unique(row_class, return_inverse=True)
    return needed, column.reshape(-1)


def scorecam_weights(
    session: LogitRunner,
    images: np.ndarray,
    maps: np.ndarray,
    row_image: np.ndarray,
    row_class: np.ndarray,
    batch_size: int = SCORECAM_BATCH,
) -> np.ndarray:
    """ScoreCAM weights ``[R, C]`` for rows ``(row_image, row_class)``.

    ``images`` ``[U, 3, H, W]`` and ``maps`` ``[U, C, h, w]`` (NCHW view of one layer) are
    per distinct image; every (image, channel) pair is run once and its logits serve all of
    that image's target rows.
    """
    u, c = maps.shape[:2]
    size = images.shape[-2:]
    needed, column = _class_columns(row_class)
    scores = np.empty((u, c, needed.size), dtype=np.float32)
    pair_img, pair_ch = _pairs(u, c)
    for start in range(0, pair_img.size, batch_size):
        pi, pc = pair_img[start : start + batch_size], pair_ch[start : start + batch_size]
        masks = resize_maps(maps[pi, pc], size, align_corners=True)
        low = masks.min(axis=(1, 2), keepdims=True)
        high = masks.max(axis=(1, 2), keepdims=True)
        masks = (masks - low) / (high - low + 1e-8)
        logits = session.logits(images[pi] * masks[:, None])
        scores[pi, pc] = logits[:, needed]
    s = scores[row_image, :, column]
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def ablation_values(activations: np.ndarray) -> np.ndarray:
    """Per-image ablation value ``[U]``: 0 if the image's minimum activation is 0, else min - 1e7."""
    low = activations.reshape(activations.shape[0], -1).min(axis=1)
    return np.where(low == 0, 0.0, low - ABLATION_OFFSET).astype(np.float32)


def ablation_weights(
    session: LogitRunner,
    activations: np.ndarray,
    spec: LayerSpec,
    logits: np.ndarray,
    row_image: np.ndarray,
    row_class: np.ndarray,
    images: np.ndarray | None = None,
    batch_size: int = ABLATION_BATCH,
) -> np.ndarray:
    """AblationCAM weights ``[R, C]``.

    ``activations`` are the layer's raw outputs per distinct image (``[U, ...]`` in the
    manifest layout, what the head graph takes); ``logits`` ``[U, K]`` the unablated ones.
    ``images`` ``[U, 3, H, W]`` go along with each ablated row when the head graph also
    needs them (a layer that is not a cut of the model, e.g. ViT's ``ln_1``).
    """
    u = activations.shape[0]
    axis = channel_axis(spec) % activations.ndim
    c = activations.shape[axis]
    values = ablation_values(activations)
    needed, column = _class_columns(row_class)
    scores = np.empty((u, c, needed.size), dtype=np.float32)
    pair_img, pair_ch = _pairs(u, c)
    for start in range(0, pair_img.size, batch_size):
        pi, pc = pair_img[start : start + batch_size], pair_ch[start : start + batch_size]
        batch = activations[pi]
        channel_first = np.moveaxis(batch, axis, 1)  # a view: writes go to ``batch``
        channel_first[np.arange(pi.size), pc] = values[pi].reshape((-1,) + (1,) * (batch.ndim - 2))
        row_images = None if images is None else images[pi]
        scores[pi, pc] = session.head_logits(batch, row_images)[:, needed]
    original = logits[row_image, row_class][:, None].astype(np.float32)
    ablated = scores[row_image, :, column]
    return ((original - ablated) / original).astype(np.float32)
