"""Cheaper forms of the ONNX ops around the graph's one-hot cotangent.

A served explanation names its targets by rank (``target_rank[n] >= 0``: top-1 by default),
and the traced ``select_cotangent`` builds that cotangent as a one-hot row: a full sort of
the logits (``TopK`` with ``k = K``), a ``GatherElements`` at each row's rank, a
``ScatterElements`` of ones and a ``Where`` that keeps the ``cotangent`` input's rows where
``target_rank < 0``. Its first consumer is usually the classifier's input gradient,
``MatMul(cotangent, W)``, which reads the whole ``[K, D]`` weight for one row of it. Two
rewrites, exact for every input:

* the sort stops at the deepest rank asked for: ``k = clip(max(target_rank) + 1, 1, K)``
  (ONNX's ``TopK`` breaks ties by the lower index whatever ``k``, so the same classes);
* where every row is ranked, ``MatMul(one_hot, W)`` is ``Gather(W, class)``: an ``If`` on
  ``all(target_rank >= 0)`` takes the gather, else the MatMul (a one-hot product adds
  exact zeros, so both branches give the same bits).

At batch 1 that is 0.23 of efficientnet_b0's 0.5 ms over its forward (2% of the run) and a
fifth of the sort. Both read ``target_rank`` through ``min(target_rank, K - 1)``, with ``K``
from the logits' ``Shape``, so that on a GPU the few integer nodes that decide the branch and
``k`` run on the host and the stream never waits for them (:func:`_capped_ranks`). Graphs without the pattern (segmentation's spatial cotangent, an
embedding's cosine rows, a head whose weight is not a constant 2-d matrix) are unchanged.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper


def shortcut_one_hot(model: onnx.ModelProto) -> onnx.ModelProto:
    """Apply both rewrites to ``model`` in place where its graph has the pattern; returns it."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for where in [n for n in graph.node if n.op_type == "Where"]:
        found = _one_hot_where(where, producers)
        if found is None:
            continue
        ranked, classes, topk = found
        matmuls = [m for m in consumers.get(where.output[0], []) if m.op_type == "MatMul" and m.input[0] == where.output[0]
                   and _constant_2d(m.input[1], graph, producers)]
        fresh = topk is not None and not topk.input[1].endswith("__k")
        sort = fresh and _only_ranked_reads(topk, consumers, producers)
        capped = _capped_ranks(graph, topk) if fresh and (matmuls or sort) else None
        for matmul in matmuls:
            _gather_if_ranked(graph, matmul, ranked, classes, capped)
        if sort:
            _shallow_sort(graph, topk, capped)
    return model


