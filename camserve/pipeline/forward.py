"""The forward-only graph (image -> logits) cut out of an exported explain graph.

ONNX Runtime runs every node of a graph even when only ``logits`` is fetched
(microsoft/onnxruntime#16483), so perturbation runs (faithfulness metrics) through the
explain graph would pay for its backward too. The forward part is the subgraph that
``logits`` depends on: :func:`extract_forward` takes it with ONNX's own extractor, so its
nodes, weights and numerics are exactly the explain graph's. ``camserve export`` writes it as
``forward.onnx`` (recorded in the manifest with its hash); for an older export without one,
:func:`forward_model_bytes` cuts it at load time, in memory.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx.utils

FORWARD_FILE = "forward.onnx"


def extract_forward(model: onnx.ModelProto) -> onnx.ModelProto:
    """The subgraph of ``model`` from input ``image`` to output ``logits``."""
    return onnx.utils.Extractor(model).extract_model(["image"], ["logits"])


def forward_model_bytes(graph: str | Path) -> bytes:
    """Serialized forward-only graph cut from the explain graph file ``graph``."""
    return extract_forward(onnx.load(str(graph))).SerializeToString()
