"""Test-time augmentation for ``aug_smooth``: flips and brightness scalings in one batch.

pytorch-grad-cam's ``aug_smooth`` runs its CAM once per ttach augmentation
(``HorizontalFlip`` x ``Multiply([0.9, 1, 1.1])``: 6 combinations, applied to the
preprocessed tensor), un-flips each final CAM and averages the six (no rescale after the
mean). Here the six copies of the batch are stacked into one larger batch (copy ``a`` of
image ``i`` at index ``a * N + i``) so the graph runs once; copy 0 is the identity.
"""

from __future__ import annotations

import numpy as np

#: (horizontal flip, brightness factor) per copy; the first is the identity.
AUGMENTATIONS: tuple[tuple[bool, float], ...] = tuple(
    (flip, factor) for flip in (False, True) for factor in (1.0, 0.9, 1.1)
)


def augment(images: np.ndarray) -> np.ndarray:
    """``[N, 3, H, W]`` -> ``[A * N, 3, H, W]``: every augmentation of the batch, stacked."""
    copies = []
    for flip, factor in AUGMENTATIONS:
        x = images[..., ::-1] if flip else images
        copies.append(x * np.float32(factor) if factor != 1.0 else x)
    return np.ascontiguousarray(np.concatenate(copies, axis=0), dtype=np.float32)


def deaugment_mean(cams: np.ndarray) -> np.ndarray:
    """``[A * R, H, W]`` CAMs of the stacked copies -> ``[R, H, W]``: un-flip, then mean."""
    a = len(AUGMENTATIONS)
    per_copy = cams.reshape(a, cams.shape[0] // a, *cams.shape[1:])
    flips = np.array([flip for flip, _ in AUGMENTATIONS])
    per_copy = np.where(flips[:, None, None, None], per_copy[..., ::-1], per_copy)
    return per_copy.mean(axis=0, dtype=np.float32)
