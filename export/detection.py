"""Export an object detector: one image -> boxes, scores, labels and its feature-pyramid activations.

The graph (``camserve export --kind detection``)::

    inputs : image          float32 [1, 3, H, W]   pixels in [0, 1] (the detector normalizes)
    outputs: boxes          float32 [D, 4]         x1, y1, x2, y2 in input pixels
             scores         float32 [D]
             labels         int64   [D]
             activations_0  float32 [1, C, h, w]   the target layer's maps, |.|, resized, stacked

``activations_0`` is pytorch-grad-cam's ``fasterrcnn_reshape_transform`` (its Faster R-CNN
tutorial) done inside the graph: every level of the target layer's output (a feature
pyramid: a dict of maps) is taken in absolute value (pyramid maps are signed), resized
bilinearly to the size of one level (the last one, the tutorial's ``pool``, unless ``level``
names another) and concatenated along channels. EigenCAM needs nothing else: detection is
explained without a backward, at the forward's cost.

The detectors' own post-processing (NMS, top-k, per-image loops) is data-dependent, which
``torch.export`` does not take; the TorchScript-based exporter does, at a fixed batch of one
image, so the runtime runs the graph once per image. The graph's own score threshold is
the model's (``min_score`` lowers it, e.g. for random weights); answers filter further by
the manifest's (or the request's) ``threshold``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from camserve.errors import ExportError, ParityError
from camserve.export import box_score
from camserve.manifest import GRAPH_FILE, LayerSpec, Manifest, sha256_file
from camserve.pipeline.forward import FORWARD_FILE

OUTPUTS = ("boxes", "scores", "labels", "activations_0")
OPSET = 17
#: Parity: detections are matched by label and box; scores and boxes relative to their scale.
TOL = 1e-4
MAX_SHARE = 0.05


class DetectionGraph(nn.Module):
    """``image [1, 3, H, W] -> (boxes, scores, labels, activations)`` around a torchvision-style
    detector (``model(list_of_images) -> [{"boxes", "scores", "labels"}]``)."""

    def __init__(self, model: nn.Module, layer: nn.Module, level: str | None = None, maps: bool = True,
                 box_score: bool = False) -> None:
        super().__init__()
        self.model, self.layer, self.level, self.maps, self.box_score = model, layer, level, maps, box_score

    def levels(self, output: object) -> list[tuple[str, torch.Tensor]]:
        if isinstance(output, torch.Tensor):
            return [("0", output)]
        if isinstance(output, dict) and output and all(isinstance(v, torch.Tensor) and v.dim() == 4 for v in output.values()):
            return list(output.items())
        raise ExportError(f"the detection target layer must return a 4-d tensor or a dict of them, got {type(output).__name__}")

    def forward(self, image: torch.Tensor):
        if not self.maps:  # the forward-only baseline: the detector's own outputs
            det = self.model(list(image))[0]
            return det["boxes"], det["scores"], det["labels"]
        store: list[object] = []
        tracked: dict[str, list] = {"rois": [], "levels": [], "shapes": []}
        handle = self.layer.register_forward_hook(lambda _m, _i, out: store.append(out))
        try:
            with box_score.tracking(self.model.roi_heads, tracked) if self.box_score else contextlib.nullcontext():
                det = self.model(list(image))[0]
        finally:
            handle.remove()
        if len(store) != 1:
            raise ExportError(f"the detection target layer ran {len(store)} times for one image, expected once")
        levels = self.levels(store[0])
        keys = [k for k, _ in levels]
        if self.level is not None and self.level not in keys:
            raise ExportError(f"level {self.level!r} is not one of the target layer's levels {keys}")
        size = dict(levels)[self.level].shape[-2:] if self.level is not None else levels[-1][1].shape[-2:]
        acts = torch.cat([F.interpolate(v.abs(), size=size, mode="bilinear", align_corners=False) for _, v in levels], dim=1)
        if not self.box_score:
            return det["boxes"], det["scores"], det["labels"], acts
        pyramid = tracked["levels"][0]
        pooled = tuple(pyramid[n] for n in box_score.level_names(self.model.roi_heads, pyramid))
        return (det["boxes"], det["scores"], det["labels"], acts, tracked["rois"][0]) + pooled


def set_min_score(model: nn.Module, value: float) -> None:
    """Lower (or raise) the detector's own score threshold: ``roi_heads.score_thresh`` of the
    R-CNNs, ``score_thresh`` of RetinaNet, FCOS and SSD."""
    holder = getattr(model, "roi_heads", model)
    if not hasattr(holder, "score_thresh"):
        raise ExportError(f"{type(model).__name__} has no score_thresh to set (--min-score applies to torchvision detectors)")
    holder.score_thresh = float(value)


def num_classes(model: nn.Module) -> int:
    """The class count of a torchvision detector (background included, as its labels count)."""
    roi = getattr(model, "roi_heads", None)
    if roi is not None:
        return int(roi.box_predictor.cls_score.out_features)
    head = getattr(getattr(model, "head", None), "classification_head", None)
    if head is not None and hasattr(head, "num_classes"):
        return int(head.num_classes)
    if head is not None and hasattr(head, "num_columns"):  # SSD: one column per class
        return int(head.num_columns)
    raise ExportError(f"cannot tell the number of classes of {type(model).__name__}: give the labels")


def _images(size: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    """Parity inputs: smooth random scenes with rectangles (noise alone gives tied scores)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        base = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=size, mode="bilinear", align_corners=False)
        h, w = size
        for _ in range(3):
            y, x = int(torch.randint(0, h // 2, (1,), generator=g)), int(torch.randint(0, w // 2, (1,), generator=g))
            base[:, :, y : y + h // 3, x : x + w // 3] = torch.rand(1, 3, 1, 1, generator=g)
        out.append(base.clamp(0, 1))
    return out


def calibrate_batch_norms(module: nn.Module, size: tuple[int, int], seeds: Sequence[int] = range(10, 14),
                          mean: float = 0.45, std: float = 0.25) -> nn.Module:
    """``module``'s BatchNorm running statistics replaced by their plain average over parity-like
    scenes (:func:`_images`, normalized by ``mean`` / ``std``); ``module`` is left in eval mode.

    For random weights only: a torchvision detector built without weights has unit running
    variances, its pyramid maps come out ~1e-8 and every detection gets the same score, which
    makes neither its parity nor its explanations mean anything."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a plain average over the calibration batches
            m.reset_running_stats()
    module.train()
    with torch.no_grad():
        for seed in seeds:
            module((torch.cat(_images(size, seed)) - mean) / std)
    return module.eval()


def _share_off(ours: np.ndarray, ref: np.ndarray, tol: float) -> tuple[float, float]:
    scale = float(np.abs(ref).max()) if ref.size else 1.0
    err = np.abs(ours.astype(np.float64) - ref.astype(np.float64)) / (scale or 1.0)
    return (float(err.max()) if err.size else 0.0, float((err > tol).mean()) if err.size else 0.0)


def check_parity(session, graph: DetectionGraph, size: tuple[int, int], tol: float = TOL) -> dict:
    """ONNX Runtime against eager PyTorch on three scenes.

    Activations elementwise; scores as sorted sets; boxes as sets: each of PyTorch's
    detections whose score is not tied with another's is matched to ONNX Runtime's detection
    of the same label with the nearest box (the runtimes order tied scores differently, and
    cut ties differently at the detections limit; random weights tie every score). A check passes when at most ``MAX_SHARE`` of
    the compared values differ by more than ``tol`` relative to their scale.
    """
    worst = {name: {"max_rel_err": 0.0, "share_off": 0.0} for name in ("boxes", "scores", "activations_0")}
    counts, compared = [], []
    for image in _images(size):
        boxes, scores, labels, acts = session.run(list(OUTPUTS), {"image": image.numpy()})
        with torch.no_grad():
            ref = [t.numpy() for t in graph(image)]
        if len(boxes) != len(ref[0]):
            raise ParityError(f"ONNX Runtime finds {len(boxes)} detections, PyTorch {len(ref[0])}")
        counts.append(len(boxes))
        figures = {"activations_0": _share_off(acts, ref[3], tol)}
        figures["scores"] = _share_off(np.sort(scores), np.sort(ref[1]), tol)
        # boxes of tied scores are not comparable: the runtimes order ties (and cut them at
        # the detections limit) differently
        untied = (np.abs(ref[1][:, None] - ref[1][None, :]) <= 1e-6 * max(1e-12, float(np.abs(ref[1]).max(initial=0)))).sum(1) == 1
        compared.append(int(untied.sum()))
        if untied.any():
            cost = np.abs(ref[0][untied][:, None, :] - boxes[None, :, :]).sum(-1) + 1e9 * (ref[2][untied][:, None] != labels[None, :])
            figures["boxes"] = _share_off(boxes[cost.argmin(axis=1)], ref[0][untied], tol)
        for name, (mx, share) in figures.items():
            worst[name]["max_rel_err"] = max(worst[name]["max_rel_err"], mx)
            worst[name]["share_off"] = max(worst[name]["share_off"], share)
    bad = {n: s for n, s in worst.items() if s["share_off"] > MAX_SHARE}
    if bad:
        detail = "; ".join(f"{n}: {s['share_off']:.2%} beyond {tol:g} (max {s['max_rel_err']:.2e})" for n, s in bad.items())
        raise ParityError(f"ONNX Runtime and PyTorch disagree: {detail}")
    return {"tolerance": tol, "max_share_off": MAX_SHARE, "outputs": worst, "detections": counts, "boxes_compared": compared}


def export_detection(
    model: nn.Module,
    out_dir: str | Path,
    *,
    target_layer: str = "backbone",
    level: str | None = None,
    input_size: int | tuple[int, int] = 320,
    labels: Sequence[str] | None = None,
    model_name: str = "model",
    model_version: str = "1.0",
    threshold: float = 0.5,
    min_score: float | None = None,
    extras: Sequence[str] = (),
    check: bool = True,
    log: Callable[[str], None] = lambda _msg: None,
) -> Manifest:
    """Export a detector (see the module docstring); writes ``model.onnx``, ``forward.onnx``
    (boxes, scores and labels only: the benchmark's baseline) and ``manifest.json``;
    ``extras=("boxscore",)`` also the box-score gradients' graph (:mod:`camserve.export.box_score`)."""
    import onnxruntime as ort

    from camserve.export import resolve
    from camserve.export.api import _versions

    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or min(size) < 1:
        raise ExportError(f"input_size must be a positive int or (H, W), got {input_size!r}")
    if not 0.0 < threshold < 1.0:
        raise ExportError(f"threshold must be in (0, 1), got {threshold!r}")
    model = model.eval()
    if min_score is not None:
        set_min_score(model, min_score)
    name, layer = resolve.resolve_layer(model, target_layer)
    geom = box_score.prepare(model, _images(size)[0][0]) if box_score.wanted(extras) else None
    graph = DetectionGraph(model, layer, level, box_score=geom is not None).eval()
    outputs = OUTPUTS + (box_score.output_names(geom) if geom is not None else ())
    if labels is None:
        label_list = [f"class_{i}" for i in range(num_classes(model))]
    else:
        label_list = list(labels)
        known = None
        with contextlib.suppress(ExportError):  # a detector of unknown structure: trust the labels
            known = num_classes(model)
        if known is not None and len(label_list) != known:
            raise ExportError(f"{len(label_list)} labels given but the detector has {known} classes")
    with torch.no_grad():
        example = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
        acts = graph(example)[3]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp_str:
        tmp = Path(tmp_str)
        t0 = time.perf_counter()
        # the forward-only graph is a second export, not an extraction of the first: the
        # detectors' If nodes read outer-scope values, which onnx's Extractor does not follow
        forward = DetectionGraph(model, layer, level, maps=False).eval()
        for module, file, names in ((graph, GRAPH_FILE, outputs), (forward, FORWARD_FILE, OUTPUTS[:3])):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    torch.onnx.export(module, (example,), str(tmp / file), dynamo=False, opset_version=OPSET,
                                      input_names=["image"], output_names=list(names))
                except Exception as exc:
                    raise ExportError(f"exporting the detector failed: {resolve.one_line(exc)}") from exc
        proto = onnx.load(str(tmp / GRAPH_FILE))
        log(f"exported detection graph ({len(proto.graph.node)} nodes) and its forward in {time.perf_counter() - t0:.1f} s")
        figures: dict = {}
        if check:
            t0 = time.perf_counter()
            session = ort.InferenceSession(str(tmp / GRAPH_FILE), providers=["CPUExecutionProvider"])
            figures = check_parity(session, graph, size)
            worst = ", ".join(f"{n} max rel err {f['max_rel_err']:.1e} ({f['share_off']:.1%} off)" for n, f in figures["outputs"].items())
            log(f"parity with PyTorch on {len(figures['detections'])} scenes: {worst}; detections {figures['detections']}, "
                f"boxes of untied scores compared {figures['boxes_compared']} ({time.perf_counter() - t0:.1f} s)")
        extra = {}
        if geom is not None:
            extra[box_score.EXTRA] = box_score.write(model, geom, tmp, session if check else None, _images(size), log)
        manifest = Manifest(
            model_name=model_name,
            model_version=str(model_version),
            input_size=size,
            labels=tuple(label_list),
            target_layers=(LayerSpec(name=name, layout="NCHW", shape=tuple(int(d) for d in acts.shape[1:])),),
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            graph_sha256=sha256_file(tmp / GRAPH_FILE),
            opset=OPSET,
            ir_version=proto.ir_version,
            packages=_versions(),
            parity=figures,
            forward_graph_file=FORWARD_FILE,
            forward_graph_sha256=sha256_file(tmp / FORWARD_FILE),
            threshold=float(threshold),
            kind="detection",
            extras=extra,
        )
        for file in (GRAPH_FILE, FORWARD_FILE, *(e["file"] for e in extra.values())):
            shutil.move(str(tmp / file), out_dir / file)
        for stale in ("head.onnx", "fullgrad.onnx", "guided.onnx", "shapley.onnx", *(() if extra else (box_score.GRAPH_FILE,))):
            (out_dir / stale).unlink(missing_ok=True)
        manifest.save(out_dir)
    log(f"wrote {out_dir / GRAPH_FILE} and {out_dir / 'manifest.json'}")
    return manifest
