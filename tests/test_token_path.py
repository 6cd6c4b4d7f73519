"""The class-token backward of torchvision ViTs (camserve.export.token_path): same values and
gradients as the model's own autograd, a backward that no longer runs the last block's MLP over
every token, and no rewrite where it would not be exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from camserve.export import export_model, trace
from camserve.export.token_path import class_token_backward, last_token_block

MLP_DIM = 40


def tiny_vit(num_classes: int = 7) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=24,
                              mlp_dim=MLP_DIM, num_classes=num_classes).eval()
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision starts the head at zero
    return model


def joint_outputs(model, layers, patched: bool):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cot = torch.zeros(3, 7)
    cot[2, 4] = 1.0
    rank = torch.tensor([0, 2, -1])
    fn = trace.joint_function(model, layers)
    if not patched:
        return fn(x, cot, rank)
    with class_token_backward(model, layers) as applied:
        assert applied
        return fn(x, cot, rank)


@pytest.mark.parametrize("layer", ["encoder.layers.-1.ln_1", "encoder.layers.0", "encoder.layers.1.mlp"])
def test_same_values_and_gradients_as_autograd(layer):
    model = tiny_vit()
    from camserve.export.resolve import resolve_layer

    layers = [resolve_layer(model, layer)[1]]
    ref, ours = joint_outputs(model, layers, False), joint_outputs(model, layers, True)
    assert len(ref) == len(ours) == 3
    for a, b in zip(ref, ours):
        assert a.shape == b.shape
        scale = float(a.abs().max())
        assert scale > 0, "a zero output would make this comparison vacuous"
        assert float((a - b).abs().max()) <= 1e-5 * max(scale, 1.0)


def _token_products(gm: torch.fx.GraphModule, tokens: int) -> dict[int, int]:
    """Matrix products over every token of the batch (``N * tokens`` rows), counted by columns."""
    counts: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            continue
        rows, cols = node.meta["val"].shape
        expr = rows.node.expr if isinstance(rows, torch.SymInt) else None
        if expr is not None and len(expr.free_symbols) == 1 and expr / next(iter(expr.free_symbols)) == tokens:
            counts[int(cols)] = counts.get(int(cols), 0) + 1
    return counts


def test_backward_skips_the_last_block_over_all_tokens():
    """Generic autograd adds three products over all tokens (fc2's and fc1's input gradients
    and out_proj's); the class-token path adds none: the forward's nine are all there is."""
    model = tiny_vit()
    layers = [model.encoder.layers[-1].ln_1]
    example = (torch.randn(2, 3, 32, 32), torch.zeros(2, 7), torch.zeros(2, dtype=torch.int64))
    blocks = len(model.encoder.layers)
    forward = {24: 2 * blocks, MLP_DIM: blocks}  # out_proj and fc2 -> 24 columns, fc1 -> MLP_DIM
    keep = lambda counts: {cols: k for cols, k in counts.items() if cols in forward}  # noqa: E731  (in_proj: 72 columns, a bmm or a mm)
    plain = keep(_token_products(trace.trace_joint(model, layers, example), 17))
    token = keep(_token_products(trace.trace_joint(model, layers, example, class_token=True), 17))
    assert plain == {24: forward[24] + 2, MLP_DIM: forward[MLP_DIM] + 1}, plain
    assert token == forward, token


def test_not_applied_where_it_would_not_be_exact():
    model = tiny_vit()
    last = model.encoder.layers[-1]
    assert last_token_block(model, [last.ln_1]) is last
    assert last_token_block(model, [model.encoder.layers[0]]) is last
    for inside in (last, last.mlp, last.ln_2, last.self_attention):
        assert last_token_block(model, [inside]) is None, inside
    assert last_token_block(nn.Sequential(model), [last.ln_1]) is None  # not torchvision's forward


def test_export_with_class_token_path_keeps_parity(tmp_path):
    """The export's own parity check compares the rewritten graph with the unpatched model."""
    model = tiny_vit()
    lines: list[str] = []
    manifest = export_model(model, ["encoder.layers.-1.ln_1"], tmp_path, input_size=32, model_name="tiny_vit",
                            check=True, log=lines.append)
    assert any("parity" in line for line in lines), lines
    from camserve.pipeline.runtime import GraphSession

    session = GraphSession(tmp_path)
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    out = session.run(images, target_rank=np.zeros(2, np.int64))
    assert out.gradients[0].shape == (2, 17, 24) and np.abs(out.gradients[0]).max() > 0
    assert manifest is not None
