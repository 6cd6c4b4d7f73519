"""The traced graph reaches the ONNX exporter lowered already, so its decomposition pass is
skipped (:mod:`camserve.export.lowering`), and the exported graphs are the same as with it."""

from __future__ import annotations

import contextlib
import traceback

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

export = pytest.importorskip("camserve.export")
from camserve.export import lowering, onnx_export  # noqa: E402
from camserve.pipeline.runtime import GraphSession  # noqa: E402

aten = torch.ops.aten


def _targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_out_of_place_keeps_values_and_removes_mutation() -> None:
    def fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = x * 2
        before = a + 0  # reads a before the write
        a.relu_()
        a.add_(y)
        return before, a * 3, a

    x, y = torch.randn(2, 5), torch.randn(2, 5)
    gm = make_fx(fn)(x, y)
    assert aten.relu_.default in _targets(gm) and aten.add_.Tensor in _targets(gm)
    assert lowering.out_of_place(gm) == 2 and gm.meta[lowering.LOWERED]
    assert not any(str(t).endswith("_.default") or str(t).endswith("_.Tensor") for t in _targets(gm))
    for got, want in zip(gm(x, y), fn(x, y)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_out_of_place_leaves_writes_through_views_and_inputs() -> None:
    def through_view(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = x * 1
        v = a.view(-1)
        a.add_(1)  # v sees the write: not rewritable
        return v * 1, a

    def on_input(x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x + 1

    for fn in (through_view, on_input):
        gm = make_fx(fn)(torch.randn(2, 3))
        assert lowering.out_of_place(gm) == 0
        x = torch.randn(2, 3)
        for got, want in zip(gm(x.clone()), fn(x.clone())):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


class _Net(nn.Module):
    """In-place ReLUs, a residual ``+=`` and a max-pool: what the pass used to lower."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        out = self.block(s)
        out += s  # ResNet's order: the sum, then the in-place ReLU
        return self.head(self.relu(out))


def _export(tmp, name: str) -> dict[str, onnx.ModelProto]:
    torch.manual_seed(0)
    model = _Net().eval()
    out = tmp / name
    export.export_model(model, ["stem"], out, input_size=16, model_name="n", head=True,
                        extras=("fullgrad", "guided", "shapley"))
    return {p.name: onnx.load(str(p)) for p in sorted(out.glob("*.onnx"))}


def test_exports_skip_the_pass_and_write_the_same_graphs(tmp_path, monkeypatch) -> None:
    from torch.onnx._internal.exporter import _fx_passes

    calls: list = []
    real = _fx_passes.decompose_with_registry
    monkeypatch.setattr(_fx_passes, "decompose_with_registry", lambda p, r: calls.append("".join(traceback.format_stack()[-8:])) or real(p, r))
    lowered = _export(tmp_path, "lowered")
    assert calls == [], f"a lowered graph still took the exporter's decomposition pass: {calls[0]}" if calls else ""

    monkeypatch.setattr(onnx_export, "skip_redundant_decomposition", lambda gm: contextlib.nullcontext())
    plain = _export(tmp_path, "plain")
    assert calls, "without the hook the exporter decomposes as before"
    assert sorted(lowered) == sorted(plain) and len(lowered) >= 5
    for name, proto in lowered.items():
        assert [n.op_type for n in proto.graph.node] == [n.op_type for n in plain[name].graph.node], name

    session = GraphSession(tmp_path / "lowered", intra_op_threads=1)
    reference = GraphSession(tmp_path / "plain", intra_op_threads=1)
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    cot = np.eye(4, dtype=np.float32)[[0, 2, 3]]
    got, want = session.run(x, cot), reference.run(x, cot)
    for a, b in zip([got.logits, *got.activations, *got.gradients], [want.logits, *want.activations, *want.gradients]):
        np.testing.assert_array_equal(a, b)
    for extra in ("fullgrad", "guided", "shapley"):
        for key, value in session.run_extra(extra, x, cot).items():
            np.testing.assert_array_equal(value, reference.run_extra(extra, x, cot)[key], err_msg=f"{extra} {key}")


def test_export_rewrites_with_single_output_rules_only(tmp_path, monkeypatch) -> None:
    """The exporter's optimizer runs without onnxscript's multi-output-node rules (their
    matcher scans the whole graph per candidate: 45 s of inception_v3's FullGrad export), on
    every graph an export writes, and the rule list is restored afterwards."""
    from onnxscript import rewriter

    before = rewriter._DEFAULT_REWRITE_RULES
    multi = [r for r in before if not onnx_export._single_output(r)]
    assert multi, "onnxscript has no multi-output rule any more: single_output_rewrites can go"
    seen: list[tuple] = []
    real = rewriter.RewritePass
    monkeypatch.setattr(rewriter, "RewritePass", lambda rules, *a, **k: seen.append(tuple(rules)) or real(rules, *a, **k))
    graphs = _export(tmp_path, "x")
    exported = [name for name, proto in graphs.items() if proto.producer_name == "pytorch"]  # forward.onnx is cut
    assert len(seen) >= len(exported) >= 5, (len(seen), sorted(exported))
    assert not any(rule in rules for rules in seen for rule in multi)
    assert all(len(rules) == len(before) - len(multi) for rules in seen)
    assert rewriter._DEFAULT_REWRITE_RULES is before
    with onnx_export.single_output_rewrites():
        assert rewriter._DEFAULT_REWRITE_RULES == tuple(r for r in before if r not in multi)
    assert rewriter._DEFAULT_REWRITE_RULES is before
