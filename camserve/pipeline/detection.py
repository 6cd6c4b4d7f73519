"""Object detection: detections and EigenCAM maps renormalized inside their boxes.

The detection graph (:mod:`camserve.export.detection`) answers one image at a time with
boxes, scores, labels and the feature pyramid's activations (``|.|``, resized, stacked).
The explanation is gradient-free, as in pytorch-grad-cam's Faster R-CNN tutorial:

1. EigenCAM of the stacked activations: the projection on their first principal component,
   ReLU, min-max, resized to the input (:func:`eigencam_maps`, the oracle's ``EigenCAM``);
2. the kept detections (score >= threshold, optionally of the asked classes or the top k)
   select boxes; inside each box the map is min-max normalized again, outside it is 0, and
   overlapping boxes take the larger value; the result is min-max normalized once more
   (:func:`renormalize_in_boxes`).

Where we differ from the tutorial's ``renormalize_cam_in_bounding_boxes``: it normalizes a
box's crop with ``scale_cam_image``, which iterates over its first axis and so normalizes
row by row, and a later box overwrites an earlier one where they overlap; we normalize each
box as a whole and take the maximum, so the map does not depend on the order of the boxes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from camserve.cam import parallel
from camserve.cam.projection import first_component
from camserve.cam.scaling import EPS, combine_layers, minmax
from camserve.errors import InputError, ManifestError
from camserve.manifest import Manifest
from camserve.pipeline.box_score import EXTRA, BoxScore
from camserve.pipeline.box_score import METHODS as BOX_METHODS
from camserve.pipeline.params import Target

#: The method detection is explained by (gradient-free: the graph has no backward).
METHOD = "eigencam"


@dataclass(frozen=True)
class Detections:
    """One batch through the detection graph: per image ``boxes [D, 4]`` (x1, y1, x2, y2 in
    graph-input pixels), ``scores [D]``, ``labels [D]``; ``activations [N, C, h, w]``. With the
    ``boxscore`` extra also per image each detection's proposal ``rois [D, 4]`` and the pyramid
    ``levels`` (``[C, h, w]`` each) its box head pools from (:mod:`camserve.pipeline.box_score`)."""

    boxes: list[np.ndarray]
    scores: list[np.ndarray]
    labels: list[np.ndarray]
    activations: np.ndarray
    rois: list[np.ndarray] | None = None
    levels: list[list[np.ndarray]] | None = None


class DetectionSession:
    """An ONNX Runtime session over a detection export (one image per graph run)."""

    def __init__(self, directory: str | Path, *, providers: list[str] | None = None,
                 intra_op_threads: int | None = None, verify_hash: bool = True) -> None:
        from camserve.pipeline.runtime import checked_extra, checked_graph, create_session, default_providers, session_options

        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        if not self.manifest.detection:
            raise ManifestError(f"{self.directory} holds a {self.manifest.kind} export, not a detector")
        graph = checked_graph(self.directory, self.manifest, verify_hash)
        self.providers = providers or default_providers()
        self.options = session_options(intra_op_threads)
        self.session = create_session(graph, self.options, self.providers)
        self.extras: dict[str, Any] = {}
        #: The box-score gradients (the export's ``boxscore`` extra), or None.
        self.box_score: BoxScore | None = None
        entry = self.manifest.extras.get(EXTRA)
        if entry is not None:
            checked_extra(self.directory, entry, verify_hash)
            self.box_score = BoxScore(self.directory, entry, self.options, self.providers)
        self.outputs = [o.name for o in self.session.get_outputs()]

    @property
    def threads(self) -> int:
        """ONNX Runtime's intra-op threads: post-processing may use as many (``camserve.cam.parallel``)."""
        return int(self.options.intra_op_num_threads)

    def check_images(self, images: np.ndarray) -> np.ndarray:
        from camserve.pipeline.runtime import check_images

        return check_images(images, self.manifest)

    def run(self, images: np.ndarray) -> Detections:
        """Every image through the graph (its batch is one image: the detectors' post-processing
        loops over images, so the graph is exported at one)."""
        images = self.check_images(images)
        boxes, scores, labels, acts, rois, levels = [], [], [], [], [], []
        for image in images:
            out = dict(zip(self.outputs, self.session.run(None, {"image": image[None]})))
            boxes.append(out["boxes"].reshape(-1, 4))
            scores.append(out["scores"].reshape(-1))
            labels.append(out["labels"].reshape(-1).astype(np.int64))
            acts.append(out["activations_0"])
            if self.box_score is not None:
                rois.append(out["rois"].reshape(-1, 4))
                levels.append([out[name][0] for name in self.box_score.geometry.level_outputs])
        return Detections(boxes, scores, labels, np.concatenate(acts, axis=0),
                          rois if self.box_score is not None else None, levels if self.box_score is not None else None)


