"""An embedding model's explanation against its forward: the cosine similarity's gradient is
computed inside the explain graph, so one run answers the embedding and the gradients.

resnet50 with ``fc = Identity`` (random weights), exported with ``--kind embedding``; its
explain graph (rows in similarity mode, ``target_rank = -2``) and the export's own forward-only
graph (``forward.onnx``) run in ONNX Runtime CPU with the same threads, alternating (this
machine is shared and noisy); also ``camserve.cam.explain`` end to end (graph + GradCAM).
Prints median latencies and the ratios to the forward.

    python bench/bench_embedding.py [--batches 1 8] [--threads 2] [--size 224] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from _alternate import medians, ratio_table  # noqa: E402  (first: it sets the BLAS threads)
import numpy as np  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"


def export(size: int) -> Path:
    import torch
    import torchvision
    from torch import nn

    from camserve.export import export_model

    out = CACHE / f"resnet50-embedding-{size}"
    if not (out / "manifest.json").exists():
        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None)
        model.fc = nn.Identity()
        export_model(model.eval(), ["layer4.-1"], out, input_size=size, model_name="resnet50-emb", kind="embedding",
                     check=False)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from camserve.cam import explain
    from camserve.pipeline.runtime import GraphSession

    session = GraphSession(export(args.size), intra_op_threads=args.threads)
    rng = np.random.default_rng(0)
    runs: dict[int, dict[str, float]] = {}
    for batch in args.batches:
        images = rng.standard_normal((batch, 3, args.size, args.size)).astype(np.float32)
        concepts = np.abs(rng.standard_normal((1, session.manifest.num_outputs))).astype(np.float32)
        rank = np.full(batch, -2, dtype=np.int64)
        calls = {
            "forward": lambda: session.forward_logits(images),
            "explain graph": lambda: session.run(images, np.repeat(concepts, batch, axis=0), target_rank=rank),
            "explain + gradcam": lambda: explain(session, images, [[0]] * batch, ["gradcam"], concepts=concepts),
        }
        runs[batch] = medians(calls, args.repeats)
    print(ratio_table(f"resnet50 embedding (fc = Identity), {args.size} px, {args.threads} threads, median of {args.repeats} alternating runs", runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
