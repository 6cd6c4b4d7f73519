"""Hand the ONNX exporter a traced graph it need not decompose again.

``torch.onnx.export`` re-traces every program through ``run_decompositions`` (fake tensors,
symbolic shapes) to lower it to the ops it can translate. A joint graph traced by
:func:`camserve.export.trace.trace_joint` is already core ATen; what that second pass still
changed was the in-place ops the trace records (``relu_``, ``add_`` of ResNet's blocks) and
the few backward ops without an ONNX translation. :func:`out_of_place` rewrites the first,
:func:`camserve.export.decompositions.traced_decomposition_table` decomposes the second during the
trace, and :func:`skip_redundant_decomposition` lets the exporter skip its pass for a graph
with nothing left to lower: the same ONNX graphs (node for node but for two Squeeze that
became Reshape; bit-equal outputs on resnet18), exported in a third less time (resnet18,
64 px, main + head + three extra graphs with the parity check: 69 -> 46 s; the main graph
alone 12.3 -> 7.0 s). A graph with anything left to lower still takes the pass (Swin's
attention mask is written through a view: its main graph).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.fx import GraphModule, Node

#: ``GraphModule.meta`` key set on graphs that :func:`out_of_place` has rewritten.
LOWERED = "camserve_lowered"


def _out_of_place_overload(target: object) -> torch._ops.OpOverload | None:
    """``aten.add_.Tensor`` -> ``aten.add.Tensor``: the functional twin of an in-place op
    that writes its first argument, or None."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    schema = target._schema
    name = schema.name.split("::")[-1]
    if schema.name.split("::")[0] != "aten" or not name.endswith("_") or name.endswith("__"):
        return None
    first = schema.arguments[0].alias_info if schema.arguments else None
    if first is None or not first.is_write:
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def _aliases(node: Node) -> bool:
    """The node's result may share memory with an input (a view op)."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and any(r.alias_info is not None for r in target._schema.returns)


def out_of_place(gm: GraphModule) -> int:
    """Replace each in-place op ``y = f_(x)`` by ``y = f(x)`` and point every later reader of
    ``x`` at ``y``: the same values, with no mutation. Only where that is exact: ``x`` is
    computed in the graph (not an input), is not a view, and has no view taken before the
    write (a view would see the write). Others stay in place (the exporter's own pass then
    lowers them). Marks the graph :data:`LOWERED`; returns how many ops were rewritten."""
    order: dict[Node, float] = {n: float(i) for i, n in enumerate(gm.graph.nodes)}
    rewritten = 0
    for node in list(gm.graph.nodes):
        functional = _out_of_place_overload(node.target) if node.op == "call_function" else None
        if functional is None:
            continue
        x = node.args[0]
        if (not isinstance(x, Node) or x.op != "call_function" or _aliases(x)
                or any(_aliases(u) and order[u] < order[node] for u in x.users)):
            continue
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(functional, node.args, node.kwargs)
        new.meta = dict(node.meta)
        order[new] = order[node] + 0.5
        node.replace_all_uses_with(new)
        for user in list(x.users):
            if user is not new and order[user] > order[node]:
                user.replace_input_with(x, new)
        gm.graph.erase_node(node)
        rewritten += 1
    gm.graph.lint()
    gm.recompile()
    gm.meta[LOWERED] = True
    return rewritten


@contextlib.contextmanager
def skip_redundant_decomposition(gm: torch.nn.Module) -> Iterator[None]:
    """While active, ``torch.onnx.export`` skips its decomposition pass for a program whose
    ops it can all translate, when ``gm`` is a :data:`LOWERED` graph (torch 2.14's exporter:
    ``_fx_passes.decompose_with_registry``; without that hook, nothing changes)."""
    try:
        from torch.onnx._internal.exporter import _decomp, _fx_passes
    except ImportError:  # another exporter layout: it decomposes as usual
        yield
        return
    original = getattr(_fx_passes, "decompose_with_registry", None)
    if original is None or not getattr(gm, "meta", {}).get(LOWERED):
        yield
        return

    def decompose(program: torch.export.ExportedProgram, registry: object) -> torch.export.ExportedProgram:
        translatable = set(_decomp.get_onnx_implemented_overloads(registry))
        pending = [n for n in program.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                   and n.target not in translatable and not _is_assertion(n.target)]
        return original(program, registry) if pending else program

    _fx_passes.decompose_with_registry = decompose
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = original


def _is_assertion(target: torch._ops.OpOverload) -> bool:
    """Shape assertions (``_assert_scalar`` ...): the exporter removes them after the pass."""
    return target._schema.name.split("::")[-1].startswith("_assert")
