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
    return onnx.utils.Extractor(_batch_from_image(model)).extract_model(["image"], ["logits"])


def _batch_from_image(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every batch-size read (``Shape(x, start=0, end=1)``) of another graph
    input that shares the image's batch dimension redirected to ``image``.

    The exporter takes a symbolic size from any input that has it: a segmentation graph
    reads the batch size off ``cotangent``, and the forward part would then need an input it
    does not have (``Node input 'cotangent' is not a graph input``).
    """
    inputs = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    batch = inputs["image"][0].dim_param if "image" in inputs and inputs["image"] else ""
    if not batch:
        return model
    same = {name for name, dims in inputs.items() if name != "image" and dims and dims[0].dim_param == batch}
    copy = None
    for k, node in enumerate(model.graph.node):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Shape" and node.input[0] in same and attrs.get("start", 0) == 0 and attrs.get("end") == 1:
            copy = copy or _copy(model)
            copy.graph.node[k].input[0] = "image"
    return copy or model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def forward_model_bytes(graph: str | Path) -> bytes:
    """Serialized forward-only graph cut from the explain graph file ``graph``."""
    return extract_forward(onnx.load(str(graph))).SerializeToString()
