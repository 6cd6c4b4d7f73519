"""The parity check's ReLU-kink rule (camserve.export.kinks): a unit whose input is within
float rounding of 0 may be on in ONNX Runtime and off in PyTorch; the check then compares
on ONNX Runtime's decisions, and only where every flipped unit is such a unit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from camserve.errors import ParityError
from camserve.export import export_model, kinks, parity, trace

SIZE = (8, 8)
CLASSES = 5


class Tiny(nn.Module):
    """conv -> ReLU -> 3x3 conv -> ReLU -> pool -> linear: a flipped unit of ``relu2`` changes
    a 3 x 3 x 4 block (14%) of the gradient at ``conv1``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))


UNIT = (0, 2, 3, 4)  # (image, channel, y, x) of relu2's input on the first parity image


def _near_kink_model() -> tuple[Tiny, float]:
    """Tiny with conv2's bias set so that ``UNIT`` of relu2's input is +2e-6 of its scale on
    the first parity case's image; returns the model and that scale."""
    model = Tiny().eval()
    image = parity.parity_cases(CLASSES, SIZE)[0][1][0]
    with torch.no_grad():
        pre = model.conv2(model.relu1(model.conv1(image)))
        scale = float(pre.abs().max())
        model.conv2.bias[UNIT[1]] -= pre[UNIT] - 2e-6 * scale
        pre = model.conv2(model.relu1(model.conv1(image)))
    assert 0 < float(pre[UNIT]) < 1e-5 * scale
    return model, scale


def _graph_with_shift(source: Path, target: Path, shift: float) -> Path:
    """The graph with ``shift`` added to ``UNIT`` of the second Relu's input (every image)."""
    proto = onnx.load(str(source))
    nodes = list(proto.graph.node)
    index = [i for i, n in enumerate(nodes) if n.op_type == "Relu"][1]
    delta = np.zeros((1, 6, *SIZE), np.float32)
    delta[(0, *UNIT[1:])] = shift
    proto.graph.initializer.append(onnx.numpy_helper.from_array(delta, "kink_shift"))
    add = onnx.helper.make_node("Add", [nodes[index].input[0], "kink_shift"], ["kink_shifted"])
    nodes[index].input[0] = "kink_shifted"
    del proto.graph.node[:]
    proto.graph.node.extend(nodes[:index] + [add] + nodes[index:])
    onnx.save(proto, str(target))
    return target


def _check(graph: Path, model: Tiny, with_kinks: bool) -> dict:
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    relus = (model, lambda: kinks.graph_relus(graph)) if with_kinks else None
    return parity.check_parity(session, trace.joint_function(model, [model.conv1]),
                               ["logits", "activations_0", "gradients_0"], CLASSES, SIZE, relus=relus)


@pytest.fixture(scope="module")
def near_kink(tmp_path_factory) -> tuple[Tiny, float, Path]:
    model, scale = _near_kink_model()
    out = tmp_path_factory.mktemp("kink")
    manifest = export_model(model, ["conv1"], out, input_size=SIZE, model_name="tiny")
    assert manifest.parity["relu_units_flipped"] == 0
    return model, scale, out / "model.onnx"


def test_a_unit_flipped_at_the_kink_passes_on_the_graphs_decisions(near_kink, tmp_path):
    model, scale, graph = near_kink
    flipped = _graph_with_shift(graph, tmp_path / "flipped.onnx", -4e-6 * scale)
    with pytest.raises(ParityError, match="gradients_0"):  # the share rule alone cannot tell
        _check(flipped, model, with_kinks=False)
    figures = _check(flipped, model, with_kinks=True)
    assert figures["relu_units_flipped"] == 1
    assert figures["outputs"]["gradients_0"]["share_off"] == 0.0


def test_a_unit_flipped_away_from_the_kink_still_fails(near_kink, tmp_path):
    """The same flip, but the graph's input there is 2e-3 of the scale below 0: not float
    rounding, so it is not excused (the logits barely move; the gradient does)."""
    model, scale, graph = near_kink
    flipped = _graph_with_shift(graph, tmp_path / "wrong.onnx", -2e-3 * scale)
    with pytest.raises(ParityError, match="gradients_0"):
        _check(flipped, model, with_kinks=True)


def test_relu_calls_records_forces_and_restores():
    model = Tiny().eval()
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        plain = model(x)
        with kinks.relu_calls(model) as calls:
            again = model(x)
        assert [tuple(c.shape) for c in calls] == [(2, 4, *SIZE), (2, 6, *SIZE)]
        torch.testing.assert_close(again, plain, rtol=0, atol=0)
        masks = [(c > 0).numpy() for c in calls]
        masks[1][:] = False  # every relu2 unit off: the output is the linear layer's bias
        with kinks.relu_calls(model, masks):
            off = model(x)
        torch.testing.assert_close(off, model.fc.bias.expand(2, -1))
        with pytest.raises(RuntimeError, match="no forced mask"), kinks.relu_calls(model, masks[:1]):
            model(x)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_graph_masks_pairs_in_order_and_bounds_the_flips():
    x = torch.tensor([[1.0, -1.0, 1e-7, -0.5]])
    agree = x.numpy() + np.float32(1e-8)  # the graph's inputs: rounding apart, the same decisions
    masks, flips = kinks.graph_masks([agree], [x], tol=1e-4)
    assert flips == 0 and masks[0].tolist() == [[True, False, True, False]]
    near = agree.copy()
    near[0, 2] = -1e-7  # the 1e-7 unit off in the graph: both within 1e-4 of the scale 1
    masks, flips = kinks.graph_masks([near], [x], tol=1e-4)
    assert flips == 1 and masks[0].tolist() == [[True, False, False, False]]
    far = agree.copy()
    far[0, 0] = -1.0  # a unit at 1.0 off: not rounding
    assert kinks.graph_masks([far], [x], tol=1e-4) is None
    far = agree.copy()
    far[0, 2] = -1e-2  # near 0 in PyTorch, not in the graph
    assert kinks.graph_masks([far], [x], tol=1e-4) is None
    assert kinks.graph_masks([agree, agree], [x], tol=1e-4) is None  # one functional relu unrecorded
    assert kinks.graph_masks([agree[:, :2]], [x], tol=1e-4) is None
