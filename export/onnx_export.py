"""ONNX export of a traced joint graph, and clean-ups of the exported ONNX model.

Inputs are named ``image``, ``cotangent``, ``target_rank`` with a dynamic batch ``N``;
outputs ``logits``, ``activations_i``, ``gradients_i``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch

from camserve.errors import ExportError
from camserve.export.lowering import skip_redundant_decomposition
from camserve.export.one_hot import shortcut_one_hot

OPSET = 20


def _copy_translation(self, src, non_blocking: bool = False):
    # The exporter's aten.copy does not broadcast a 0-d source (Swin's mask building:
    # ``mask[a:b, c:d] = count``); broadcast it to the destination's shape explicitly.
    from onnxscript import opset20 as op

    return op.Expand(op.CastLike(src, self), op.Shape(self))


def output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"activations_{i}", f"gradients_{i}"]
    return names


def export_graph(
    gm: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    outputs: Sequence[str],
    path: Path,
) -> onnx.ModelProto:
    """Export ``gm`` (traced or plain module) to ``path`` with a dynamic batch dimension."""
    batch = torch.export.Dim("N", min=1, max=4096)
    dynamic = tuple({0: batch} for _ in example)
    with warnings.catch_warnings(), _quiet_exporter(), skip_redundant_decomposition(gm), single_output_rewrites():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                gm,
                example,
                input_names=list(input_names),
                output_names=list(outputs),
                dynamic_shapes=dynamic,
                dynamo=True,
                opset_version=OPSET,
                external_data=False,
                custom_translation_table={torch.ops.aten.copy.default: _copy_translation},
                optimize=True,
                verbose=False,
                report=False,
            )
        except Exception as exc:  # the exporter raises many types; name the op at fault
            raise ExportError(f"ONNX export failed: {_first_line_naming_op(exc)}") from exc
    model = program.model_proto
    model = shortcut_one_hot(strip_weight_expands(model))
    onnx.save_model(model, str(path))
    return model


@contextlib.contextmanager
def single_output_rewrites():
    """While active, the exporter's optimizer applies only its single-output-node rewrite rules.

    onnxscript matches a rule whose pattern ends in several nodes (``SlicesSplit``: two Slices
    of one tensor -> Split) by scanning the whole graph for every candidate node, which is
    quadratic: on inception_v3's FullGrad graph (thousands of nodes, its Concat backwards
    full of Slices) it took 45 of the extra graph's 72 s of export, and it changed no node of
    any graph we export (inception_v3 FullGrad, vit_b_16, swin_t: the same ops with and
    without it). Where onnxscript has no such rule list nothing changes."""
    from onnxscript import rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if _single_output(r))
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def _single_output(rule: object) -> bool:
    pattern = getattr(rule, "_target_pattern", None)
    return bool(getattr(pattern, "has_single_output_node", True))


class _quiet_exporter:
    """Silence the exporter's progress prints and logs (the CLI prints its own)."""

    def __enter__(self):
        self._level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        self._stdout = io.StringIO()
        import contextlib

        self._redirect = contextlib.redirect_stdout(self._stdout)
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        logging.getLogger("torch.onnx").setLevel(self._level)
        return False


def _first_line_naming_op(exc: BaseException) -> str:
    """The most useful line of an exporter error: the one naming an op, else the first."""
    seen: list[str] = []
    e: BaseException | None = exc
    while e is not None and len(seen) < 10:
        seen += [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        e = e.__cause__ or e.__context__
    for key in ("No ONNX function found", "Unsupported", "aten.", "prims."):
        for line in seen:
            if key in line:
                return line[:400]
    return (seen[0] if seen else type(exc).__name__)[:400]


def strip_weight_expands(model: onnx.ModelProto) -> onnx.ModelProto:
    """Feed MatMul the 2-d weight itself where the trace expanded it to the batch.

    ``nn.MultiheadAttention``'s packed projection traces to ``MatMul(x, Expand(W))`` in
    the forward, ``MatMul(g, Transpose(Expand(W)))`` in the backward and longer chains of
    Expands and last-two-axes Transposes in ShapleyCAM's double backward. ONNX MatMul
    broadcasts a 2-d operand by itself, and each Expand costs a copy of the weight per
    token at run time (and gigabytes of constant folding at load), so the Expand is
    bypassed (a 2-d Transpose stands in for the batched one) and then removed.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def weight_2d(name: str, depth: int = 0) -> tuple[str, bool] | None:
        """(2-d initializer, transposed?) behind ``name``, seen through Expands (MatMul broadcasts
        a 2-d operand itself) and Transposes of the last two axes; None if it is anything else."""
        if name in inits and len(inits[name].dims) == 2:
            return name, False
        node = producers.get(name)
        if node is None or depth > 8:
            return None
        if node.op_type == "Expand":
            return weight_2d(node.input[0], depth + 1)
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            rank = len(perm or ())
            if perm is not None and rank >= 2 and perm == list(range(rank - 2)) + [rank - 1, rank - 2]:
                inner = weight_2d(node.input[0], depth + 1)
                return None if inner is None else (inner[0], not inner[1])
        return None

    def expanded(name: str, depth: int = 0) -> bool:
        """Whether an Expand is on the way to the weight (only then is there a copy to save)."""
        node = producers.get(name)
        return node is not None and depth <= 8 and (node.op_type == "Expand" or (
            node.op_type == "Transpose" and expanded(node.input[0], depth + 1)))

    added: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "MatMul" or not expanded(node.input[1]):
            continue
        found = weight_2d(node.input[1])
        if found is None:
            continue
        weight, transposed = found
        if not transposed:
            node.input[1] = weight
            continue
        flipped = f"{weight}__T"
        if flipped not in producers:
            added.append(onnx.helper.make_node("Transpose", [weight], [flipped], perm=[1, 0], name=f"{weight}__transpose"))
            producers[flipped] = added[-1]
        node.input[1] = flipped
    if added:
        graph.node.extend(added)
    _remove_dead_nodes(graph)
    # Keep the node list topologically sorted for checkers: constants' transposes first.
    if added:
        nodes = sorted(graph.node, key=lambda n: 0 if n in added else 1)
        del graph.node[:]
        graph.node.extend(nodes)
    return model


def _remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads (repeat until stable), then initializers that
    nothing reads (ONNX Runtime warns of each at load: the exporter leaves a few behind)."""
    while True:
        used = _names_read(graph) | {o.name for o in graph.output}
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    inputs = {i.name for i in graph.input}  # an initializer listed as an input is a default value
    dead = [t for t in graph.initializer if t.name not in used and t.name not in inputs]
    for tensor in dead:
        graph.initializer.remove(tensor)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node of ``graph`` reads, in its subgraphs (If/Loop bodies) too."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _names_read(sub)
    return names
