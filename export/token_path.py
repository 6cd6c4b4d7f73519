"""A class-token backward for vision transformers whose head reads token 0 only.

torchvision's ``VisionTransformer`` classifies from ``encoder(x)[:, 0]``: of the last
encoder block's outputs only the class token's reaches the logits. Generic autograd still
runs that block's backward over every token (``select_backward`` makes a dense gradient
that is zero but for token 0), so the MLP's and the attention projections' backward cost
what their forward costs: about 8% of vit_b_16's forward, the explain graph's whole excess.

While the joint function is traced, :func:`class_token_backward` replaces the last block's
``forward`` by one with the same values and a cheaper gradient:

- every token's output is computed as the block computes it, then *detached* (the forward
  costs what it costs);
- the class token's output is computed once more, differentiably, from the block's input
  ``u`` and ``h = ln_1(u)`` over all ``T`` tokens, with the attention of the one query
  rearranged so that its backward is ``O(T * heads * E)``, not ``O(T * E^2)``. Per head
  ``i`` (``W_q, W_k, W_v`` the packed projection's rows of that head, ``d`` its width)::

      q   = (W_q h_0 + b_q) / sqrt(d)
      s_j = h_j . (W_k^T q) + q . b_k          (the query's score of token j)
      p   = softmax(s)
      a   = W_v (sum_j p_j h_j) + b_v          (sum_j p_j = 1)
      z_0 = y_0 + mlp(ln_2(y_0)),   y_0 = u_0 + out_proj(a)

  so the gradient to ``h`` is ``p``- and ``s``-weighted sums of two ``[heads, E]`` vectors.
- the block returns ``cat([z_0, z[:, 1:].detach()])``: the same values, and a gradient that
  enters through the class token alone.

The export's parity check compares the graph with the *unpatched* model's autograd, so this
rewrite is checked on every export that takes it. It applies only where it is exact: the
model's ``forward`` is torchvision's, the block's attention is a plain packed
``nn.MultiheadAttention`` (no extra key/value biases, batch-first), and no target layer is
inside the last block other than its ``ln_1`` (a target layer after ``ln_1`` would see its
hook run twice, or not on the gradient's path).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def last_token_block(model: nn.Module, layers: Sequence[nn.Module]) -> nn.Module | None:
    """The encoder block to rewrite, or None where the rewrite does not apply."""
    try:
        from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer
    except ImportError:  # pragma: no cover - torchvision is an export dependency
        return None
    if not isinstance(model, VisionTransformer) or type(model).forward is not VisionTransformer.forward:
        return None
    blocks = list(model.encoder.layers)
    if not blocks or type(blocks[-1]) is not EncoderBlock:
        return None
    block = blocks[-1]
    mha = block.self_attention
    if (not isinstance(mha, nn.MultiheadAttention) or not mha.batch_first or not mha._qkv_same_embed_dim
            or mha.in_proj_bias is None or mha.bias_k is not None or mha.add_zero_attn):
        return None
    inside = {id(m) for m in block.modules()} - {id(block.ln_1)}
    if any(id(layer) in inside for layer in layers):
        return None
    return block


def _class_token_forward(block: nn.Module, u: torch.Tensor) -> torch.Tensor:
    h = block.ln_1(u)  # a target layer's hook makes this the autograd leaf
    hd = h.detach()
    x, _ = block.self_attention(hd, hd, hd, need_weights=False)
    x = block.dropout(x) + u.detach()
    z = x + block.mlp(block.ln_2(x))  # every token's value, as the block computes it

    mha = block.self_attention
    n, t, e = h.shape
    heads = mha.num_heads
    d = e // heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    wq, wk, wv = (w[i * e:(i + 1) * e].reshape(heads, d, e) for i in range(3))
    bq, bk, bv = (b[i * e:(i + 1) * e].reshape(heads, d) for i in range(3))
    q = (torch.einsum("ne,hde->nhd", h[:, 0], wq) + bq) * d ** -0.5  # [N, heads, d]
    key = torch.einsum("nhd,hde->nhe", q, wk)  # W_k^T q per head: [N, heads, E]
    scores = torch.einsum("nte,nhe->nht", h, key) + (q * bk).sum(-1, keepdim=True)
    mixed = torch.einsum("nht,nte->nhe", torch.softmax(scores, dim=-1), h)  # [N, heads, E]
    a = (torch.einsum("nhe,hde->nhd", mixed, wv) + bv).reshape(n, 1, e)
    y0 = block.dropout(mha.out_proj(a)) + u[:, :1]
    z0 = y0 + block.mlp(block.ln_2(y0))
    return torch.cat([z0, z[:, 1:].detach()], dim=1)


@contextlib.contextmanager
def class_token_backward(model: nn.Module, layers: Sequence[nn.Module]) -> Iterator[bool]:
    """While active, the last encoder block of a torchvision ViT takes the class-token
    backward (see the module docstring); yields whether it applies to ``model``."""
    block = last_token_block(model, layers)
    if block is None:
        yield False
        return
    block.forward = types.MethodType(_class_token_forward, block)
    try:
        yield True
    finally:
        del block.forward
