"""The exported graph's one-hot shortcuts (camserve.export.one_hot): a ranked target's
classifier gradient is a row of the weight, and the logits' sort stops at the deepest rank,
with the same outputs, bit for bit, as the product and the full sort."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from camserve.export import export_model
from camserve.export.one_hot import shortcut_one_hot


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = _Net().eval()
    out = tmp_path_factory.mktemp("one_hot")
    export_model(model, ["stem"], out, input_size=16, model_name="n")
    return model, out


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, x: np.ndarray, cot: np.ndarray, ranks: list[int]) -> list[np.ndarray]:
    return session.run(None, {"image": x, "cotangent": cot, "target_rank": np.array(ranks, np.int64)})


def test_graphs_gather_the_ranked_rows_and_sort_no_deeper_than_asked(exported) -> None:
    _, out = exported
    graph = onnx.load(str(out / "model.onnx")).graph  # the extras read the cotangent through a Mul: unchanged
    producers = {o: n for n in graph.node for o in n.output}
    (branch,) = [n for n in graph.node if n.op_type == "If"]
    branches = {a.name: onnx.helper.get_attribute_value(a) for a in branch.attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["Constant", "Reshape", "Gather"]
    assert [n.op_type for n in branches["else_branch"].node] == ["MatMul"]
    (topk,) = [n for n in graph.node if n.op_type == "TopK"]
    assert producers[topk.input[1]].op_type == "Max"
    assert not any(n.op_type == "MatMul" and "where" in n.input[0] for n in graph.node)
    ops = [n.op_type for n in graph.node]
    again = shortcut_one_hot(onnx.load(str(out / "model.onnx")))  # nothing left to rewrite
    assert [n.op_type for n in again.graph.node] == ops


def test_ranked_rows_match_torch_and_the_explicit_one_hot_bit_for_bit(exported) -> None:
    model, out = exported
    session = _session(out / "model.onnx")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    free = rng.standard_normal((4, 6)).astype(np.float32)
    ranks = [0, 5, -1, 2]  # top-1, the last class, a cotangent of the client's, top-3
    logits, acts, grads = _run(session, x, free, ranks)

    xt = torch.from_numpy(x)
    feats = model.stem(xt).detach().requires_grad_(True)
    ref_logits = model.head(feats)
    order = ref_logits.detach().argsort(dim=1, descending=True)
    cot = torch.from_numpy(free.copy())
    for row, rank in enumerate(ranks):
        if rank >= 0:
            cot[row] = 0
            cot[row, order[row, rank]] = 1
    (ref,) = torch.autograd.grad(ref_logits, feats, cot)
    np.testing.assert_allclose(logits, ref_logits.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads, ref.numpy(), rtol=1e-4, atol=1e-6)

    # every row ranked (the Gather branch) against the same one-hot rows given explicitly (the
    # MatMul branch, with the full sort's classes): the same bits
    ranked = [1, 0, 4, 3]
    _, _, gathered = _run(session, x, free, ranked)
    one_hot = np.zeros_like(free)
    one_hot[np.arange(4), np.argsort(-logits, axis=1, kind="stable")[np.arange(4), ranked]] = 1
    _, _, product = _run(session, x, one_hot, [-1] * 4)
    np.testing.assert_array_equal(gathered, product)
    assert np.abs(gathered).max() > 0


def _host_values(graph: onnx.GraphProto) -> set[str]:
    """The values ONNX Runtime's CUDA provider computes on the CPU, by its own rule
    (``GetCpuPreferredNodes`` in onnxruntime/core/framework/fallback_cpu_capability.cc): a
    ``Shape``'s output is on the CPU, and so is the output of a node that reads at least one
    such value and otherwise only graph inputs and small constants."""
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    constants = {c for c in constants if not any(i.name == c and np.prod(i.dims) > 100 for i in graph.initializer)}
    inputs = {i.name for i in graph.input}
    host = {o for n in graph.node if n.op_type == "Shape" for o in n.output}
    for node in graph.node:  # topologically sorted: one pass
        reads = [i for i in node.input if i]
        if node.op_type not in ("Shape", "Constant") and any(i in host for i in reads) \
                and all(i in host or i in constants or i in inputs for i in reads):
            host.update(node.output)
    return host


def test_the_branch_and_the_sort_depth_are_decided_on_the_host(exported) -> None:
    """On a GPU, an ``If`` reads its condition and ``TopK`` its ``k`` from host memory: computed
    on the device, each would be copied back mid-graph, the stream waiting for the forward."""
    _, out = exported
    graph = onnx.load(str(out / "model.onnx")).graph
    host = _host_values(graph)
    (branch,) = [n for n in graph.node if n.op_type == "If"]
    (topk,) = [n for n in graph.node if n.op_type == "TopK"]
    assert branch.input[0] in host
    assert topk.input[1] in host
    assert "logits" not in host and topk.output[1] not in host  # the rule keeps device values on the device


#: Inputs that ONNX Runtime's CUDA kernels read from host memory (``InputMemoryType(OrtMemTypeCPUInput, i)``
#: in onnxruntime/core/providers/cuda): a value computed on the GPU there is copied back mid-run.
HOST_INPUTS = {"Reshape": [1], "Expand": [1], "Tile": [1], "Slice": [1, 2, 3, 4], "Squeeze": [1], "Unsqueeze": [1],
               "ReduceSum": [1], "ReduceMean": [1], "ReduceMax": [1], "ReduceMin": [1], "TopK": [1], "If": [0],
               "ConstantOfShape": [0], "Resize": [1, 2, 3], "Pad": [1, 2, 3], "Range": [0, 1, 2], "Split": [1],
               "OneHot": [1], "Clip": [1, 2], "Trilu": [1], "CumSum": [1]}


def _device_reads(graph: onnx.GraphProto) -> list[str]:
    """Every host-memory input of a CUDA kernel (:data:`HOST_INPUTS`) that is neither a
    constant, a graph input nor a value the provider computes on the host."""
    ready = _host_values(graph) | {i.name for i in graph.initializer} | {i.name for i in graph.input}
    ready |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [f"{n.op_type}[{i}] <- {n.input[i]}" for n in graph.node for i in HOST_INPUTS.get(n.op_type, [])
            if i < len(n.input) and n.input[i] and n.input[i] not in ready]


def test_no_graph_copies_a_device_value_back_mid_run(tmp_path) -> None:
    """The explain graph, its forward, the extras and the device post-processing graphs: on a
    GPU none of them waits for a value computed on the device."""
    from camserve.cam.device import post_graph
    from camserve.manifest import LayerSpec

    torch.manual_seed(1)
    export_model(_Net().eval(), ["stem"], tmp_path, input_size=16, model_name="n", check=False,
                 extras=["fullgrad", "guided", "shapley"])
    graphs = {p.name: onnx.load(str(p)).graph for p in sorted(tmp_path.glob("*.onnx"))}
    assert {"model.onnx", "forward.onnx", "fullgrad.onnx", "guided.onnx", "shapley.onnx"} <= set(graphs)
    layers = [LayerSpec(name="a", layout="NCHW", shape=(8, 4, 4)), LayerSpec(name="b", layout="NHWC", shape=(8, 8, 3))]
    graphs["post (layercam)"] = post_graph("layercam", layers, (16, 16)).graph
    graphs["post (gradcam++)"] = post_graph("gradcam++", layers, (16, 16)).graph
    assert {name: _device_reads(g) for name, g in graphs.items()} == {name: [] for name in graphs}
    old_form = onnx.load(str(tmp_path / "model.onnx")).graph  # the check can fail: a k computed from target_rank alone
    (topk,) = [n for n in old_form.node if n.op_type == "TopK"]
    topk.input[1] = "target_rank"
    assert _device_reads(old_form) == []  # a graph input is on the host
    old_form.node.insert(0, onnx.helper.make_node("ReduceMax", ["target_rank"], ["deepest"], keepdims=1))
    topk.input[1] = "deepest"
    assert _device_reads(old_form) == ["TopK[1] <- deepest"]


@pytest.mark.parametrize("ranks", [[-1, -1, -1, -1], [5, 5, 5, 5], [0, 0, 0, 0], [3, -1, 0, 5]])
def test_every_rank_pattern_matches_the_full_sort(exported, ranks) -> None:
    """The depth of the sort and the branch for all-free, deepest, top-1 and mixed rows: the
    gradients equal those of the explicit one-hot rows (the full sort's classes)."""
    _, out = exported
    session = _session(out / "model.onnx")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    free = rng.standard_normal((4, 6)).astype(np.float32)
    logits, _, grads = _run(session, x, free, ranks)
    cot = free.copy()
    order = np.argsort(-logits, axis=1, kind="stable")
    for row, rank in enumerate(ranks):
        if rank >= 0:
            cot[row] = 0
            cot[row, order[row, rank]] = 1
    _, _, explicit = _run(session, x, cot, [-1] * 4)
    np.testing.assert_array_equal(grads, explicit)
