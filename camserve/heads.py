"""Outputs to probabilities and predictions, by the kind of head (``manifest.output_activation``).

* ``softmax``: one class of K; predictions are the top 5 classes.
* ``sigmoid`` with K > 1 (multi-label): each label independently; predictions are the labels
  whose probability is at least the threshold (the manifest's, or the request's
  ``threshold``), most probable first.
* ``sigmoid`` with K = 1 (binary): two *categories*, 1 = the label is present (probability
  ``s = sigmoid(z)``) and 0 = absent (``1 - s``), as pytorch-grad-cam's
  ``BinaryClassifierOutputTarget``; the prediction is category 1 when ``s`` reaches the
  threshold, else 0. Targets, answers and faithfulness scores use categories as indices.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TOP_PREDICTIONS = 5


def probabilities(logits: np.ndarray, manifest: Any) -> np.ndarray:
    """``[N, K]`` probabilities (``[N, 2]`` per category for a binary head), float64; an
    embedding model's outputs as they are (no class, no probability)."""
    z = np.asarray(logits, dtype=np.float64)
    if getattr(manifest, "embedding", False):
        return z
    if getattr(manifest, "segmentation", False):  # a class's share of the predicted pixels
        n, k = z.shape[:2]
        predicted = z.argmax(axis=1).reshape(n, -1)
        return np.stack([np.bincount(row, minlength=k) for row in predicted]) / predicted.shape[1]
    if getattr(manifest, "output_activation", "softmax") == "softmax":
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    s = 1.0 / (1.0 + np.exp(-z))
    return np.concatenate([1.0 - s, s], axis=-1) if manifest.binary else s


def predicted(probs: np.ndarray, manifest: Any, threshold: float | None = None) -> list[int]:
    """Indices (classes, labels or categories) an image's answer lists as predictions (none
    for an embedding model)."""
    if getattr(manifest, "embedding", False):
        return []
    if getattr(manifest, "segmentation", False):  # the classes present, largest first
        return [int(c) for c in np.argsort(-probs, kind="stable")[:TOP_PREDICTIONS] if probs[c] > 0]
    if getattr(manifest, "output_activation", "softmax") == "softmax":
        return [int(c) for c in np.argsort(-probs, kind="stable")[: min(TOP_PREDICTIONS, len(probs))]]
    limit = manifest.threshold if threshold is None else threshold
    if manifest.binary:
        return [1 if probs[1] >= limit else 0]
    order = np.argsort(-probs, kind="stable")
    return [int(c) for c in order if probs[c] >= limit]


def label(index: int, manifest: Any) -> str:
    """The name of a class, label or (binary) category."""
    labels = list(manifest.labels)
    if getattr(manifest, "binary", False):
        return labels[0] if index == 1 else f"not {labels[0]}"
    return labels[index] if index < len(labels) else str(index)


def num_targets(manifest: Any) -> int:
    """How many target indices a request may name: K, or 2 categories for a binary head."""
    return 2 if getattr(manifest, "binary", False) else manifest.num_outputs
