"""Batch norms folded into their convolutions for FullGrad's and Guided Backprop's graphs
(``camserve.export.folding``): same function, one weight per layer, no batch-norm pass in the
backward, and the optimization level the export records for ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

export = pytest.importorskip("camserve.export")
from camserve.export.extras import fullgrad_function, guided_function  # noqa: E402
from camserve.export.folding import fold_batch_norms  # noqa: E402
from camserve.pipeline.runtime import GraphSession, extra_session_options  # noqa: E402
from camserve.errors import ManifestError  # noqa: E402


def bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    m = nn.BatchNorm2d(c)
    m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
    m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    m.weight.data.copy_(0.5 + torch.rand(c, generator=g))
    m.bias.data.copy_(0.2 * torch.randn(c, generator=g))
    return m


class Residual(nn.Module):
    """conv-bn-relu, a biased conv-bn, and a conv whose output is read twice (by its batch
    norm and by the skip): only the first two pairs may fold (the second not for FullGrad)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1, self.r1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), bn(8, 1), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(8, 8, 3, padding=1, bias=True), bn(8, 2), nn.ReLU()
        self.c3, self.b3 = nn.Conv2d(8, 8, 1, bias=False), bn(8, 3)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.r2(self.b2(self.c2(self.r1(self.b1(self.c1(x))))))
        y = self.c3(x)
        return self.head(self.b3(y) + y)


class Branchy(Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
            x = -x
        return super().forward(x)


def test_folds_each_conv_read_only_by_its_batch_norm() -> None:
    model = Residual().eval()
    x = torch.randn(2, 3, 16, 16)
    folded, count = fold_batch_norms(model)
    assert count == 2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 1  # b3: its conv feeds the skip too
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the caller's model is untouched
    kept, count = fold_batch_norms(model, keep_biased=True)
    assert count == 1 and sum(isinstance(m, nn.BatchNorm2d) for m in kept.modules()) == 2


def test_untraceable_model_is_returned_as_it_is() -> None:
    model = Branchy().eval()
    folded, count = fold_batch_norms(model)
    assert folded is model and count == 0


def test_folded_graph_functions_compute_the_unfolded_ones() -> None:
    """FullGrad keeps the biased conv's own term (keep_biased) and every folded pair's batch-norm
    term; Guided Backprop's input gradient is the same."""
    model = Residual().eval()
    x = torch.randn(2, 3, 16, 16)
    cot, rank = torch.eye(5)[[1, 3]], torch.full((2,), -1, dtype=torch.int64)
    for make, keep in ((lambda m: fullgrad_function(m, (16, 16))[0], True), (lambda m: guided_function(m)[0], False)):
        folded, count = fold_batch_norms(model, keep_biased=keep)
        assert count == (1 if keep else 2)
        plain = make(model)(x, cot, rank)
        for a, b in zip(make(folded)(x, cot, rank), plain):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_export_records_the_fold_and_the_level(tmp_path) -> None:
    """The exported graphs carry no BatchNormalization, the manifest says how many were folded
    and at which level ONNX Runtime runs each extra graph, and the served session uses it."""
    export.export_model(Residual().eval(), ["c3"], tmp_path / "r", input_size=16, model_name="r",
                        extras=("fullgrad", "guided"), check=True)
    session = GraphSession(tmp_path / "r", intra_op_threads=1)
    extras = session.manifest.extras
    assert (extras["fullgrad"]["batch_norms_folded"], extras["guided"]["batch_norms_folded"]) == (1, 2)
    assert {name: e["ort_level"] for name, e in extras.items()} == {"fullgrad": "all", "guided": "all"}
    assert all(e["ort_prepacking"] is True for e in extras.values())
    for name in ("fullgrad", "guided"):
        ops = [n.op_type for n in onnx.load(str(tmp_path / "r" / f"{name}.onnx")).graph.node]
        assert ops.count("BatchNormalization") == {"fullgrad": 2, "guided": 1}[name]  # b3 stays; FullGrad keeps b2
        level = session.extras[name].get_session_options().graph_optimization_level
        assert level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    cot = np.eye(5, dtype=np.float32)[[0, 2]]
    guided = session.run_extra("guided", x, cot)
    assert guided["guided"].shape == (2, 3, 16, 16) and np.isfinite(guided["guided"]).all()


def test_shapley_graph_keeps_a_symbolic_batch_through_batch_norms(tmp_path) -> None:
    """ShapleyCAM's double backward through eval batch norms (here all three sit after the
    layer) is traced as products: the graph takes any batch, and its ``g - hvp / 2`` is the
    unpatched model's own double backward."""
    from camserve.export.trace import leaf_hooks

    model = Residual().eval()
    export.export_model(model, ["c1"], tmp_path / "s", input_size=16, model_name="s", extras=("shapley",), check=True)
    session = GraphSession(tmp_path / "s", intra_op_threads=1)
    assert session.manifest.extras["shapley"]["ort_level"] == "all"
    assert session.manifest.extras["shapley"]["ort_prepacking"] is False
    assert session.extras["shapley"].get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    for n in (1, 3):
        x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(n))
        cot = torch.eye(5)[torch.arange(n) % 5]
        store: list[torch.Tensor] = []
        with torch.enable_grad(), leaf_hooks([model.c1], store):
            logits = model(x)
            rest = 2 * (logits * cot).sum(1) - cot.sum(1) * torch.logsumexp(logits, 1)
            (g,) = torch.autograd.grad(rest.sum(), store, create_graph=True)
            (hvp,) = torch.autograd.grad(g, store, grad_outputs=[store[0].detach()])
        expected = (g - 0.5 * hvp).detach().numpy()
        got = session.run_extra("shapley", x.numpy(), cot.numpy())["gradients_0"]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))


def test_unknown_level_is_refused() -> None:
    assert extra_session_options(1, "basic").graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert extra_session_options(1, "all", prepacking=False).get_session_config_entry("session.disable_prepacking") == "1"
    with pytest.raises(ManifestError, match="'fastest'"):
        extra_session_options(1, "fastest")
