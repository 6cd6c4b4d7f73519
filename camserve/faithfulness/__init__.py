"""Faithfulness of an explanation: does the model's confidence follow the map?

Each metric perturbs the (preprocessed) input by the map and runs the model *forward only*
(:meth:`camserve.pipeline.runtime.GraphSession.forward_logits`, a graph without the
backward), and compares the target class's softmax probability before and after (the
``ClassifierOutputSoftmaxTarget`` of pytorch-grad-cam's README and tutorial).

====================  ==============================================================  ====================
name                  value per (image, method, target)                               cost per map
====================  ==============================================================  ====================
``road``              ROADCombined ``(mean LeRF - mean MoRF) / 2`` over percentiles    18 forwards +
                      10..90 (higher = more faithful); also gives the two below        18 sparse solves
``road_morf``         mean over percentiles of ``p(removed most relevant) - p``        9 + 9
``road_lerf``         mean over percentiles of ``p(removed least relevant) - p``       9 + 9
``confidence_change`` ``p(x * cam) - p`` (CamMultImageConfidenceChange)                1 forward
``drop``              ``max(p - p(x * cam), 0)`` (DropInConfidence)                    1 forward
``increase``          ``1`` if ``p(x * cam) > p`` else ``0`` (IncreaseInConfidence)    1 forward
====================  ==============================================================  ====================

``p`` is the unperturbed probability, from the explanation's own logits (no extra forward).
ROAD's perturbation is :mod:`camserve.faithfulness.road`; its noise comes from a generator
with a fixed seed per map, so the same request scores the same. Where a map ties (ReLU'd
maps are 0 on much of the image) ROAD keeps exactly ``p`` % of the pixels, ties broken by a
fixed scattered order (:func:`camserve.faithfulness.road.keep_masks`; pytorch-grad-cam keeps
none there and scores NaN); a constant map scores ``road`` 0. A metric that cannot be
computed for a map (an image too small to keep any pixel) is NaN (``null`` in JSON).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from camserve.errors import InputError
from camserve.faithfulness.road import NOISE, PERCENTILES, impute, kept_count, removal_rank

METRIC_NAMES: tuple[str, ...] = ("road", "road_morf", "road_lerf", "confidence_change", "drop", "increase")
ROAD_METRICS = ("road", "road_morf", "road_lerf")
CAM_MULT_METRICS = ("confidence_change", "drop", "increase")
#: Most perturbed images per forward call (bounds the memory of a ROAD batch).
FORWARD_CHUNK = 32


def parse_metrics(value: str | Iterable[str]) -> tuple[str, ...]:
    """Metric names from ``"road,drop"`` or a list; InputError naming an unknown one."""
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value)]
    if not items or any(not v for v in items):
        raise InputError(f"metrics {value!r} has an empty entry (known: {', '.join(METRIC_NAMES)})")
    for name in items:
        if name not in METRIC_NAMES:
            raise InputError(f"unknown faithfulness metric {name!r} (known: {', '.join(METRIC_NAMES)})")
    return tuple(dict.fromkeys(items))


def forward_cost(metrics: Sequence[str]) -> int:
    """Extra forwards per map that ``metrics`` cost (the docs' cost column)."""
    road = 0
    if "road" in metrics or ("road_morf" in metrics and "road_lerf" in metrics):
        road = 2 * len(PERCENTILES)
    elif "road_morf" in metrics or "road_lerf" in metrics:
        road = len(PERCENTILES)
    return road + (1 if any(m in CAM_MULT_METRICS for m in metrics) else 0)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _chunked(forward: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    return np.concatenate([forward(images[i : i + FORWARD_CHUNK]) for i in range(0, len(images), FORWARD_CHUNK)])


def score_maps(
    forward: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    cams: np.ndarray,
    classes: np.ndarray,
    metrics: Sequence[str],
    *,
    base_logits: np.ndarray | None = None,
    noise: float = NOISE,
    seed: int = 0,
    threads: int | None = None,
    probabilities: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The asked ``metrics`` of ``R`` maps: ``{name: float64 [R]}`` (NaN where undefined).

    ``forward``: preprocessed images ``[B, 3, H, W]`` -> logits ``[B, K]``; ``images``
    ``[R, 3, H, W]`` preprocessed float32 (row ``r`` is the image of map ``r``); ``cams``
    ``[R, H, W]`` in [0, 1] at the images' size; ``classes`` ``[R]`` target classes;
    ``base_logits`` ``[R, K]`` the unperturbed logits when known (else one forward).
    ``road`` also answers ``road_morf`` and ``road_lerf``. ``probabilities``: logits ``[B, K]``
    -> the probabilities that ``classes`` index (default softmax; a sigmoid head's come from
    :func:`camserve.heads.probabilities`).
    """
    prob = probabilities or softmax
    metrics = parse_metrics(metrics)
    images = np.ascontiguousarray(images, dtype=np.float32)
    cams = np.asarray(cams, dtype=np.float32)
    classes = np.asarray(classes, dtype=np.int64)
    r = len(images)
    if cams.shape != (r, *images.shape[2:]) or classes.shape != (r,):
        raise InputError(f"score_maps needs cams [{r}, {images.shape[2]}, {images.shape[3]}] and classes [{r}], "
                         f"got {list(cams.shape)} and {list(classes.shape)}")
    rows = np.arange(r)
    base = prob(base_logits if base_logits is not None else _chunked(forward, images))[rows, classes]
    out: dict[str, np.ndarray] = {}
    wanted_road = [m for m in ROAD_METRICS if m in metrics]
    if wanted_road:
        orders = []
        if "road" in metrics or "road_morf" in metrics:
            orders.append(("road_morf", True))
        if "road" in metrics or "road_lerf" in metrics:
            orders.append(("road_lerf", False))
        for name, morf in orders:
            out[name] = _road_curve(forward, prob, images, cams, classes, base, morf, noise, seed, threads)
        if "road" in metrics:
            out["road"] = (out["road_lerf"] - out["road_morf"]) / 2.0
    if any(m in CAM_MULT_METRICS for m in metrics):
        probs = prob(_chunked(forward, images * cams[:, None]))[rows, classes]
        diff = probs.astype(np.float32) - base.astype(np.float32)
        out["confidence_change"] = diff.astype(np.float64)
        out["drop"] = np.maximum(-diff, 0).astype(np.float64)
        out["increase"] = (diff > 0).astype(np.float64)
    return {name: out[name] for name in METRIC_NAMES if name in out and (name in metrics or name in ROAD_METRICS)}


def _road_curve(forward: Callable[[np.ndarray], np.ndarray], prob: Callable[[np.ndarray], np.ndarray], images: np.ndarray, cams: np.ndarray, classes: np.ndarray,
                base: np.ndarray, most_relevant_first: bool, noise: float, seed: int, threads: int | None) -> np.ndarray:
    """Mean over :data:`PERCENTILES` of the probability change after ROAD's removal."""
    p = len(PERCENTILES)
    rank = removal_rank(cams, most_relevant_first)[:, None]  # one sort per map serves every percentile
    counts = np.array([kept_count(rank[0].size, q) for q in PERCENTILES])
    keep = rank < counts[None, :, None, None]  # [R, P, H, W]
    flat_keep = keep.reshape(-1, *cams.shape[1:])
    source = np.repeat(images, p, axis=0)  # row r, percentile j at r * P + j
    imputed, ok = impute(source, flat_keep, noise=noise, seed=seed, threads=threads)
    probs = prob(_chunked(forward, imputed))[np.arange(len(imputed)), np.repeat(classes, p)]
    diff = (probs.astype(np.float32) - np.repeat(base, p).astype(np.float32)).reshape(-1, p)
    diff = np.where(ok.reshape(-1, p), diff, np.nan)
    return diff.astype(np.float64).mean(axis=1)
