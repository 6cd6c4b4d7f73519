"""The ``boxscore`` extra of a detection export: what a two-stage detector's box-score
gradients need (:mod:`camserve.pipeline.box_score` computes them at request time).

* The detection graph also answers, per kept detection, the proposal box it was refined
  from (``rois [D, 4]``, in the transformed frame) and the pyramid levels the box head pools
  from (``level_<i> [1, C, h, w]``). torchvision's ``postprocess_detections`` loses the
  proposal of each detection in its filters and NMS, so during the export it is replaced by
  :func:`postprocess_with_proposals`, the same steps carrying each candidate's proposal index.
* ``boxscore.onnx``: the box head and predictor as a joint graph, ``(pooled [M, C, 7, 7],
  labels [M]) -> (scores [M], gradients [M, C, 7, 7])`` with ``scores`` the class
  probabilities, traced by camserve's own tracer.
* The pooler's geometry in the manifest (:class:`camserve.pipeline.box_score.Geometry`).

Only R-CNNs (a ``roi_heads`` with a multi-scale RoIAlign pooler) have box scores of this
form; single-stage detectors score anchors directly from the pyramid.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from camserve.errors import ExportError
from camserve.pipeline.box_score import EXTRA, GRAPH_FILE, Geometry


def check_supported(model: nn.Module) -> nn.Module:
    """``model.roi_heads`` where it is a torchvision R-CNN's, else ExportError naming why."""
    from torchvision.ops import MultiScaleRoIAlign

    heads = getattr(model, "roi_heads", None)
    if heads is None or not isinstance(getattr(heads, "box_roi_pool", None), MultiScaleRoIAlign):
        raise ExportError(f"the boxscore extra needs a two-stage detector (roi_heads with a MultiScaleRoIAlign pooler); "
                          f"{type(model).__name__} has none")
    if getattr(heads.box_roi_pool, "sampling_ratio", 0) <= 0:
        raise ExportError("the boxscore extra needs a fixed RoIAlign sampling_ratio (> 0)")
    return heads


