"""Requests to an embedding model (:mod:`camserve.concepts`): which concepts, and their vectors.

A request names registered concepts (``concept=car,truck``) and/or sends one concept image
as a multipart part named ``concept_image``; each image of the request is explained once per
concept, and each explanation's ``target`` is ``{"index": j, "label": concept name (or
"concept image"), "score": cosine similarity}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from camserve.pipeline import imageio
from camserve.pipeline.params import BadParameter, RequestParams

CONCEPT_PART = "concept_image"
IMAGE_CONCEPT = "concept image"


def split_parts(parts: list[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], bytes | None]:
    """The images to explain, and the bytes of the part named ``concept`` (None if absent)."""
    concept = [data for name, data in parts if name == CONCEPT_PART]
    if len(concept) > 1:
        raise BadParameter(f"the request has {len(concept)} parts named {CONCEPT_PART!r}; send one concept image")
    return [(name, data) for name, data in parts if name != CONCEPT_PART], (concept[0] if concept else None)


def check(params: RequestParams, manifest: Any, registry: dict[str, np.ndarray], has_image: bool, model: str) -> None:
    """400s for concept asks the model cannot honour, naming the problem."""
    if not manifest.embedding:
        if params.concepts or has_image:
            raise BadParameter(f"concepts apply to embedding models; model {model!r} is a {manifest.output_activation} classifier")
        return
    if not params.explain:
        return
    unknown = [name for name in params.concepts if name not in registry]
    if unknown:
        known = ", ".join(sorted(registry)) or "none registered (camserve concepts add)"
        raise BadParameter(f"unknown concept {unknown[0]!r} for model {model!r} (known: {known})")
    if not params.concepts and not has_image:
        raise BadParameter(f"model {model!r} is an embedding model: name a concept (concept=NAME) or send an image "
                           f"part named {CONCEPT_PART!r} to explain the similarity to")
    if params.metrics:
        raise BadParameter("parameter metrics is not defined for embedding models (no class probability to perturb)")


def vectors(session: Any, registry: dict[str, np.ndarray], names: tuple[str, ...],
            image: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    """Concept vectors ``[C, D]`` (named ones, then the image's embedding) and their labels."""
    rows = [registry[name] for name in names]
    labels = list(names)
    if image is not None:
        m = session.manifest
        x = imageio.preprocess([image], m.input_size, m.mean, m.std, m.channel_order)
        rows.append(session.forward_logits(x)[0])
        labels.append(IMAGE_CONCEPT)
    return np.stack(rows).astype(np.float32), labels
