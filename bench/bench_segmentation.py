"""A segmentation model's explanation against its forward: the target (the class's output
summed over its predicted pixels) is built inside the explain graph, so one run answers the
masks and the gradients.

deeplabv3_mobilenet_v3_large (random weights, the ``out`` head), exported with ``--kind
segmentation`` at ``--layer`` (default ``backbone.16``); its explain graph (top-1 class by predicted area,
``target_rank = 0``) and the export's own forward-only graph (``forward.onnx``) run in ONNX
Runtime CPU with the same threads, alternating (this machine is shared and noisy); also
``camserve.cam.explain`` end to end (graph + GradCAM). Prints median latencies and the ratios
to the forward.

    python bench/bench_segmentation.py [--batches 1 8] [--threads 2] [--size 224] [--repeats 7] [--layer L]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from _alternate import medians, ratio_table  # noqa: E402  (first: it sets the BLAS threads)
from bench_export import export_digest  # noqa: E402
import numpy as np  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"


def export(size: int, layer: str) -> Path:
    import torch
    import torchvision

    from camserve.export import export_model

    out = CACHE / f"deeplabv3-mobilenet-segmentation-{size}-{layer}-{export_digest()}"  # new export code: new graph
    if not (out / "manifest.json").exists():
        torch.manual_seed(0)
        model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None)
        export_model(model.eval(), [layer], out, input_size=size, model_name="deeplabv3", kind="segmentation",
                     check=False)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layer", default="backbone.16",
                        help="target layer: backbone.16 (the backbone's last block; the backward crosses the ASPP head) "
                             "or classifier.3 (the head's last ReLU)")
    args = parser.parse_args()

    from camserve.cam import TopK, explain
    from camserve.pipeline.runtime import GraphSession

    session = GraphSession(export(args.size, args.layer), intra_op_threads=args.threads)
    rng = np.random.default_rng(0)
    runs: dict[int, dict[str, float]] = {}
    for batch in args.batches:
        images = rng.standard_normal((batch, 3, args.size, args.size)).astype(np.float32)
        rank = np.zeros(batch, dtype=np.int64)
        calls = {
            "forward": lambda: session.forward_logits(images),
            "explain graph": lambda: session.run(images, target_rank=rank),
            "explain + gradcam": lambda: explain(session, images, [TopK(1)] * batch, ["gradcam"]),
        }
        runs[batch] = medians(calls, args.repeats)
    print(ratio_table(f"deeplabv3_mobilenet_v3_large segmentation at {args.layer}, {args.size} px, {args.threads} threads, median of {args.repeats} alternating runs", runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
