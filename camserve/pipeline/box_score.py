"""Gradient CAMs of a two-stage detector's box scores (the ``boxscore`` export extra).

pytorch-grad-cam's ``FasterRCNNBoxScoreTarget`` explains a detection by its score. A kept
detection's score (its class probability) depends on the feature pyramid only through its
proposal's RoIAlign, since torchvision's R-CNNs detach the proposals, so its gradient at the
pyramid levels splits into two exact parts that need no detector backward:

1. RoIAlign (``aligned=False``, ``sampling_ratio`` samples per bin and axis) is separable:
   each output bin averages bilinear weights along y and along x, with torchvision's border
   rules per axis, so per box on its level ``pooled[c] = Ay @ F[c] @ Ax.T`` with
   ``Ay [7, h]`` and ``Ax [7, w]`` (:func:`roi_matrices`), and its transpose sends a
   gradient back as ``dF[c] = Ay.T @ dpooled[c] @ Ax``.
2. The box head and predictor with the score's gradient, ``(pooled, label) -> (score,
   d score / d pooled)``, are the export's ``boxscore.onnx``
   (:mod:`camserve.export.box_score`).

The gradient methods then run as on any layer, per detection: the activations are the
level's maps the detection was pooled from, the gradients its own (zero outside the
footprint of its box). Maps are min-max normalized per detection over the whole image.
The IoU term of pytorch-grad-cam's target (which compares a detection with a reference box)
is not part: a detection is explained by its own score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from camserve.cam import get_method
from camserve.cam.scaling import minmax, resize_maps
from camserve.errors import ManifestError

#: The export extra's name (``camserve export --kind detection --extras boxscore``) and file.
EXTRA = "boxscore"
GRAPH_FILE = "boxscore.onnx"
#: The gradient methods a box score is explained by (their maps are sums over channels).
METHODS: tuple[str, ...] = ("gradcam", "hirescam", "gradcamelementwise", "gradcam++", "xgradcam", "layercam")


@dataclass(frozen=True)
class Geometry:
    """The box pooler as exported: the pyramid levels it reads (``names``, ``shapes`` ``[C, h,
    w]``, ``scales`` level cells per transformed-image pixel), torchvision's level mapper
    (``k_min``, ``k_max``, ``canonical_scale``, ``canonical_level``, ``eps``), RoIAlign's
    ``sampling_ratio`` and ``output_size``, and the size ``(h, w)`` the detector's transform
    resizes the input to (boxes and levels are in that frame)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int, int], ...]
    scales: tuple[float, ...]
    k_min: int
    k_max: int
    canonical_scale: float
    canonical_level: float
    eps: float
    sampling_ratio: int
    output_size: int
    transformed_size: tuple[int, int]

    @property
    def level_outputs(self) -> tuple[str, ...]:
        """The detection graph's outputs holding the pooled levels, in :attr:`names` order."""
        return tuple(f"level_{i}" for i in range(len(self.names)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        try:
            return cls(names=tuple(data["names"]), shapes=tuple(tuple(int(v) for v in s) for s in data["shapes"]),
                       scales=tuple(float(s) for s in data["scales"]), k_min=int(data["k_min"]), k_max=int(data["k_max"]),
                       canonical_scale=float(data["canonical_scale"]), canonical_level=float(data["canonical_level"]),
                       eps=float(data["eps"]), sampling_ratio=int(data["sampling_ratio"]),
                       output_size=int(data["output_size"]), transformed_size=tuple(int(v) for v in data["transformed_size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"the boxscore extra's geometry is missing or malformed: {exc}") from exc


def level_of(geometry: Geometry, rois: np.ndarray) -> np.ndarray:
    """The level index of each box ``[M, 4]``, torchvision's ``LevelMapper`` (FPN paper eq. 1,
    in float32 as there): ``floor(k0 + log2(sqrt(area) / s0) + eps)`` clamped to the levels."""
    rois = np.asarray(rois, dtype=np.float32).reshape(-1, 4)
    side = np.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))
    with np.errstate(divide="ignore"):
        k = np.floor(np.float32(geometry.canonical_level) + np.log2(side / np.float32(geometry.canonical_scale))
                     + np.float32(geometry.eps))
    return (np.clip(k, geometry.k_min, geometry.k_max) - geometry.k_min).astype(np.int64)


def axis_weights(lo: np.ndarray, hi: np.ndarray, n: int, scale: float, bins: int, samples: int) -> np.ndarray:
    """``[M, bins, n]``: RoIAlign's bilinear weights along one axis, averaged over each bin's
    ``samples`` points, for spans ``[lo, hi)`` in transformed-image pixels on ``n`` level cells.

    torchvision's rules (``aligned=False``): a span is at least one cell; a point below -1 or
    above ``n`` weighs nothing; one below 0 reads cell 0; one at or past the last cell reads it."""
    lo = np.asarray(lo, dtype=np.float64) * scale
    step = np.maximum((np.asarray(hi, dtype=np.float64) * scale) - lo, 1.0) / bins
    rows = np.repeat(np.arange(len(lo))[:, None], bins, axis=1)
    cols = np.repeat(np.arange(bins)[None], len(lo), axis=0)
    out = np.zeros((len(lo), bins, n))
    for i in range(samples):
        at = lo[:, None] + (np.arange(bins)[None] + (i + 0.5) / samples) * step[:, None]
        inside = (at >= -1.0) & (at <= n)
        at = np.maximum(at, 0.0)
        low = np.floor(at).astype(np.int64)
        last = low >= n - 1
        low = np.where(last, n - 1, low)
        frac = np.where(last, 0.0, at - low)
        np.add.at(out, (rows, cols, low), np.where(inside, 1.0 - frac, 0.0) / samples)
        np.add.at(out, (rows, cols, np.minimum(low + 1, n - 1)), np.where(inside, frac, 0.0) / samples)
    return out


def roi_matrices(geometry: Geometry, rois: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """``(level [M], [(Ay [M, 7, h], Ax [M, 7, w]) per level])`` of boxes ``[M, 4]`` (x1, y1, x2,
    y2 in the transformed frame); a box's rows are zero on the levels it is not pooled from."""
    rois = np.asarray(rois, dtype=np.float64).reshape(-1, 4)
    level = level_of(geometry, rois)
    mats = []
    for i, ((_, h, w), scale) in enumerate(zip(geometry.shapes, geometry.scales)):
        on = (level == i)[:, None, None]
        ay = axis_weights(rois[:, 1], rois[:, 3], h, scale, geometry.output_size, geometry.sampling_ratio) * on
        ax = axis_weights(rois[:, 0], rois[:, 2], w, scale, geometry.output_size, geometry.sampling_ratio) * on
        mats.append((ay.astype(np.float32), ax.astype(np.float32)))
    return level, mats


def pool(levels: list[np.ndarray], mats: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """RoIAlign ``[M, C, 7, 7]`` of each box on its level (``levels``: ``[C, h, w]`` each)."""
    return sum(np.einsum("mph,chw,mqw->mcpq", ay, f, ax, optimize=True) for f, (ay, ax) in zip(levels, mats)).astype(np.float32)


def to_level(grads: np.ndarray, ay: np.ndarray, ax: np.ndarray) -> np.ndarray:
    """RoIAlign's transpose: ``d pooled [M, C, 7, 7]`` -> ``d level [M, C, h, w]``."""
    return np.einsum("mph,mcpq,mqw->mchw", ay, grads, ax, optimize=True)


#: Bytes of level-sized arrays (each box's gradient, and its level's activations beside it)
#: made at once: boxes are taken in chunks, so a detector with large levels and many boxes
#: (fasterrcnn_resnet50_fpn: 256 x 200 x 200 floats per box at its finest level) stays bounded.
CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class BoxGradients:
    """Each box's score and ``d score / d pooled`` ``[M, C, 7, 7]``, with its level and its
    RoIAlign matrices: the gradient on the level, ``[C, h, w]`` per box, is made from these
    only where a map needs it (:meth:`at`, :meth:`BoxScore.maps`)."""

    scores: np.ndarray
    level: np.ndarray
    pooled: np.ndarray
    mats: list[tuple[np.ndarray, np.ndarray]]

    def at(self, rows: np.ndarray) -> np.ndarray:
        """``d score / d level`` ``[len(rows), C, h, w]`` of boxes ``rows``, all on one level."""
        ay, ax = self.mats[int(self.level[rows[0]])]
        return to_level(self.pooled[rows], ay[rows], ax[rows])


class BoxScore:
    """The ``boxscore`` extra of a detection export: its graph and the pooler's geometry."""

    def __init__(self, directory: str | Path, entry: dict[str, Any], options: Any, providers: list[str]) -> None:
        from camserve.pipeline.runtime import create_session

        self.geometry = Geometry.from_dict(entry.get("geometry") or {})
        self.session = create_session(Path(directory) / entry.get("file", GRAPH_FILE), options, providers)

    def gradients(self, levels: list[np.ndarray], rois: np.ndarray, labels: np.ndarray) -> BoxGradients:
        """The scores and gradients of the boxes ``rois [M, 4]`` of classes ``labels`` on one
        image's ``levels`` (one run of the box head's graph)."""
        level, mats = roi_matrices(self.geometry, rois)
        if len(level) == 0:
            empty = np.zeros((0, self.geometry.shapes[0][0], self.geometry.output_size, self.geometry.output_size), np.float32)
            return BoxGradients(np.zeros(0, np.float32), level, empty, mats)
        scores, dpooled = self.session.run(None, {"pooled": pool(levels, mats), "labels": np.asarray(labels, np.int64)})
        return BoxGradients(scores, level, dpooled, mats)

    def maps(self, method: str, levels: list[np.ndarray], grads: BoxGradients, size: tuple[int, int],
             eigen_smooth: bool = False) -> np.ndarray:
        """``method``'s maps ``[M, H, W]`` in [0, 1] at the input ``size``, one per box, from its
        level's activations and its own gradients (boxes of one level together, in chunks of
        :data:`CHUNK_BYTES`)."""
        spec = get_method(method)
        out = np.zeros((len(grads.level), *size), dtype=np.float32)
        for i, acts in enumerate(levels):
            on = np.flatnonzero(grads.level == i)
            step = max(1, CHUNK_BYTES // max(1, acts.nbytes))
            for start in range(0, len(on), step):
                rows = on[start : start + step]
                a = np.ascontiguousarray(np.broadcast_to(acts, (len(rows), *acts.shape)))
                raw = spec.function(a, grads.at(rows), eigen_smooth)
                out[rows] = self._to_input(minmax(np.maximum(raw, 0)), self.geometry.scales[i], size)
        return minmax(out)

    def _to_input(self, maps: np.ndarray, scale: float, size: tuple[int, int]) -> np.ndarray:
        """Level-grid maps to the input: the grid covers the transformed image plus the
        transform's padding (to a multiple of its stride), which is cropped first."""
        h, w = maps.shape[-2:]
        th, tw = self.geometry.transformed_size
        padded = (round(h / scale), round(w / scale))
        if padded != (th, tw):
            maps = resize_maps(maps, padded)[..., :th, :tw]
        return resize_maps(maps, size)
