"""A class-token backward for vision transformers whose head reads token 0 only.

torchvision's ``VisionTransformer`` classifies from ``encoder(x)[:, 0]``: of the last
encoder block's outputs only the class token's reaches the logits. Generic autograd still
runs that block's backward over every token (``select_backward`` makes a dense gradient
that is zero but for token 0), so the MLP's and the attention projections' backward cost
what their forward costs: about 8% of vit_b_16's forward, the explain graph's whole excess.

While the joint function is traced, :func:`class_token_backward` replaces the last block's
``forward`` by one with the same values and a gradient for token 0 alone
(:class:`_ClassTokenBlock`, an autograd function):

- the forward is the block's own computation, every weight used once as the model uses it
  (so the graph's forward costs what the model's does, and holds no second consumer of a
  weight that would make ONNX Runtime pre-pack another copy of it);
- the backward is written out for the class token ``z_0 = y_0 + mlp(ln_2(y_0))``,
  ``y_0 = u_0 + out_proj(a_0)``, where ``a_0`` is the attention of the one query ``q_0``
  (scaled by ``1/sqrt(d)``) over every token's keys and values. Per head ``i`` (``W_k, W_v``
  that head's rows of the packed projection, ``p = softmax_j(q_0 . k_j)``)::

      dL/dh_j = g_s[j] W_k^T q_0 + p[j] W_v^T g_a     (through keys and values)
      dL/dh_0 += W_q^T g_q / sqrt(d)                   (through the query)

  with ``g_a`` the gradient at ``a_0``, ``g_s = p * (g_p - p . g_p)`` and ``g_p[j] = g_a . v_j``:
  every ``[T, E]`` term is a rank-``heads`` product, and the three ``W^T x`` are one product
  with the packed weight. The MLP, ``ln_2`` (LayerNorm) and GELU (erf) backward act on one
  token per image.

The export's parity check compares the graph with the *unpatched* model's autograd, so this
rewrite is checked on every export that takes it. It applies only where it is exact: the
model's ``forward`` is torchvision's (its head reads token 0 alone), the block's attention is
a plain packed ``nn.MultiheadAttention`` (no extra key/value biases, batch-first), its MLP is
torchvision's ``Linear, GELU (erf), Dropout, Linear, Dropout``, and no target layer is inside
the last block other than its ``ln_1`` (the autograd function hides the block's inner modules
from the gradient).
"""

from __future__ import annotations

import contextlib
import math
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
    mlp = list(block.mlp)
    if (len(mlp) != 5 or not isinstance(mlp[0], nn.Linear) or not isinstance(mlp[3], nn.Linear)
            or not isinstance(mlp[1], nn.GELU) or mlp[1].approximate != "none"
            or not isinstance(mlp[2], nn.Dropout) or not isinstance(mlp[4], nn.Dropout)
            or not isinstance(block.ln_2, nn.LayerNorm) or block.ln_2.weight is None or block.training):
        return None
    inside = {id(m) for m in block.modules()} - {id(block.ln_1)}
    if any(id(layer) in inside for layer in layers):
        return None
    return block


class _ClassTokenBlock(torch.autograd.Function):
    """The block's values from ``h = ln_1(u)`` and ``u``, with a backward for token 0 alone.

    The forward is the block's own computation (the same weights, each used once as the model
    uses it); the backward is written out for the class token's output, so it uses each weight
    once more, in the orientation a generic backward would, and never forms an ``[N, T, E]`` by
    ``[E, E]`` product. It assumes what :func:`last_token_block` checks: the gradient of every
    other token's output is zero.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, u: torch.Tensor, block: nn.Module) -> torch.Tensor:  # type: ignore[override]
        mha = block.self_attention
        n, t, e = h.shape
        heads = mha.num_heads
        d = e // heads
        q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).split(e, dim=-1)
        q, k, v = (x.reshape(n, t, heads, d).transpose(1, 2) for x in (q, k, v))  # [N, heads, T, d]
        q = q * d ** -0.5
        p = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        a = (p @ v).transpose(1, 2).reshape(n, t, e)
        y = block.dropout(mha.out_proj(a)) + u
        fc1, fc2 = block.mlp[0], block.mlp[3]
        pre = fc1(block.ln_2(y))
        z = y + block.mlp[4](fc2(block.mlp[2](block.mlp[1](pre))))
        ctx.block = block
        ctx.save_for_backward(q[:, :, 0], k, v, p[:, :, 0], y[:, 0], pre[:, 0])
        return z

    @staticmethod
    def backward(ctx, gz: torch.Tensor):  # type: ignore[override]
        q0, k, v, p0, y0, pre0 = ctx.saved_tensors  # [N,H,d] [N,H,T,d] [N,H,T,d] [N,H,T] [N,E] [N,F]
        block = ctx.block
        mha, ln2, fc1, fc2 = block.self_attention, block.ln_2, block.mlp[0], block.mlp[3]
        n, heads, t, d = k.shape
        e = heads * d
        g0 = gz[:, 0]
        # MLP (erf GELU) and ln_2, token 0
        cdf = 0.5 * (1.0 + torch.erf(pre0 * 0.5 ** 0.5))
        pdf = torch.exp(-0.5 * pre0 * pre0) * (2.0 * math.pi) ** -0.5
        gh2 = ((g0 @ fc2.weight) * (cdf + pre0 * pdf)) @ fc1.weight
        mean = y0.mean(-1, keepdim=True)
        rstd = torch.rsqrt((y0 - mean).pow(2).mean(-1, keepdim=True) + ln2.eps)
        xhat = (y0 - mean) * rstd
        gx = gh2 * ln2.weight
        gy0 = g0 + rstd * (gx - gx.mean(-1, keepdim=True) - xhat * (gx * xhat).mean(-1, keepdim=True))
        # attention of the one query: scores s = q0 . k_j (q0 scaled), p0 = softmax(s)
        ga = (gy0 @ mha.out_proj.weight).reshape(n, heads, d)
        gp = torch.einsum("nhd,nhtd->nht", ga, v)
        gs = p0 * (gp - (p0 * gp).sum(-1, keepdim=True))
        gq = torch.einsum("nht,nhtd->nhd", gs, k) * d ** -0.5
        # W_k^T q0, W_v^T ga per head and W_q^T gq, as one product with the packed weight
        eye = torch.eye(heads, dtype=k.dtype, device=k.device)[None, :, :, None]
        diag = lambda x: (eye * x[:, None]).reshape(n, heads, e)  # noqa: E731  row h: x[h] in head h's columns
        zeros = torch.zeros(n, heads, e, dtype=k.dtype, device=k.device)
        rows = torch.cat([torch.cat([zeros, diag(q0), zeros], -1), torch.cat([zeros, zeros, diag(ga)], -1),
                          torch.cat([gq.reshape(n, 1, e), zeros[:, :1], zeros[:, :1]], -1)], 1)
        r = rows @ mha.in_proj_weight  # [N, 2 heads + 1, E]
        gh = torch.einsum("nht,nhe->nte", gs, r[:, :heads]) + torch.einsum("nht,nhe->nte", p0, r[:, heads:2 * heads])
        gh = torch.cat([gh[:, :1] + r[:, 2 * heads:], gh[:, 1:]], 1)
        gu = torch.cat([gy0[:, None], gz[:, 1:]], 1)
        return gh, gu, None


def _class_token_forward(block: nn.Module, u: torch.Tensor) -> torch.Tensor:
    return _ClassTokenBlock.apply(block.ln_1(u), u, block)  # ln_1 first: a target layer's hook makes its output the leaf


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