def postprocess_with_proposals(heads: nn.Module, class_logits: torch.Tensor, box_regression: torch.Tensor,
                               proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]], store: list):
    """torchvision's ``RoIHeads.postprocess_detections`` (decode, softmax, clip, drop the
    background, score threshold, small boxes, per-class NMS, the detections limit), with each
    candidate's proposal index carried through; appends each image's kept proposals to ``store``."""
    from torchvision.ops import boxes as box_ops

    classes = class_logits.shape[-1]
    counts = [p.shape[0] for p in proposals]
    decoded = heads.box_coder.decode(box_regression, proposals).split(counts, 0)
    probs = F.softmax(class_logits, -1).split(counts, 0)
    out: tuple[list, list, list] = ([], [], [])
    for boxes, scores, shape, props in zip(decoded, probs, image_shapes, proposals):
        boxes = box_ops.clip_boxes_to_image(boxes, shape)
        labels = torch.arange(classes).view(1, -1).expand_as(scores)
        owner = torch.arange(scores.shape[0]).view(-1, 1).expand_as(scores)
        boxes, scores = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1)
        labels, owner = labels[:, 1:].reshape(-1), owner[:, 1:].reshape(-1)
        keep = torch.where(scores > heads.score_thresh)[0]
        boxes, scores, labels, owner = boxes[keep], scores[keep], labels[keep], owner[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels, owner = boxes[keep], scores[keep], labels[keep], owner[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, heads.nms_thresh)[: heads.detections_per_img]
        boxes, scores, labels, owner = boxes[keep], scores[keep], labels[keep], owner[keep]
        out[0].append(boxes)
        out[1].append(scores)
        out[2].append(labels)
        store.append(props[owner])
    return out


@contextlib.contextmanager
def tracking(heads: nn.Module, store: dict[str, list]) -> Iterator[None]:
    """While active, ``heads`` records into ``store``: ``"rois"``, each image's kept proposals
    (:func:`postprocess_with_proposals`), ``"levels"`` the pyramid it was given (a dict of
    maps) and ``"shapes"`` the transformed image sizes."""
    original = heads.postprocess_detections

    def patched(self, class_logits, box_regression, proposals, image_shapes):
        return postprocess_with_proposals(self, class_logits, box_regression, proposals, image_shapes, store["rois"])

    def seen(_module, args):
        store["levels"].append(args[0])
        store["shapes"].append(args[2])

    heads.postprocess_detections = types.MethodType(patched, heads)
    hook = heads.register_forward_pre_hook(seen)
    try:
        yield
    finally:
        hook.remove()
        heads.postprocess_detections = original


def level_names(heads: nn.Module, features: dict[str, torch.Tensor]) -> list[str]:
    """The pyramid levels the box pooler reads, in its order."""
    return [name for name in heads.box_roi_pool.featmap_names if name in features]


def geometry(heads: nn.Module, features: dict[str, torch.Tensor], shapes: list[tuple[int, int]]) -> Geometry:
    """The pooler's geometry after a forward (its scales and level mapper are set by the first one)."""
    pool = heads.box_roi_pool
    if pool.scales is None or pool.map_levels is None:
        raise ExportError("the box pooler has not run: no scales to record")
    names = level_names(heads, features)
    mapper = pool.map_levels
    size = pool.output_size
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ExportError(f"the boxscore extra needs a square RoIAlign output, got {tuple(size)}")
        size = size[0]
    return Geometry(names=tuple(names), shapes=tuple(tuple(int(d) for d in features[n].shape[1:]) for n in names),
                    scales=tuple(float(s) for s in pool.scales), k_min=int(mapper.k_min), k_max=int(mapper.k_max),
                    canonical_scale=float(mapper.s0), canonical_level=float(mapper.lvl0), eps=float(mapper.eps),
                    sampling_ratio=int(pool.sampling_ratio), output_size=int(size),
                    transformed_size=(int(shapes[0][0]), int(shapes[0][1])))


def export_head(heads: nn.Module, example: tuple[torch.Tensor, torch.Tensor], path: Path) -> None:
    """``boxscore.onnx``: ``(pooled, labels) -> (scores, d scores / d pooled)`` of ``heads``'
    box head and predictor (each row's score depends on its own row only, so the gradient of
    their sum is every row's own)."""
    from camserve.export.onnx_export import export_graph
    from camserve.export.trace import trace_joint

    def joint(pooled: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = pooled.detach().requires_grad_(True)
            logits = heads.box_predictor(heads.box_head(x))[0]
            score = torch.softmax(logits, -1).gather(1, labels[:, None])[:, 0]
            (grad,) = torch.autograd.grad(score, [x], grad_outputs=torch.ones_like(score))
        return score.detach(), grad

    holder = nn.ModuleDict({"box_head": heads.box_head, "box_predictor": heads.box_predictor}).eval()
    export_graph(trace_joint(holder, [], example, fn=joint), example, ["pooled", "labels"], ["scores", "gradients"], path)


def check_route(heads: nn.Module, box_score: Any, levels: list[np.ndarray], rois: np.ndarray, labels: np.ndarray,
                expected: np.ndarray, shapes: list[tuple[int, int]], limit: int = 8) -> dict[str, float]:
    """The served route (RoIAlign matrices, ``boxscore.onnx``, the transpose) against torch
    autograd through torchvision's own pooler and head, for the first ``limit`` boxes:
    ``{"scores": max abs diff to torch's and to the detections' own ``expected`` scores (so the
    boxes are the detections' proposals), "gradients": max abs diff / the largest gradient,
    "boxes": how many were compared}``."""
    names = list(box_score.geometry.names)
    rois, labels, expected = rois[:limit], labels[:limit], expected[:limit]
    route = box_score.gradients(levels, rois, labels)
    leaves = {n: torch.from_numpy(np.ascontiguousarray(f[None])).requires_grad_(True) for n, f in zip(names, levels)}
    worst = {"scores": 0.0, "gradients": 0.0, "boxes": len(rois)}
    for m in range(len(rois)):
        pooled = heads.box_roi_pool(leaves, [torch.from_numpy(rois[m : m + 1].astype(np.float32))], shapes)
        score = torch.softmax(heads.box_predictor(heads.box_head(pooled))[0], -1)[0, int(labels[m])]
        truth = [g.numpy()[0] for g in torch.autograd.grad(score, list(leaves.values()))]
        scale = max(float(np.abs(t).max()) for t in truth) or 1.0
        ours = [route.at(np.array([m]))[0] if i == route.level[m] else np.zeros_like(t) for i, t in enumerate(truth)]
        ours_score = float(route.scores[m])
        worst["scores"] = max(worst["scores"], abs(float(score.detach()) - ours_score), abs(float(expected[m]) - ours_score))
        worst["gradients"] = max(worst["gradients"], max(float(np.abs(o - t).max()) for o, t in zip(ours, truth)) / scale)
    return worst


#: Parity of the route against torch autograd, relative to each box's largest gradient.
TOL = 1e-4


def wanted(extras: Any) -> bool:
    """Whether a detection export's ``extras`` ask for ``boxscore`` (ExportError for any other name)."""
    names = list(extras or ())
    unknown = [e for e in names if e != EXTRA]
    if unknown:
        raise ExportError(f"unknown extra {unknown[0]!r} for a detector (known: {EXTRA})")
    return EXTRA in names


def prepare(model: nn.Module, image: torch.Tensor) -> Geometry:
    """The pooler's geometry from one eager forward of ``image`` ``[3, H, W]`` (ExportError
    where ``model`` is no R-CNN)."""
    heads = check_supported(model)
    store: dict[str, list] = {"rois": [], "levels": [], "shapes": []}
    with tracking(heads, store), torch.no_grad():
        model([image])
    return geometry(heads, store["levels"][0], store["shapes"][0])


def output_names(geom: Geometry) -> tuple[str, ...]:
    """The detection graph's extra outputs: ``rois`` and one ``level_<i>`` per pooled level."""
    return ("rois", *geom.level_outputs)


def write(model: nn.Module, geom: Geometry, directory: Path, session: Any | None,
          scenes: list[torch.Tensor], log: Any = lambda _m: None) -> dict[str, Any]:
    """Export ``boxscore.onnx`` into ``directory`` and (``session``: the detection graph's ONNX
    Runtime session) check the route on ``scenes``; the manifest's ``extras["boxscore"]``."""
    import time

    import onnxruntime as ort

    from camserve.errors import ParityError
    from camserve.manifest import sha256_file
    from camserve.pipeline.box_score import BoxScore

    heads = model.roi_heads
    channels, size = geom.shapes[0][0], geom.output_size
    start = time.perf_counter()
    export_head(heads, (torch.zeros(2, channels, size, size), torch.ones(2, dtype=torch.int64)), directory / GRAPH_FILE)
    log(f"exported the box head's score gradients ({GRAPH_FILE}) in {time.perf_counter() - start:.1f} s")
    entry: dict[str, Any] = {"file": GRAPH_FILE, "sha256": sha256_file(directory / GRAPH_FILE),
                             "outputs": ["scores", "gradients"], "geometry": geom.to_dict(), "parity": {}}
    if session is None:
        return entry
    route = BoxScore(directory, entry, ort.SessionOptions(), ["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    worst = {"scores": 0.0, "gradients": 0.0, "boxes": 0}
    for image in scenes:
        out = dict(zip(names, session.run(None, {"image": image.numpy()})))
        levels = [out[name][0] for name in geom.level_outputs]
        figures = check_route(heads, route, levels, out["rois"], out["labels"], out["scores"], [geom.transformed_size])
        worst = {"scores": max(worst["scores"], figures["scores"]), "gradients": max(worst["gradients"], figures["gradients"]),
                 "boxes": worst["boxes"] + figures["boxes"]}
    if worst["scores"] > TOL or worst["gradients"] > TOL:
        raise ParityError(f"box-score gradients disagree with torch autograd: scores {worst['scores']:.1e}, "
                          f"gradients {worst['gradients']:.1e} of their scale (tolerance {TOL:g})")
    log(f"box-score route against torch autograd on {worst['boxes']} boxes: scores {worst['scores']:.1e}, "
        f"gradients {worst['gradients']:.1e} of their scale")
    entry["parity"] = {"tolerance": TOL, "boxes": worst["boxes"], "max_score_diff": worst["scores"],
                       "max_rel_gradient_diff": worst["gradients"]}
    return entry
