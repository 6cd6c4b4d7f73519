"""Concepts of an embedding model: named embeddings that explanations measure similarity to.

An embedding model (``camserve export --kind embedding``) answers "why is this image like
*that*": the target is the cosine similarity ``cos(e, f)`` between the image's embedding
``e`` and a concept embedding ``f`` (pytorch-grad-cam's "Pixel Attribution for embeddings"
tutorial, ``SimilarityToConceptTarget``). A concept is either

* **registered** with the model: ``camserve concepts add EXPORT --name car car1.jpg car2.jpg``
  stores the mean embedding of the images under ``car`` in ``EXPORT/concepts.npz`` (the
  archive carries it); requests name it, ``concept=car``;
* **sent** with the request: a multipart part named ``concept_image``, embedded
  with the same forward graph (one more forward).

The gradient of ``cos(e, f)`` with respect to ``e`` is ``f / (|e| |f|) - cos * e / |e|^2``: it
depends on ``e``, so the exported graph of an embedding model computes it itself. A row fed
with ``target_rank = -2`` reads its cotangent as the concept ``f`` (``camserve.export.trace``),
and one explain run answers the embedding and the similarity's gradients.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from camserve.errors import InputError

CONCEPTS_FILE = "concepts.npz"
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def load(directory: str | Path) -> dict[str, np.ndarray]:
    """The registered concepts of an export (name -> float32 ``[D]``); empty when none."""
    path = Path(directory) / CONCEPTS_FILE
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {name: np.asarray(data[name], dtype=np.float32) for name in data.files}


def save(directory: str | Path, concepts: dict[str, np.ndarray]) -> Path:
    """Write ``concepts`` as the export's registry (replacing it atomically)."""
    path = Path(directory) / CONCEPTS_FILE
    tmp = path.with_name(f".{CONCEPTS_FILE}.partial.npz")
    np.savez(tmp, **{name: np.asarray(v, dtype=np.float32) for name, v in concepts.items()})
    tmp.replace(path)
    return path


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise InputError(f"concept name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return name


def cosine(e: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of ``e`` ``[R, D]`` and ``f`` ``[R, D]`` (float64)."""
    e, f = np.asarray(e, np.float64), np.asarray(f, np.float64)
    return (e * f).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(f, axis=1) + 1e-12)


def cosine_cotangent(e: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``d cos(e, f) / d e`` ``[R, D]`` float32: ``f / (|e| |f|) - cos * e / |e|^2``."""
    e, f = np.asarray(e, np.float64), np.asarray(f, np.float64)
    ne, nf = np.linalg.norm(e, axis=1, keepdims=True), np.linalg.norm(f, axis=1, keepdims=True)
    cos = (e * f).sum(1, keepdims=True) / (ne * nf + 1e-12)
    return (f / (ne * nf + 1e-12) - cos * e / (ne * ne + 1e-12)).astype(np.float32)
