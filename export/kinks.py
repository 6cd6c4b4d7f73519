"""ReLU units whose input lies within float rounding of 0: the parity check's one excuse.

Where a ReLU's pre-activation is ~1e-6 of its scale, ONNX Runtime's and PyTorch's kernels
(other summation orders) can land on either side of 0, and the unit's gradient is then on in
one runtime and off in the other. Behind a 3x3 convolution one such unit changes a whole
3 x 3 x C block of the gradient below it: on fcn_resnet50 (layer4 at 28 x 28) one flipped
unit of the head, out of 401k, put 1.1% of layer4's gradient beyond the tolerance, over the
share rule. The share rule cannot tell that from a wrong graph; this module can:

1. :func:`graph_relus` runs the graph with every ``Relu`` node's input fetched as well
   (forward order), so ONNX Runtime's own on/off decisions are known;
2. :func:`relu_calls` patches every ``nn.ReLU`` module to record its inputs in call order
   (and, given masks, to apply them instead of its own: ``x * mask``, the same values where
   the decisions agree and the forced gradient);
3. :func:`graph_masks` pairs the two in order and accepts ONNX Runtime's decisions only
   where, at every unit they disagree on, both runtimes' inputs are within ``tol`` of 0
   relative to the layer's scale.

The parity check then compares the graph with PyTorch run on ONNX Runtime's decisions, under
the same share rule, and records how many units flipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

Probe = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def graph_relus(graph: Path, options: Any = None) -> Probe:
    """A probe over ``graph``: feeds -> the inputs of its ``Relu`` nodes, in node order (the
    traced graph's nodes are in execution order). A second session, loaded only when the
    parity check needs it; ``options`` (``onnxruntime.SessionOptions``): those of the session
    whose decisions are wanted, as the optimization level can move a unit across the kink
    (vgg16's ``fullgrad.onnx``: one unit at 3e-10 of its layer's scale decided one way at
    ``basic`` and the other at ``all``)."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(graph))
    names = [node.input[0] for node in proto.graph.node if node.op_type == "Relu"]
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in known)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del proto
    return lambda feeds: session.run(names, feeds) if names else []


@contextlib.contextmanager
def relu_calls(model: nn.Module, masks: list[np.ndarray] | None = None) -> Iterator[list[torch.Tensor]]:
    """While active, every ``nn.ReLU`` module of ``model`` appends its input to the yielded
    list (call order) and, with ``masks``, call ``i`` answers ``x * masks[i]`` instead of
    ``relu(x)`` (a call beyond ``masks`` raises: the pairing would be wrong)."""
    calls: list[torch.Tensor] = []
    forced = [torch.from_numpy(m.astype(np.float32)) for m in masks] if masks is not None else None

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.detach().clone())  # the caller may write into x after the ReLU
        if forced is None:
            return torch.relu(x)
        if len(calls) > len(forced):
            raise RuntimeError(f"ReLU call {len(calls)} has no forced mask ({len(forced)} given)")
        return x * forced[len(calls) - 1]

    patched = [m for m in model.modules() if type(m) is nn.ReLU]
    for module in patched:
        module.forward = forward  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        for module in patched:
            del module.forward


def graph_masks(graph_inputs: list[np.ndarray], torch_inputs: list[torch.Tensor],
                tol: float) -> tuple[list[np.ndarray], int] | None:
    """ONNX Runtime's on/off decisions (``input > 0``, as its ReLU and the backward's mask
    decide) and the number of units where they differ from PyTorch's, or None when they
    cannot stand in for PyTorch's: the ReLUs do not pair up one to one (count or shapes; a
    functional ``relu`` is not recorded), or at a unit decided differently either runtime's
    input is beyond ``tol * max|x|`` of the call (then the graph computed something else)."""
    if len(graph_inputs) != len(torch_inputs) or not graph_inputs:
        return None
    masks, flips = [], 0
    for ours, x in zip(graph_inputs, torch_inputs):
        x_np = x.numpy()
        if ours.shape != x_np.shape:
            return None
        on = ours > 0
        differ = on != (x_np > 0)
        if differ.any():
            scale = float(np.abs(x_np).max()) or 1.0
            if max(float(np.abs(x_np[differ]).max()), float(np.abs(ours[differ]).max())) > tol * scale:
                return None
            flips += int(differ.sum())
        masks.append(on)
    return masks, flips


def reference_on_graph_masks(model: nn.Module, probe: Probe, feeds: dict[str, np.ndarray],
                             reference: Callable[..., Any], args: tuple[torch.Tensor, ...],
                             tol: float) -> tuple[list[np.ndarray], int] | None:
    """The reference outputs recomputed on ONNX Runtime's ReLU decisions, and the number of
    units that flipped; None when the decisions cannot be paired or are not near-kink
    (see :func:`graph_masks`) or nothing flipped."""
    with relu_calls(model) as calls:
        reference(*args)
    found = graph_masks(probe(feeds), calls, tol)
    if found is None or found[1] == 0:
        return None
    masks, flips = found
    with relu_calls(model, masks):
        again = [t.detach().numpy() for t in reference(*args)]
    return again, flips
