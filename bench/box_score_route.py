"""Gradients of a Faster R-CNN box score without a detector backward in ONNX: does the route work, and what does it cost?

camserve explains detectors with EigenCAM (gradient-free). pytorch-grad-cam's box-score target
(``FasterRCNNBoxScoreTarget``) needs the gradient of a detection's score at the feature
pyramid, which the detection graph (TorchScript-based export, no backward) cannot give. The
score of a kept detection depends on the pyramid only through its proposal's RoIAlign
(torchvision detaches the proposals), so the gradient splits into two exact parts:

1. RoIAlign (``aligned=False``, ``sampling_ratio`` samples per bin) is separable: each output
   bin averages bilinear weights along y and along x, so per box and level
   ``pooled[c] = Ay @ F[c] @ Ax.T`` with small matrices ``Ay [7, h]``, ``Ax [7, w]``
   (torchvision's out-of-range and border rules hold per axis). Its transpose sends a
   gradient back: ``dF[c] = Ay.T @ dpooled[c] @ Ax``; numpy, no scatter.
2. The box head and predictor, ``pooled -> softmax(class_logits)[label]`` and its gradient
   ``d score / d pooled``, are a small joint graph that camserve's own tracer exports
   (``export.trace.trace_joint`` + ``export.onnx_export.export_graph``).

The script checks each part against torchvision and torch autograd on a calibrated
random-weight ``fasterrcnn_mobilenet_v3_large_320_fpn`` (bench_detection.py's model and
export), and times the route for the top M detections of one image against the detection
graph's forward, alternating (ONNX Runtime CPU, the same threads). Each detection's
proposal is found here by its score, label and decoded box; a served version would have the
detection graph answer it.

    python bench/box_score_route.py [--boxes 1 8 32] [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from _alternate import medians  # noqa: E402  (first: it sets the BLAS threads)
import numpy as np  # noqa: E402

from bench_detection import SIZE, calibrated_fasterrcnn, export  # noqa: E402


def capture(model, image) -> dict:
    """One eager forward: the levels the box head pools from, the proposals, the transformed
    image size, every proposal's class probabilities and decoded boxes, and the detections."""
    import torch
    import torchvision

    heads, seen = model.roi_heads, {}
    hooks = [heads.register_forward_pre_hook(lambda _m, a: seen.update(features=a[0], proposals=a[1][0], shapes=a[2])),
             heads.box_predictor.register_forward_hook(lambda _m, _a, o: seen.update(logits=o[0], deltas=o[1]))]
    try:
        with torch.no_grad():
            det = model([image])[0]
    finally:
        for h in hooks:
            h.remove()
    names = [n for n in heads.box_roi_pool.featmap_names if n in seen["features"]]
    decoded = heads.box_coder.decode(seen["deltas"], [seen["proposals"]]).reshape(len(seen["proposals"]), -1, 4)
    seen.update(levels={n: seen["features"][n] for n in names}, detections=det,
                probs=torch.softmax(seen["logits"], -1),
                decoded=torchvision.ops.clip_boxes_to_image(decoded, seen["shapes"][0]))
    return seen


def proposal_of(seen: dict, count: int) -> tuple:
    """The proposal index and label of each of the first ``count`` detections."""
    import torch

    det, index = seen["detections"], []
    for box, score, label in zip(det["boxes"][:count], det["scores"][:count], det["labels"][:count]):
        same = (seen["probs"][:, label] == score) & ((seen["decoded"][:, label] - box).abs().amax(dim=1) < 1e-3)
        index.append(int(torch.where(same)[0][0]))
    return torch.tensor(index), det["labels"][:count].clone()


def axis_weights(lo: np.ndarray, hi: np.ndarray, n: int, scale: float, bins: int, samples: int) -> np.ndarray:
    """``[R, bins, n]``: RoIAlign's averaged bilinear weights along one axis (``aligned=False``)
    for boxes ``[lo, hi)`` in image pixels on a level of ``n`` cells at ``scale``."""
    lo, size = lo * scale, np.maximum((hi - lo) * scale, 1.0)
    step = size / bins
    rows = np.arange(len(lo))[:, None].repeat(bins, 1)
    cols = np.arange(bins)[None].repeat(len(lo), 0)
    out = np.zeros((len(lo), bins, n))
    for i in range(samples):
        at = lo[:, None] + np.arange(bins)[None] * step[:, None] + (i + 0.5) * step[:, None] / samples
        inside = (at >= -1.0) & (at <= n)
        at = np.maximum(at, 0.0)
        low = np.floor(at).astype(np.int64)
        edge = low >= n - 1
        low = np.where(edge, n - 1, low)
        frac = np.where(edge, 0.0, at - low)
        np.add.at(out, (rows, cols, low), np.where(inside, 1.0 - frac, 0.0) / samples)
        np.add.at(out, (rows, cols, np.minimum(low + 1, n - 1)), np.where(inside, frac, 0.0) / samples)
    return out


