"""Batch norms folded into their convolutions, for the graphs that run a full backward.

An eval ``BatchNorm2d`` is a per-channel affine map, so the ``Conv2d`` that feeds it alone can
absorb it: ``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``.
ONNX Runtime folds it too, but only into the forward: FullGrad's and Guided Backprop's graphs
also run the convolution's input gradient (a transposed convolution with the same weight) and
the batch norm's backward (a ``Mul`` over every gradient map), so ONNX Runtime keeps the
unfolded weight beside its folded copy and runs one more elementwise pass per layer
(resnet50: 53 ``Mul`` and ~100 MB of duplicate weights). Folded before tracing, the forward
and the backward share one weight and the backward has no batch-norm pass.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batch_norms(model: nn.Module, *, keep_biased: bool = False) -> tuple[nn.Module, int]:
    """A copy of ``model`` with every eval ``BatchNorm2d`` (tracking running statistics) folded
    into the ``Conv2d`` whose output only it reads, and how many were folded.

    ``keep_biased``: leave a convolution that has a bias of its own unfolded (FullGrad counts
    the convolution's bias and the batch norm's as two terms). A model that ``torch.fx``
    cannot trace, or with no such pair, is returned as it is with 0.
    """
    try:
        gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception:  # data-dependent control flow: the unfolded model is still exact
        return model, 0
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or not bn.track_running_stats or len(node.args) != 1:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if type(conv) is not nn.Conv2d or len(src.users) != 1 or (keep_biased and conv.bias is not None):
            continue
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == src.target) != 1:
            continue  # a convolution called twice keeps its own weight
        _replace(gm, src.target, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    if not folded:
        return model, 0
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, folded


def _replace(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, module)


def folded_copy_matches(original: nn.Module, folded: nn.Module, size: tuple[int, int], tol: float = 1e-4) -> bool:
    """Whether the folded copy computes the original's output (relative to its scale) on a
    random image: a guard against a traced copy that dropped something."""
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = original(x), folded(x)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    return bool(((a - b).abs().max() <= tol * (a.abs().max() + 1e-12)).item())
