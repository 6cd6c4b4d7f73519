"""Guided Grad-CAM from one run: where no ``nn.ReLU`` module runs after the target layer, the
guided graph also answers the layer's activations and gradients (the plain ones there), and
``explain()`` takes GradCAM from them instead of running ``model.onnx``
(:mod:`camserve.export.guided_taps`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import fx, nn

export = pytest.importorskip("camserve.export")
from camserve.cam import TopK, explain  # noqa: E402
from camserve.export import guided_taps  # noqa: E402
from camserve.pipeline.runtime import GraphSession  # noqa: E402


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)) + x)  # ResNet's order: the sum, then the in-place ReLU


def _net(relu_head: bool) -> nn.Module:
    torch.manual_seed(3)
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16)] + ([nn.ReLU(), nn.Linear(16, 5)] if relu_head else [nn.Linear(16, 5)])
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Sequential(_Block(8), _Block(8)), *head).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[bool, GraphSession]:
    out = {}
    for relu_head in (False, True):
        path = tmp_path_factory.mktemp("guided") / ("relu_head" if relu_head else "plain_head")
        export.export_model(_net(relu_head), ["3"], path, input_size=24, labels=list("abcde"), extras=("guided",), check=True)
        out[relu_head] = GraphSession(path, intra_op_threads=1)
    return out


def test_guided_graph_answers_the_layer_only_where_no_relu_follows(exports) -> None:
    assert exports[False].manifest.extras["guided"]["outputs"] == ["logits", "guided", "activations_0", "gradients_0"]
    assert exports[True].manifest.extras["guided"]["outputs"] == ["logits", "guided"]
    # the guided graph's layer arrays are the main graph's (folded batch norms: rounding only)
    session = exports[False]
    x = np.random.default_rng(4).standard_normal((3, 3, 24, 24)).astype(np.float32)
    cot = np.eye(5, dtype=np.float32)[[0, 2, 4]]
    main, guided = session.run(x, cot), session.run_extra("guided", x, cot)
    for name, ref in (("activations_0", main.activations[0]), ("gradients_0", main.gradients[0])):
        np.testing.assert_allclose(guided[name], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=name)


def test_guided_gradcam_takes_one_run_and_the_same_map(exports) -> None:
    session = exports[False]
    x = np.random.default_rng(5).standard_normal((4, 3, 24, 24)).astype(np.float32)
    targets = [TopK(2), [1], [0, 3], TopK(1)]
    calls: list[str] = []
    run, run_extra, manifest = session.run, session.run_extra, session.manifest
    session.run = lambda *a, **k: calls.append("main") or run(*a, **k)  # type: ignore[method-assign]
    session.run_extra = lambda name, *a, **k: calls.append(name) or run_extra(name, *a, **k)  # type: ignore[method-assign]
    try:
        one = explain(session, x, targets, ["guidedgradcam", "guidedbackprop"])
        assert calls == ["guided"]
        # the same export told to answer the picture only: GradCAM from a run of model.onnx
        extras = {"guided": {**session.manifest.extras["guided"], "outputs": ["logits", "guided"]}}
        session.manifest = dataclasses.replace(session.manifest, extras=extras)
        calls.clear()
        two = explain(session, x, targets, ["guidedgradcam", "guidedbackprop"])
        assert calls == ["main", "guided"]
    finally:
        del session.run, session.run_extra
        session.manifest = manifest
    assert one.classes == two.classes
    for method in ("guidedgradcam", "guidedbackprop"):
        for a, b in zip(one.cams[method], two.cams[method]):
            np.testing.assert_allclose(a, b, atol=1e-4, err_msg=method)
        for a, b in zip(one.pictures[method], two.pictures[method]):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, method
    np.testing.assert_allclose(one.logits, two.logits, rtol=1e-4, atol=1e-4)


def test_taps_sit_after_the_layers_output_and_relu_order() -> None:
    net = _net(relu_head=False)
    gm = fx.symbolic_trace(net)
    (tap,) = guided_taps.tap_outputs(gm, ["3"])
    x = torch.randn(2, 3, 24, 24)
    seen: list[torch.Tensor] = []
    tap.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), net(x).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(seen[0].numpy(), net[:4](x).numpy(), rtol=1e-5, atol=1e-6)
    assert guided_taps.relu_free_after(gm, [tap], x)
    gm_relu = fx.symbolic_trace(_net(relu_head=True))
    assert not guided_taps.relu_free_after(gm_relu, guided_taps.tap_outputs(gm_relu, ["3"]), x)
    untouched = fx.symbolic_trace(net)
    code = untouched.code
    assert guided_taps.tap_outputs(untouched, ["3", "no_such_layer"]) is None
    assert untouched.code == code and not any(n.op == "call_module" and "tap" in n.target for n in untouched.graph.nodes)