def roi_matrices(model, seen: dict, rois) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per level name, ``(Ay [R, 7, h], Ax [R, 7, w])``; zero for boxes on another level."""
    pool = model.roi_heads.box_roi_pool
    levels = pool.map_levels([rois]).numpy().astype(np.int64)
    bins = pool.output_size[0]
    boxes = rois.numpy().astype(np.float64)
    out = {}
    for i, (name, feature) in enumerate(seen["levels"].items()):
        h, w = feature.shape[-2:]
        on = (levels == i)[:, None, None]
        out[name] = (axis_weights(boxes[:, 1], boxes[:, 3], h, pool.scales[i], bins, pool.sampling_ratio) * on,
                     axis_weights(boxes[:, 0], boxes[:, 2], w, pool.scales[i], bins, pool.sampling_ratio) * on)
    return out


def head_graph(model, example: tuple, path: Path):
    """The box head's joint graph ``(pooled [M, C, 7, 7], labels [M]) -> (scores [M],
    gradients [M, C, 7, 7])``, exported by camserve's tracer; its ONNX Runtime session."""
    import onnxruntime as ort
    import torch

    from camserve.export.onnx_export import export_graph
    from camserve.export.trace import trace_joint

    heads = model.roi_heads

    def joint(pooled: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = pooled.detach().requires_grad_(True)
            logits = heads.box_predictor(heads.box_head(x))[0]
            score = torch.softmax(logits, -1).gather(1, labels[:, None])[:, 0]
            (grad,) = torch.autograd.grad(score, [x], grad_outputs=torch.ones_like(score))
        return score.detach(), grad

    holder = torch.nn.ModuleDict({"box_head": heads.box_head, "box_predictor": heads.box_predictor}).eval()
    export_graph(trace_joint(holder, [], example, fn=joint), example, ["pooled", "labels"], ["scores", "gradients"], path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[1, 8, 32], help="detections explained (top M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from camserve.export.detection import _images
    from camserve.pipeline.runtime import session_options

    model = calibrated_fasterrcnn()
    model.roi_heads.score_thresh = 0.0  # random weights: keep the detections limit's worth of boxes
    image = _images((SIZE, SIZE), 100)[0]
    seen = capture(model, image[0])
    most = max(args.boxes)
    rois_index, labels = proposal_of(seen, most)
    rois = seen["proposals"][rois_index]
    mats = roi_matrices(model, seen, rois)
    levels = {n: f.numpy()[0] for n, f in seen["levels"].items()}
    pooled = sum(np.einsum("mph,chw,mqw->mcpq", ay, levels[n], ax) for n, (ay, ax) in mats.items()).astype(np.float32)
    with torch.no_grad():
        reference = model.roi_heads.box_roi_pool(seen["levels"], [rois], seen["shapes"]).numpy()
    print(f"levels {[tuple(f.shape) for f in levels.values()]}, {len(seen['proposals'])} proposals, "
          f"{len(seen['detections']['boxes'])} detections; transformed size {seen['shapes'][0]}", file=sys.stderr)
    print(f"RoIAlign as matrices vs torchvision: max |diff| {np.abs(pooled - reference).max():.1e} "
          f"(values up to {np.abs(reference).max():.1f})", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="camserve-boxscore-"))
    head_graph(model, (torch.from_numpy(pooled[:2]), labels[:2]), work / "boxscore.onnx")
    options = session_options(args.threads)
    head = ort.InferenceSession(str(work / "boxscore.onnx"), options, providers=["CPUExecutionProvider"])
    scores, grads = head.run(None, {"pooled": pooled, "labels": labels.numpy()})
    print(f"head graph ({(work / 'boxscore.onnx').stat().st_size / 1e6:.0f} MB): scores vs the detections' "
          f"max |diff| {np.abs(scores - seen['detections']['scores'][:most].numpy()).max():.1e}", file=sys.stderr)

    leaves = {n: f.detach().clone().requires_grad_(True) for n, f in seen["levels"].items()}
    worst = 0.0
    for m in range(most):  # torch autograd through torchvision's own roi_align, one detection at a time
        pooled_m = model.roi_heads.box_roi_pool(leaves, [rois[m : m + 1]], seen["shapes"])
        logits = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled_m))[0]
        score = torch.softmax(logits, -1)[0, labels[m]]
        truth = [g.numpy()[0] for g in torch.autograd.grad(score, list(leaves.values()))]
        ours = [np.einsum("ph,cpq,qw->chw", ay[m], grads[m].astype(np.float64), ax[m]) for ay, ax in mats.values()]
        scale = max(np.abs(t).max() for t in truth) or 1.0
        worst = max(worst, max(np.abs(o - t).max() for o, t in zip(ours, truth)) / scale)
    print(f"level gradients vs torch autograd, {most} detections: max |diff| / scale {worst:.1e}", file=sys.stderr)

    forward = ort.InferenceSession(str(export() / "forward.onnx"), options, providers=["CPUExecutionProvider"])
    x = image.numpy()
    rows = []
    for m in args.boxes:
        sub = {n: (ay[:m].astype(np.float32), ax[:m].astype(np.float32)) for n, (ay, ax) in mats.items()}
        feed = {"pooled": pooled[:m], "labels": labels[:m].numpy()}
        state: dict = {}

        def route() -> None:  # RoIAlign as matrices, the head graph, the gradients back at the levels
            p = sum(np.einsum("mph,chw,mqw->mcpq", ay, levels[n], ax, optimize=True) for n, (ay, ax) in sub.items())
            _, g = head.run(None, {"pooled": p.astype(np.float32), "labels": feed["labels"]})
            state["levels"] = [np.einsum("mph,mcpq,mqw->mchw", ay, g, ax, optimize=True) for ay, ax in sub.values()]

        med = medians({"forward": lambda: forward.run(None, {"image": x}), "route": route}, args.repeats)
        rows.append((m, med["forward"] * 1e3, med["route"] * 1e3))
    print(f"\nfasterrcnn_mobilenet_v3_large_320_fpn, {SIZE} px, {args.threads} threads, median of {args.repeats} "
          "alternating runs\n")
    print("| boxes | detection forward ms | box-score gradients ms | / forward |\n|---:|---:|---:|---:|")
    for m, f, r in rows:
        print(f"| {m} | {f:.1f} | {r:.1f} | {r / f:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
