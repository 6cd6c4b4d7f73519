"""Targets of an explanation: which class each CAM explains, and the rows sent to the graph.

A request gives, per image, either explicit class indices (``[3, 17]``) or ``TopK(k)``
(the ``k`` highest logits; top-1 is ``TopK(1)``). They expand into *rows*, one per
(image, target) pair, because gradients exist per target: an explicit class becomes a
one-hot cotangent row, a rank ``r`` becomes ``target_rank = r`` so the graph picks the
``r``-th highest logit itself and the whole batch needs one run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from camserve.errors import InputError


@dataclass(frozen=True)
class TopK:
    """The ``k`` highest-scoring classes of an image (in decreasing order of logit)."""

    k: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise InputError(f"TopK needs a positive integer k, got {self.k!r}")


Target = Union[Sequence[int], TopK]


@dataclass(frozen=True)
class Rows:
    """The expanded (image, target) rows.

    ``image[r]`` is the row's image index, ``cls[r]`` its explicit class (-1 if ranked) and
    ``rank[r]`` its logit rank (-1 if explicit); ``counts[i]`` = targets of image ``i``.
    """

    image: np.ndarray
    cls: np.ndarray
    rank: np.ndarray
    counts: list[int]

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @property
    def one_each(self) -> bool:
        """Every image has exactly one row (then ``image`` is ``0..N-1``)."""
        return len(self) == len(self.counts)

    def take(self, per_image: np.ndarray) -> np.ndarray:
        """Each row's entry of a per-image array (``per_image[image]``, ``[N, ...]`` -> ``[R,
        ...]``); the array itself where every image has one row, without the copy (an image
        batch's indexing copied 0.6 MB a 224 px image, counted as post-processing)."""
        if self.one_each and len(per_image) == len(self.counts):
            return per_image
        return per_image[self.image]

    def first_of_each(self, per_row: np.ndarray) -> np.ndarray:
        """Each image's first row of a per-row array (``[R, ...]`` -> ``[N, ...]``); the array
        itself where every image has one row (resnet50 at N=32: 12.8 MB of activations that
        only the activation methods read were copied)."""
        if self.one_each:
            return per_row
        return per_row[np.searchsorted(self.image, np.arange(len(self.counts)))]  # rows are sorted by image

    def split(self, per_row: np.ndarray | list) -> list:
        """A per-row array (or list) cut into each image's rows, in image order: ``np.split``
        by ``counts``, by slicing (np.split's bookkeeping took 40 us a call right after a
        graph run)."""
        parts, start = [], 0
        for count in self.counts:
            parts.append(per_row[start : start + count])
            start += count
        return parts

    def one_hot(self, num_classes: int) -> np.ndarray:
        """Cotangent ``[R, K]``: one-hot rows for explicit classes, zero rows for ranked ones."""
        out = np.zeros((len(self), num_classes), dtype=np.float32)
        explicit = self.cls >= 0
        out[np.flatnonzero(explicit), self.cls[explicit]] = 1.0
        return out

    def resolve(self, logits: np.ndarray) -> np.ndarray:
        """Each row's class: the explicit one, or the ``rank``-th highest of the row's logits.

        Ties are broken towards the lower index, as ONNX TopK does.
        """
        explicit = self.cls >= 0
        if explicit.all():  # also no rows
            return self.cls.astype(np.int64)
        if self.rank.max() <= 0 and not math.isnan(logits.max()):  # max is NaN where any logit is
            # Only the top class is asked: argmax (first of ties) is the stable sort's first
            # column without sorting every row's logits (~70 us a row at 1000 classes).
            ranked = np.argmax(logits, axis=1)
        else:
            order = np.argsort(-logits, axis=1, kind="stable")
            ranked = order[np.arange(len(self)), np.maximum(self.rank, 0)]
        return np.where(explicit, self.cls, ranked).astype(np.int64, copy=False)

    def repeat(self, times: int) -> Rows:
        """Rows for ``times`` copies of the batch stacked image-major: image ``i`` copy ``a`` is
        image ``a * N + i``; row ``r`` copy ``a`` is row ``a * R + r``."""
        n = len(self.counts)
        offsets = np.repeat(np.arange(times) * n, len(self))
        return Rows(
            image=np.tile(self.image, times) + offsets,
            cls=np.tile(self.cls, times),
            rank=np.tile(self.rank, times),
            counts=self.counts * times,
        )


def expand_targets(targets: Sequence[Target], num_images: int, num_classes: int) -> Rows:
    """Validate ``targets`` (one entry per image) and expand them into rows.

    Raises InputError naming the offending value: wrong number of entries, an empty list,
    a non-integer or out-of-range class, ``k`` larger than the number of classes.
    """
    if isinstance(targets, (TopK, str, bytes)) or not isinstance(targets, Sequence):
        raise InputError(f"targets must be a list with one entry per image, got {targets!r}")
    if len(targets) != num_images:
        raise InputError(f"targets has {len(targets)} entries for {num_images} images")
    image, cls, rank, counts = [], [], [], []
    for i, target in enumerate(targets):
        if isinstance(target, TopK):
            if target.k > num_classes:
                raise InputError(f"image {i}: TopK({target.k}) asks for more than the model's {num_classes} classes")
            image += [i] * target.k
            cls += [-1] * target.k
            rank += list(range(target.k))
            counts.append(target.k)
            continue
        if isinstance(target, (str, bytes)) or not isinstance(target, Sequence) or len(target) == 0:
            raise InputError(f"image {i}: target must be TopK(k) or a non-empty list of class indices, got {target!r}")
        for c in target:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                raise InputError(f"image {i}: class index {c!r} is not an integer")
            if not 0 <= c < num_classes:
                raise InputError(f"image {i}: class index {c} is out of range [0, {num_classes})")
        image += [i] * len(target)
        cls += [int(c) for c in target]
        rank += [-1] * len(target)
        counts.append(len(target))
    return Rows(np.asarray(image, np.int64), np.asarray(cls, np.int64), np.asarray(rank, np.int64), counts)


def finer_cotangent(logits: np.ndarray, main: np.ndarray, comparisons: int = 3, alpha: float = 1.0) -> np.ndarray:
    """FinerCAM's cotangent ``dL/dz`` ``[R, K]`` for logits ``z`` and main classes ``m``.

    ``S`` = the ``comparisons`` classes whose logits are closest to ``z_m`` (``m`` excluded),
    ``p = softmax(z)``, ``L = sum_{j in S} p_j (z_m - alpha z_j) / (sum_{j in S} p_j + 1e-9)``
    (pytorch-grad-cam's ``FinerWeightedTarget``; the softmax weights are differentiated too).
    With ``A = sum_S p_j d_j``, ``d_j = z_m - alpha z_j``, ``B = sum_S p_j + 1e-9``:
    ``dA/dz_k = [k in S] p_k (d_k - alpha) - p_k A' + [k = m] B'``, ``dB/dz_k = [k in S] p_k - p_k B'``
    (``A' = sum_S p_j d_j``, ``B' = sum_S p_j``) and ``dL/dz = (dA B - A dB) / B^2``.
    """
    z = logits.astype(np.float64)
    r, k = z.shape
    rows = np.arange(r)
    n_cmp = min(comparisons, k - 1)
    distance = np.abs(z - z[rows, main][:, None])
    distance[rows, main] = -1.0  # the main class sorts first and is then dropped
    chosen = np.argsort(distance, axis=1, kind="stable")[:, 1 : 1 + n_cmp]
    in_s = np.zeros((r, k), dtype=bool)
    in_s[rows[:, None], chosen] = True
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    d = z[rows, main][:, None] - alpha * z
    ps = np.where(in_s, p, 0.0)
    a_sum = (ps * d).sum(axis=1, keepdims=True)
    b_sum = ps.sum(axis=1, keepdims=True)
    one_main = np.zeros((r, k))
    one_main[rows, main] = 1.0
    d_a = ps * (d - alpha) - p * a_sum + one_main * b_sum
    d_b = ps - p * b_sum
    b = b_sum + 1e-9
    return ((d_a * b - a_sum * d_b) / (b * b)).astype(np.float32)


#: What a gradient explains (pytorch-grad-cam's targets): ``logit`` the class's output
#: (``ClassifierOutputTarget``), ``softmax`` its softmax probability
#: (``ClassifierOutputSoftmaxTarget``), ``binary`` a single sigmoid output for category 1 or
#: its negation for category 0 (``BinaryClassifierOutputTarget``).
SCORES = ("logit", "softmax", "binary")


def resolve_binary(rows: Rows, logits: np.ndarray) -> np.ndarray:
    """Each row's category (0 or 1) on a one-output head: the explicit one, else by rank in
    the order of the categories' scores (``z`` for 1, ``-z`` for 0; rank 0 = predicted)."""
    z = logits[:, 0]
    first = (z > 0).astype(np.int64)  # the predicted category
    ranked = np.where(rows.rank == 0, first, 1 - first)
    return np.where(rows.cls >= 0, rows.cls, ranked).astype(np.int64)


def score_cotangent(score: str, logits: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``d score / d logits`` ``[R, K]`` of each row's target (``logits`` ``[R, K]``, ``classes`` ``[R]``).

    ``softmax``: ``p_c (e_c - p)``; ``binary``: ``+1`` for category 1, ``-1`` for 0 on the one
    output; ``logit``: ``e_c``.
    """
    r, k = logits.shape
    rows = np.arange(r)
    if score == "binary":
        if k != 1:
            raise InputError(f"score=binary needs a head with one output, this model has {k}")
        return np.where(classes == 1, 1.0, -1.0).astype(np.float32)[:, None]
    one_hot = np.zeros((r, k))
    one_hot[rows, classes] = 1.0
    if score == "logit":
        return one_hot.astype(np.float32)
    if score != "softmax":
        raise InputError(f"unknown score {score!r} (known: {', '.join(SCORES)})")
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    return (p[rows, classes][:, None] * (one_hot - p)).astype(np.float32)


def check_regions(regions: np.ndarray, rows: Rows, segmentation: bool, aug_smooth: bool, size: tuple[int, int]) -> np.ndarray:
    """Client masks, checked: a segmentation model's, one per image at the input size, with
    named classes (a client mask has no predicted area to rank by) and no augmentation."""
    regions = np.asarray(regions, dtype=np.float32)
    if not segmentation:
        raise InputError("regions (client masks) apply to segmentation models only")
    n = int(rows.image.max(initial=-1)) + 1
    if regions.ndim != 3 or regions.shape[1:] != size or len(regions) < n:
        raise InputError(f"regions must have shape [{n}, {size[0]}, {size[1]}], got {list(regions.shape)}")
    client = regions.reshape(len(regions), -1)[:, 0] >= 0
    if (client[rows.image] & (rows.rank >= 0)).any():
        raise InputError("a client mask's targets must name classes (top-k ranks by predicted area, which a client mask has not)")
    if aug_smooth and client.any():
        raise InputError("aug_smooth is not defined with a client mask (the mask would move with the augmentation)")
    return regions


def class_areas(maps: np.ndarray) -> np.ndarray:
    """Pixels predicted as each class, float32 ``[N, K]``, of segmentation outputs ``[N, K, H, W]``."""
    n, k = maps.shape[:2]
    predicted = maps.argmax(axis=1).reshape(n, -1)
    return np.stack([np.bincount(row, minlength=k) for row in predicted]).astype(np.float32)
