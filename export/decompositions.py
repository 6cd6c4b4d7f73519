"""Decompositions of backward ops that have no ONNX translation.

Only input gradients are ever needed (parameters are frozen), so each decomposition
computes the input gradient with forward ops that ONNX has:

- ``convolution_backward``: the input gradient of a convolution is a transposed
  convolution of the output gradient with the same weight; ``output_padding`` restores
  the input size that strided convolutions lose. For a stride-1 convolution it is also a
  plain convolution with the weight transposed (per group) and flipped in space, padded
  ``dilation * (k - 1) - padding``. That form is taken for *dilated* convolutions, where ONNX
  Runtime's CPU ConvTranspose is 4-7x slower than its Conv (deeplabv3's ASPP backward: 42 ms
  against 6-11 ms per dilated 3x3 at batch 8). Not for the others: ONNX Runtime folds the
  flipped weight into a second copy of it, and over a whole network (FullGrad's and Guided
  Backprop's graphs on resnet50) that raised the load-time RSS from 1.28x / 1.20x the explain
  graph's to 1.84x / 2.04x for 9% less time.
- ``_safe_softmax`` (see ``_plain_softmax``).
- ``_adaptive_avg_pool2d_backward``: each output gradient spread evenly over its pooling
  window, written as two small constant matrices ``P_h^T @ g @ P_w``.
- ``upsample_bilinear2d_backward`` (segmentation heads): bilinear upsampling is ``A_h x A_w^T``
  with constant interpolation matrices, so its input gradient is ``A_h^T g A_w``. The stock
  decomposition scatter-adds into the input (ONNX ``ScatterND`` with ``reduction=add``),
  which ONNX Runtime's CPU kernel does not sum deterministically over duplicate indices:
  seen as 0.3-0.9% errors on deeplabv3 at batch 3, different at each optimization level.
- ``avg_pool2d_backward`` (inception_v3's branches; only a backward to the input, as for
  FullGrad and Guided Backprop, meets it): the gradient divided by each window's divisor,
  spread by a depthwise transposed convolution with a ones kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch._decomp import core_aten_decompositions
from torch._decomp import decomposition_table as _torch_decompositions

aten = torch.ops.aten


def _conv_input_grad(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, output_mask):
    if output_mask[1] or output_mask[2]:
        raise NotImplementedError("convolution_backward: only the input gradient is supported (parameters are frozen)")
    if transposed:
        # The input gradient of a transposed convolution is a plain convolution.
        grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, False, [0] * len(stride), groups)
    elif (any(d > 1 for d in dilation) and all(st == 1 for st in stride)
          and all(d * (int(k) - 1) >= p for d, k, p in zip(dilation, weight.shape[2:], padding))):
        grad_input = aten.convolution(grad_output, _flipped_transpose(weight, groups), None, stride,
                                      [d * (int(k) - 1) - p for d, k, p in zip(dilation, weight.shape[2:], padding)],
                                      dilation, False, [0] * len(stride), groups)
    else:
        spatial = input.shape[2:]
        out_spatial = grad_output.shape[2:]
        kernel = weight.shape[2:]
        out_pad = [
            int(spatial[i]) - ((int(out_spatial[i]) - 1) * stride[i] - 2 * padding[i] + dilation[i] * (int(kernel[i]) - 1) + 1)
            for i in range(len(spatial))
        ]
        grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, out_pad, groups)
    return grad_input if output_mask[0] else None, None, None


def _flipped_transpose(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``[C_out, C_in/g, *k]`` -> ``[C_in, C_out/g, *k]`` flipped in space: the weight of the
    plain convolution that is a stride-1 convolution's input gradient."""
    c_out, c_in_g = int(weight.shape[0]), int(weight.shape[1])
    k = list(weight.shape[2:])
    w = weight.reshape(groups, c_out // groups, c_in_g, *k).transpose(1, 2).reshape(c_in_g * groups, c_out // groups, *k)
    return w.flip(list(range(2, 2 + len(k))))


def _pool_matrix(in_size: int, out_size: int) -> list[list[float]]:
    """P[o][i] = 1/len(window o) for i in adaptive window o (PyTorch's window rule).

    Built as Python lists so that the traced graph gets one constant, not fill ops.
    """
    rows = []
    for o in range(out_size):
        start, end = (o * in_size) // out_size, math.ceil((o + 1) * in_size / out_size)
        rows.append([1.0 / (end - start) if start <= i < end else 0.0 for i in range(in_size)])
    return rows


def _adaptive_avg_pool2d_input_grad(grad_output, self):
    in_h, in_w = int(self.shape[-2]), int(self.shape[-1])
    out_h, out_w = int(grad_output.shape[-2]), int(grad_output.shape[-1])
    if (in_h, in_w) == (out_h, out_w):
        return grad_output.clone()
    if out_h == 1 and out_w == 1:
        return (grad_output / float(in_h * in_w)).expand(self.shape).clone()
    ph = torch.tensor(_pool_matrix(in_h, out_h), dtype=grad_output.dtype)
    pw = torch.tensor(_pool_matrix(in_w, out_w), dtype=grad_output.dtype)
    return torch.matmul(torch.matmul(ph.t(), grad_output), pw)


def bilinear_matrix(in_size: int, out_size: int, align_corners: bool, scale: float | None) -> list[list[float]]:
    """A[o][i]: weight of input ``i`` in output ``o`` of PyTorch's bilinear upsampling (its
    ``area_pixel_compute_source_index`` rule), as Python lists (one constant in the graph)."""
    if align_corners:
        ratio = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    else:
        ratio = 1.0 / scale if scale is not None and scale > 0 else in_size / out_size
    rows = []
    for o in range(out_size):
        src = o * ratio if align_corners else max(ratio * (o + 0.5) - 0.5, 0.0)
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        lam = src - i0
        row = [0.0] * in_size
        row[i0] += 1.0 - lam
        row[i1] += lam
        rows.append(row)
    return rows


def _upsample_bilinear2d_input_grad(grad_output, output_size, input_size, align_corners, scales_h=None, scales_w=None):
    in_h, in_w = int(input_size[2]), int(input_size[3])
    out_h, out_w = int(output_size[0]), int(output_size[1])
    ah = torch.tensor(bilinear_matrix(in_h, out_h, align_corners, scales_h), dtype=grad_output.dtype)
    aw = torch.tensor(bilinear_matrix(in_w, out_w, align_corners, scales_w), dtype=grad_output.dtype)
    return torch.matmul(torch.matmul(ah.t(), grad_output), aw)


def _avg_pool2d_input_grad(grad_output, self, kernel_size, stride, padding, ceil_mode, count_include_pad,
                           divisor_override=None):
    kh, kw = kernel_size if len(kernel_size) == 2 else (kernel_size[0], kernel_size[0])
    sh, sw = (stride if len(stride) == 2 else (stride[0], stride[0])) if stride else (kh, kw)
    ph, pw = padding if len(padding) == 2 else (padding[0], padding[0])
    channels = int(self.shape[1])
    if ceil_mode:
        raise NotImplementedError("avg_pool2d_backward with ceil_mode=True has no ONNX decomposition here")
    if divisor_override:
        grad = grad_output / float(divisor_override)
    elif count_include_pad:
        grad = grad_output / float(kh * kw)
    else:  # the padding not counted: count each window's cells
        ones = torch.ones((1, 1, int(self.shape[2]), int(self.shape[3])), dtype=grad_output.dtype)
        counts = aten.avg_pool2d(ones, [kh, kw], [sh, sw], [ph, pw], False, True) * float(kh * kw)
        grad = grad_output / counts
    weight = torch.ones((channels, 1, kh, kw), dtype=grad_output.dtype)
    out_pad = [int(self.shape[2]) - ((int(grad_output.shape[2]) - 1) * sh - 2 * ph + kh),
               int(self.shape[3]) - ((int(grad_output.shape[3]) - 1) * sw - 2 * pw + kw)]
    return aten.convolution(grad, weight, None, [sh, sw], [ph, pw], [1, 1], True, out_pad, channels)


def _plain_softmax(x, dim, dtype=None):
    # The math attention backend calls _safe_softmax, which zeroes rows that are all -inf
    # (fully masked). Image classifiers mask no whole row, and the where/equal/reduce ops
    # that the guard exports cost ~8% of a ViT's run, so a plain softmax is traced.
    if dtype is not None:
        x = x.to(dtype)
    return aten._softmax(x, dim, False)


def decomposition_table() -> dict[torch._ops.OpOverload, Callable]:
    table = dict(core_aten_decompositions())
    table[aten._safe_softmax.default] = _plain_softmax
    table[aten.convolution_backward.default] = _conv_input_grad
    table[aten._adaptive_avg_pool2d_backward.default] = _adaptive_avg_pool2d_input_grad
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_input_grad
    table[aten.upsample_bilinear2d_backward.default] = _upsample_bilinear2d_input_grad
    return table


def traced_decomposition_table() -> dict[torch._ops.OpOverload, Callable]:
    """:func:`decomposition_table` plus the ops the traces meet that ONNX cannot translate and
    the exporter would decompose in its own second pass (which :mod:`camserve.export.lowering`
    then skips): ``max_pool2d_with_indices_backward`` (Guided Backprop, FullGrad), with
    PyTorch's own decomposition, as the exporter does, and ``squeeze.dims`` (ShapleyCAM's
    double backward), as a reshape (PyTorch's gives ``prims.squeeze``,
    which the exporter's pass cannot functionalize where a graph still takes it)."""
    table = decomposition_table()
    table[aten.max_pool2d_with_indices_backward.default] = _torch_decompositions[aten.max_pool2d_with_indices_backward.default]
    table[aten.squeeze.dims] = _squeeze_dims
    return table


def _squeeze_dims(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    axes = {d % max(x.dim(), 1) for d in dims}
    return x.reshape([size for axis, size in enumerate(x.shape) if not (axis in axes and size == 1)])