def eigencam_maps(activations: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """EigenCAM ``[N, H, W]`` in [0, 1] of activations ``[N, C, h, w]`` at input size ``size``."""
    return combine_layers([first_component(activations)], size)


def box_pixels(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Boxes as integer pixel ranges ``[x1, y1, x2, y2]`` clipped to the image (the tutorial's
    ``astype(int32)``: coordinates truncated, ``x2``/``y2`` exclusive)."""
    h, w = size
    pix = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).astype(np.int64)
    return np.clip(pix, 0, [w, h, w, h])


def renormalize_in_boxes(cams: np.ndarray, image_index: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Maps ``[N, H, W]`` renormalized inside boxes (see the module docstring).

    ``boxes [B, 4]`` are integer pixel boxes (:func:`box_pixels`) and ``image_index [B]`` says
    which map each belongs to. An image without boxes gets an all-zero map.

    One slice per box: the crops are ragged, and a slice costs the box's area, where the
    batched form (a ``[B, H, W]`` mask per box) costs ``B x H x W``: 130x slower at 100 boxes
    per 320 px image (1.7 s against 13 ms for 8 images, ``bench/bench_detection.py``).
    """
    out = np.zeros(cams.shape, dtype=np.float32)
    for i, (x1, y1, x2, y2) in zip(np.asarray(image_index).tolist(), np.asarray(boxes).tolist()):
        crop = cams[i, y1:y2, x1:x2]
        if crop.size == 0:  # a box of no pixel (clipped away)
            continue
        lo, hi = crop.min(), crop.max()
        view = out[i, y1:y2, x1:x2]
        np.maximum(view, (crop - lo) / (EPS + (hi - lo)), out=view)
    return minmax(out)


def keep(det: Detections, threshold: float, classes: tuple[int, ...] = (), topk: int | None = None) -> list[np.ndarray]:
    """Per image, the indices of the answered detections: score >= ``threshold``, of
    ``classes`` when given, at most ``topk`` (highest scores first)."""
    kept = []
    for scores, labels in zip(det.scores, det.labels):
        ok = scores >= threshold
        if classes:
            ok &= np.isin(labels, classes)
        idx = np.flatnonzero(ok)
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        kept.append(idx[:topk] if topk is not None else idx)
    return kept


@dataclass(frozen=True)
class Explained:
    """Detections, the kept ones per image, their EigenCAM maps ``[N, H, W]`` (None when not
    asked), each box-score method's maps per image ``[K_i, H, W]`` (one per kept detection,
    in ``kept`` order) and the seconds spent."""

    detections: Detections
    kept: list[np.ndarray]
    cams: np.ndarray | None
    timings: dict[str, float]
    box_cams: dict[str, list[np.ndarray]] = field(default_factory=dict)
    #: Seconds per method asked (the box-score gradients' share split among their methods).
    method_seconds: dict[str, float] = field(default_factory=dict)


@parallel.session_threads
def explain(session: DetectionSession, images: np.ndarray, threshold: float, classes: tuple[int, ...] = (),
            topk: int | None = None, maps: bool = True, methods: tuple[str, ...] = (METHOD,),
            eigen_smooth: bool = False) -> Explained:
    """Run the detector on ``images`` and (``maps``) explain its kept detections by each of
    ``methods``: ``eigencam`` (one map per image, renormalized in the boxes) or a gradient
    method of :data:`camserve.pipeline.box_score.METHODS` (one map per detection, of its score)."""
    start = time.perf_counter()
    det = session.run(images)
    inference = time.perf_counter() - start
    kept = keep(det, threshold, classes, topk)
    cams, box_cams = None, {}
    size = tuple(session.manifest.input_size)
    spent: dict[str, float] = {}  # seconds per method (the gradients' share split among the methods using them)
    if maps and METHOD in methods:
        t0 = time.perf_counter()
        raw = eigencam_maps(det.activations, size)
        index = np.concatenate([np.full(len(k), i, dtype=np.int64) for i, k in enumerate(kept)])
        boxes = np.concatenate([box_pixels(det.boxes[i][k], size) for i, k in enumerate(kept)]) if len(index) else np.zeros((0, 4), np.int64)
        cams = renormalize_in_boxes(raw, index, boxes)
        spent[METHOD] = time.perf_counter() - t0
    scored = [m for m in methods if m != METHOD] if maps else []
    if scored:
        if session.box_score is None:
            raise InputError(f"methods {', '.join(scored)} need the export's {EXTRA} extra (camserve export --kind detection --extras {EXTRA})")
        box_cams = {m: [] for m in scored}
        spent.update({m: 0.0 for m in scored})
        for i, k in enumerate(kept):
            t0 = time.perf_counter()
            grads = session.box_score.gradients(det.levels[i], det.rois[i][k], det.labels[i][k])
            shared = (time.perf_counter() - t0) / len(scored)
            for m in scored:
                t0 = time.perf_counter()
                box_cams[m].append(session.box_score.maps(m, det.levels[i], grads, size, eigen_smooth))
                spent[m] += shared + time.perf_counter() - t0
    timings = {"inference": inference, "cam": time.perf_counter() - start - inference}
    return Explained(det, kept, cams, timings, box_cams, spent)


# ------------------------------------------------------------------ serving ---
#
# The detector's share of :class:`camserve.pipeline.service.Service`: one graph run per image,
# one EigenCAM per image over the kept detections. An answer's image lists its detections
# (as ``predictions``, boxes in the sent image's pixels) and one ``eigencam`` explanation
# whose map is renormalized inside their boxes; its overlay has the boxes drawn.

#: :func:`camserve.pipeline.params.parse_params` defaults for a detector: eigencam over every
#: detection (``target`` class indices keep the detections of those classes, ``topk`` the k best).
PARAM_DEFAULTS: dict[str, Any] = {"default_methods": (METHOD,), "default_target": Target()}


def unavailable(methods: tuple[str, ...], box_score: bool) -> dict[str, str]:
    """Why each method a detector cannot run is refused: every method but eigencam, and the box
    scores' gradient methods where the export has their extra."""
    scored = set(BOX_METHODS) if box_score else set()
    out = {}
    for name in methods:
        if name == METHOD or name in scored:
            continue
        if name in BOX_METHODS:
            out[name] = (f"on a detector it explains each detection's score, which needs the {EXTRA!r} graph "
                         f"(re-export with camserve export --kind detection --extras {EXTRA}; two-stage detectors only)")
        else:
            out[name] = f"a detector is explained by {METHOD} or, with the {EXTRA!r} extra, by {', '.join(BOX_METHODS)}"
    return out


def check_params(params: Any, model: str) -> None:
    """400s for what a detector cannot honour, naming the parameter."""
    from camserve.pipeline.params import BadParameter

    if params.metrics:
        raise BadParameter(f"parameter metrics is not defined for detection model {model!r} (no class probability to perturb)")
    if params.score != "logit":
        raise BadParameter(f"parameter score={params.score} is not defined for detection model {model!r} (EigenCAM has no "
                           "target score; the gradient methods explain each detection's own score)")
    if params.explain and params.aug_smooth:
        raise BadParameter(f"parameter aug_smooth is not supported for detection model {model!r} (the boxes move with the augmentation)")


def run_groups(service: Any, items: list[Any], batch: np.ndarray) -> dict[int, dict[str, Any]]:
    """Each request's detections (and maps, when it asks for explanations), per item."""
    results: dict[int, dict[str, Any]] = {}
    threshold_default = float(service.manifest.threshold)
    for item in items:  # the graph runs per image anyway: a request is its own group
        p = item.params
        rows = batch[item.rows]
        service.recorder.batch(len(rows))
        try:
            out = explain(service.session, rows, p.threshold if p.threshold is not None else threshold_default,
                          p.target.classes, p.target.topk, maps=p.explain, methods=tuple(p.methods),
                          eigen_smooth=p.eigen_smooth)
        except Exception as exc:  # noqa: BLE001 - the request fails, the batch goes on
            item.error = exc
            continue
        service.recorder.inference(out.timings["inference"])
        for method, seconds in out.method_seconds.items():
            service.recorder.explain(method, seconds)
        item.timings = dict(out.timings)
        item.batch = len(rows)
        cams = {METHOD: list(out.cams[:, None])} if out.cams is not None else {}  # [T=1, H, W] per image
        cams.update(out.box_cams)  # [T = kept detections, H, W] per image
        results[id(item)] = {"explained": out, "cams": cams}
    return results


def _detections(service: Any, det: Detections, i: int, kept: np.ndarray, scale: tuple[float, float]) -> list[dict[str, Any]]:
    sx, sy = scale
    labels = service.manifest.labels
    out = []
    for d in kept:
        x1, y1, x2, y2 = (float(v) for v in det.boxes[i][d])
        index = int(det.labels[i][d])
        out.append({"index": index, "label": labels[index] if 0 <= index < len(labels) else str(index),
                    "score": round(float(det.scores[i][d]), 6),
                    "box": [round(x1 * sx, 2), round(y1 * sy, 2), round(x2 * sx, 2), round(y2 * sy, 2)]})
    return out


def draw_boxes(image: np.ndarray, detections: list[dict[str, Any]]) -> np.ndarray:
    """``image`` (uint8 RGB) with each detection's box and label drawn."""
    import cv2

    out = np.ascontiguousarray(image).copy()
    thick = max(1, round(min(out.shape[:2]) / 200))
    for d in detections:
        x1, y1, x2, y2 = (int(round(v)) for v in d["box"])
        cv2.rectangle(out, (x1, y1), (x2, y2), (255, 255, 255), thick)
        cv2.putText(out, f"{d['label']} {d['score']:.2f}", (x1 + 2, max(y1 - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * thick, (255, 255, 255), thick, cv2.LINE_AA)
    return out


def _explanation(method: str, target: dict[str, Any], cam: np.ndarray, rgb: np.ndarray, drawn: list[dict[str, Any]],
                 output: Any, degenerate: str | None) -> dict[str, Any]:
    """One explanation of an image's answer: ``cam`` ``[H, W]`` with ``drawn`` boxes on its overlay."""
    import base64

    from camserve.pipeline import render
    from camserve.pipeline.summary import summarize

    summary = summarize(cam[None], image_size=(int(rgb.shape[0]), int(rgb.shape[1]))).as_dicts()[0]
    summary.update(signal_ratio=None, degenerate=degenerate is not None, degenerate_reason=degenerate)
    exp: dict[str, Any] = {"method": method, "target": target, "summary": summary}
    if "png" in output:
        exp["png"] = base64.b64encode(render.heatmap_png(cam[None])[0]).decode("ascii")
    if "overlay" in output:
        exp["overlay"] = base64.b64encode(render.encode_png(draw_boxes(render.overlay(rgb, cam), drawn))).decode("ascii")
    if "array" in output:
        exp["array"] = render.to_float16(cam[None]).to_json()
    return exp


def answer(service: Any, item: Any, result: dict[str, Any]) -> dict[str, Any]:
    """The ``images`` of a detector's ``camserve/1`` answer (see :mod:`camserve.pipeline.service`)."""
    out: Explained = result["explained"]
    params = item.params
    h_in, w_in = service.manifest.input_size
    images = []
    for i, (name, rgb) in enumerate(zip(item.names, item.images)):
        scale = (rgb.shape[1] / w_in, rgb.shape[0] / h_in)
        found = _detections(service, out.detections, i, out.kept[i], scale)
        entry: dict[str, Any] = {"field": name, "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
                                 "predictions": found}
        if params.explain:
            entry["explanations"] = []
            for method in params.methods:
                if method == METHOD and out.cams is not None:
                    reason = None if found else "no detection kept: the map is zero"
                    entry["explanations"].append(_explanation(METHOD, {"detections": len(found)}, out.cams[i], rgb, found,
                                                              params.output, reason))
                for j, cam in enumerate(out.box_cams[method][i] if method in out.box_cams else ()):
                    d = found[j]
                    reason = None if cam.max() > 0 else "the score's gradient is zero where the box is pooled"
                    target = {"detection": j, "index": d["index"], "label": d["label"], "score": d["score"]}
                    entry["explanations"].append(_explanation(method, target, cam, rgb, [d], params.output, reason))
        images.append(entry)
    return {"images": images}
