"""A detector's explanation against its forward: EigenCAM needs no backward, so the explain
path is the detection graph (the forward plus the stacked pyramid maps it already computes)
and numpy post-processing (projection, boxes renormalization).

fasterrcnn_mobilenet_v3_large_320_fpn (random weights, batch norms calibrated on scenes so
that scores and boxes differ, ``--min-score 0``: 100 detections per image, the worst case
for the per-box step), exported with ``--kind detection``; the export's forward-only graph
(``forward.onnx``: boxes, scores, labels) and the explain path run in ONNX Runtime CPU with
the same threads, alternating (this machine is shared and noisy). Prints median latencies
and the ratios to the forward. Detectors run one image per graph run, so batch N is N runs.

With the export's ``boxscore`` extra (the detection graph then also answers each
detection's proposal and the pooled pyramid levels), it also times GradCAM of each kept
detection's score (:mod:`camserve.pipeline.box_score`: RoIAlign as matrices, the box head's
joint graph, the gradient back at the levels) for the top ``--boxes`` detections.

    python bench/bench_detection.py [--batches 1 8] [--threads 2] [--repeats 7] [--keep 100] [--boxes 1 8 32]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from _alternate import medians  # noqa: E402  (first: it sets the BLAS threads)
import numpy as np  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
SIZE = 320


def calibrated_fasterrcnn():
    """fasterrcnn_mobilenet_v3_large_320_fpn, random weights, batch norms calibrated on scenes
    (with the default running statistics its pyramid maps are ~1e-8 and every score ties)."""
    import torch
    import torchvision

    from camserve.export.detection import calibrate_batch_norms

    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).eval()
    calibrate_batch_norms(model.backbone.body, (SIZE, SIZE))
    return model.eval()


def export() -> Path:
    from camserve.export.detection import export_detection

    out = CACHE / "fasterrcnn-mobilenet-320-detection-boxscore"
    if not (out / "manifest.json").exists():
        export_detection(calibrated_fasterrcnn(), out, input_size=SIZE, model_name="fasterrcnn", min_score=0.0,
                         extras=["boxscore"], check=False)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--keep", type=int, default=100, help="detections explained per image (top k)")
    parser.add_argument("--boxes", type=int, nargs="*", default=[1, 8, 32], help="detections explained by GradCAM of their score")
    args = parser.parse_args()

    import onnxruntime as ort

    from camserve.export.detection import _images
    from camserve.pipeline import detection

    out = export()
    session = detection.DetectionSession(out, intra_op_threads=args.threads)
    forward = ort.InferenceSession(str(out / session.manifest.forward_graph_file), sess_options=session.options,
                                   providers=["CPUExecutionProvider"])
    rows = []
    for batch in args.batches:
        images = np.concatenate([_images((SIZE, SIZE), 100 + i)[0].numpy() for i in range(batch)])

        def run_forward() -> None:
            for image in images:
                forward.run(None, {"image": image[None]})

        state: dict = {}

        def run_explain() -> None:
            state["out"] = detection.explain(session, images, threshold=0.0, topk=args.keep)

        calls = {"forward (boxes, scores, labels)": run_forward, "detection graph (+ maps, proposals, pooled levels)": lambda: session.run(images),
                 "explain (graph + EigenCAM + boxes)": run_explain}
        for m in args.boxes:  # GradCAM of each of the top m detections' scores
            calls[f"explain (graph + GradCAM of {m} box score{'s' * (m != 1)})"] = (
                lambda m=m: detection.explain(session, images, threshold=0.0, topk=m, methods=("gradcam",)))
        med = medians(calls, args.repeats)
        kept = sum(len(k) for k in state["out"].kept)
        explained = {"explain (graph + EigenCAM + boxes)": kept}
        explained.update({f"explain (graph + GradCAM of {m} box score{'s' * (m != 1)})": batch * m for m in args.boxes})
        base = med["forward (boxes, scores, labels)"]
        for name, seconds in med.items():
            boxes = explained.get(name, "-")
            rows.append((batch, name, seconds * 1000, seconds / base, boxes))
            print(f"batch {batch} {name:44s} {seconds * 1000:8.1f} ms  {seconds / base:5.2f}x forward ({boxes} boxes)",
                  file=sys.stderr)
    print(f"\nfasterrcnn_mobilenet_v3_large_320_fpn, {SIZE} px, {args.threads} threads, median of {args.repeats} "
          "alternating runs\n")
    print("| batch | run | ms | / forward | boxes explained |\n|---:|---|---:|---:|---:|")
    for batch, name, ms, ratio, kept in rows:
        print(f"| {batch} | {name} | {ms:.1f} | {ratio:.2f}x | {kept} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
