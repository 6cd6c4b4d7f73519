"""The faithfulness metrics a request asks for (``metrics=road,drop``), over one explanation.

One :func:`camserve.faithfulness.score_maps` call scores every (image, target, method) map of
a model call, so their perturbed images share forward batches. The unperturbed
probabilities come from the explanation's own logits: no extra forward for them.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np


def score_explanation(session: Any, images: np.ndarray, explanation: Any, methods: Sequence[str],
                      metrics: Sequence[str], manifest: Any = None) -> tuple[dict[str, list[dict[str, np.ndarray]]], float]:
    """``({method: [per image {metric: float64 [T_i]}]}, seconds)`` for the maps of ``explanation``
    (``camserve.cam.explain``'s answer for preprocessed ``images`` [N, 3, H, W]); probabilities
    by the head of ``manifest`` (default: the session's)."""
    from camserve import heads
    from camserve.faithfulness import score_maps

    manifest = manifest if manifest is not None else session.manifest
    start = time.perf_counter()
    counts = [len(c) for c in explanation.classes]
    image_rows = np.repeat(np.arange(len(counts)), counts)
    class_rows = np.concatenate([np.asarray(c, dtype=np.int64) for c in explanation.classes])
    cams = np.concatenate([np.concatenate(explanation.cams[m], axis=0) for m in methods], axis=0)
    rows = np.tile(image_rows, len(methods))
    scores = score_maps(session.forward_logits, images[rows], cams, np.tile(class_rows, len(methods)), metrics,
                        base_logits=explanation.logits[rows],
                        probabilities=lambda z: heads.probabilities(z, manifest))
    out: dict[str, list[dict[str, np.ndarray]]] = {}
    r, splits = len(image_rows), np.cumsum(counts)[:-1]
    for j, method in enumerate(methods):
        per_image = {name: np.split(values[j * r : (j + 1) * r], splits) for name, values in scores.items()}
        out[method] = [{name: per_image[name][i] for name in per_image} for i in range(len(counts))]
    return out, time.perf_counter() - start


def as_json(values: dict[str, np.ndarray], t: int) -> dict[str, float | None]:
    """Target ``t``'s metrics as JSON numbers (``None`` where undefined)."""
    return {name: (None if not np.isfinite(v[t]) else round(float(v[t]), 6)) for name, v in values.items()}