def _one_hot_where(where: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> tuple[str, str, onnx.NodeProto | None] | None:
    """``(target_rank >= 0, class indices [N, 1], the logits' TopK or None)`` of the traced
    ``Where(unsqueeze(target_rank >= 0), scatter(zeros, class, 1), cotangent)``, or None."""
    if len(where.input) != 3 or where.input[2] != "cotangent":
        return None
    unsqueeze, scatter = producers.get(where.input[0]), producers.get(where.input[1])
    ge = producers.get(unsqueeze.input[0]) if unsqueeze is not None and unsqueeze.op_type == "Unsqueeze" else None
    if ge is None or ge.op_type != "GreaterOrEqual" or ge.input[0] != "target_rank":
        return None
    if scatter is None or scatter.op_type != "ScatterElements" or _int_attr(scatter, "axis", 0) != 1:
        return None
    gather = producers.get(scatter.input[1])
    topk = producers.get(gather.input[0]) if gather is not None and gather.op_type == "GatherElements" else None
    if topk is not None and (topk.op_type != "TopK" or topk.output[1] != gather.input[0] or _int_attr(topk, "axis", -1) not in (1, -1)):
        topk = None
    return ge.output[0], scatter.input[1], topk


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _constant_2d(name: str, graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether ``name`` is a 2-d initializer or a ``[1, 0]`` Transpose of one (a Linear's weight)."""
    inits = {t.name: t for t in graph.initializer}
    node = producers.get(name)
    if node is not None and node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        return perm == [1, 0] and node.input[0] in inits and len(inits[node.input[0]].dims) == 2
    return name in inits and len(inits[name].dims) == 2


def _only_ranked_reads(topk: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]],
                       producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether the sort's values are unread and its indices are read only at a clipped rank
    (``GatherElements`` with ``Unsqueeze(Clip(target_rank, ...))`` indices): then a shorter
    sort gives every read entry."""
    if consumers.get(topk.output[0]):
        return False
    readers = consumers.get(topk.output[1], [])
    return bool(readers) and all(r.op_type == "GatherElements" and r.input[0] == topk.output[1]
                                 and _clipped_rank(r.input[1], producers) for r in readers)


def _clipped_rank(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether ``name`` is ``Unsqueeze(Clip(target_rank, ...))``: never above ``max(target_rank)``
    where ``max(target_rank) >= 0``, else 0."""
    unsqueeze = producers.get(name)
    clip = producers.get(unsqueeze.input[0]) if unsqueeze is not None and unsqueeze.op_type == "Unsqueeze" else None
    return clip is not None and clip.op_type == "Clip" and clip.input[0] == "target_rank"


def _node(graph_nodes: list[onnx.NodeProto], op: str, inputs: list[str], output: str, **attrs: object) -> str:
    graph_nodes.append(helper.make_node(op, inputs, [output], name=f"{output}__node", **attrs))
    return output


def _capped_ranks(graph: onnx.GraphProto, topk: onnx.NodeProto) -> str:
    """``min(target_rank, K - 1)``, inserted before ``topk`` (``K`` its ``k``: the class count).

    The ``If``'s condition and the sort's ``k`` are computed from it. Its first node reads
    the class count, which the exporter takes from ``Shape(logits)``: a value on the CPU
    under every execution provider. ONNX Runtime's CUDA provider keeps a node on the CPU
    when it reads such a value and otherwise only graph inputs and small constants
    (``GetCpuPreferredNodes``), so the whole chain runs there and the ``If`` (whose
    condition) and ``TopK`` (whose ``k``) read host memory need no device-to-host copy,
    which would wait for the forward to finish. Reading ``target_rank`` alone, the chain
    would run on the GPU. Exact: ``min(r, K - 1) >= 0`` iff ``r >= 0``, and
    ``max(min(r, K - 1)) + 1 = min(max(r) + 1, K)``."""
    out = topk.output[1]
    pre: list[onnx.NodeProto] = []
    one = helper.make_tensor(f"{out}__one", TensorProto.INT64, [1], [1])
    pre.append(helper.make_node("Constant", [], [f"{out}__one"], value=one, name=f"{out}__one__node"))
    last = _node(pre, "Sub", [topk.input[1], f"{out}__one"], f"{out}__last_rank")
    capped = _node(pre, "Min", ["target_rank", last], f"{out}__capped_rank")
    _replace(graph, topk, pre + [topk])
    return capped


def _gather_if_ranked(graph: onnx.GraphProto, matmul: onnx.NodeProto, ranked: str, classes: str,
                      capped: str | None = None) -> None:
    """Replace ``matmul`` by ``If(all(ranked), Gather(W, classes), MatMul(...))``; the condition
    from ``capped`` (:func:`_capped_ranks`) where given, else from ``ranked``."""
    out, (cot, weight) = matmul.output[0], list(matmul.input)
    pre: list[onnx.NodeProto] = []
    if capped is not None:
        zero = helper.make_tensor(f"{out}__zero", TensorProto.INT64, [], [0])
        pre.append(helper.make_node("Constant", [], [f"{out}__zero"], value=zero, name=f"{out}__zero__node"))
        lowest = _node(pre, "ReduceMin", [capped], f"{out}__lowest_rank", keepdims=0)
        cond = _node(pre, "GreaterOrEqual", [lowest, f"{out}__zero"], f"{out}__all_ranked")
    else:
        flags = _node(pre, "Cast", [ranked], f"{out}__ranked_i32", to=TensorProto.INT32)
        lowest = _node(pre, "ReduceMin", [flags], f"{out}__all_ranked_i32", keepdims=0)
        cond = _node(pre, "Cast", [lowest], f"{out}__all_ranked", to=TensorProto.BOOL)
    flat = helper.make_tensor(f"{out}__flat_shape", TensorProto.INT64, [1], [-1])
    then_nodes: list[onnx.NodeProto] = [helper.make_node("Constant", [], [f"{out}__flat"], value=flat, name=f"{out}__flat__node")]
    rows = _node(then_nodes, "Reshape", [classes, f"{out}__flat"], f"{out}__classes")
    _node(then_nodes, "Gather", [weight, rows], f"{out}__gathered", axis=0)
    else_nodes: list[onnx.NodeProto] = []
    _node(else_nodes, "MatMul", [cot, weight], f"{out}__product")
    result = lambda name: [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)]  # noqa: E731
    branch = helper.make_node(
        "If", [cond], [out], name=f"{out}__if",
        then_branch=helper.make_graph(then_nodes, f"{out}_gather", [], result(f"{out}__gathered")),
        else_branch=helper.make_graph(else_nodes, f"{out}_matmul", [], result(f"{out}__product")),
    )
    _replace(graph, matmul, pre + [branch])


def _shallow_sort(graph: onnx.GraphProto, topk: onnx.NodeProto, capped: str) -> None:
    """``TopK(logits, K)`` -> ``TopK(logits, max(max(capped) + 1, 1))``, which is
    ``clip(max(target_rank) + 1, 1, K)`` (:func:`_capped_ranks`; its ``one`` is reused)."""
    out = topk.output[1]
    pre: list[onnx.NodeProto] = []
    deepest = _node(pre, "ReduceMax", [capped], f"{out}__deepest", keepdims=1)
    wanted = _node(pre, "Add", [deepest, f"{out}__one"], f"{out}__wanted")
    k = _node(pre, "Max", [wanted, f"{out}__one"], f"{out}__k")
    topk.input[1] = k
    _replace(graph, topk, pre + [topk])
    # the exporter declared the outputs [N, K]: a stale shape lets the memory planner hand
    # the shorter result a buffer sized for another tensor
    stale = [v for v in graph.value_info if v.name in topk.output]
    for info in stale:
        graph.value_info.remove(info)


def _replace(graph: onnx.GraphProto, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    """``new`` in ``node``'s place in the (topologically sorted) node list."""
    nodes = list(graph.node)
    index = next(i for i, n in enumerate(nodes) if list(n.output) == list(node.output))
    copies = [onnx.NodeProto() for _ in new]
    for copy, source in zip(copies, new):
        copy.CopyFrom(source)
    del graph.node[:]
    graph.node.extend(nodes[:index] + copies + nodes[index + 1:])
