"""Trace forward + ``torch.autograd.grad`` of a model into one ATen-level FX graph.

``torch.onnx.export`` cannot export a module that calls ``autograd.grad`` (torch.export
rejects it), so we trace the joint computation with ``make_fx`` first and export that
graph. The traced function is::

    joint(image [N,3,H,W], cotangent [N,K], target_rank [N] int64)
        -> logits [N,K], activations_0, gradients_0, activations_1, ...

where the cotangent row actually used is ``cotangent[n]`` if ``target_rank[n] < 0``
else the one-hot vector of the ``target_rank[n]``-th highest logit of row n (in an
embedding model's graph, ``target_rank[n] == -2`` reads ``cotangent[n]`` as a concept ``f``
and uses the gradient of ``cos(logits[n], f)``: one run explains a similarity), and
``gradients_i = d(sum(cot * logits)) / d(activations_i)``. Parameters are frozen
(``requires_grad_(False)``), so no parameter gradient is traced; each target layer's
output is made an autograd leaf by a forward hook, so only the backward between the
logits and the target layers is traced.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from camserve.errors import ExportError
from camserve.export.decompositions import traced_decomposition_table
from camserve.export.lowering import out_of_place


#: ``target_rank`` of a row whose cotangent is a concept (embedding graphs only).
COSINE_RANK = -2


def select_cotangent(logits: torch.Tensor, cotangent: torch.Tensor, target_rank: torch.Tensor,
                     cosine: bool = False) -> torch.Tensor:
    """Rows with ``target_rank >= 0`` become one-hot at that rank of the logits; with
    ``cosine``, rows with :data:`COSINE_RANK` become ``d cos(e, f) / d e`` for ``e`` the row's
    output and ``f`` its cotangent: ``f / (|e| |f|) - cos * e / |e|^2``."""
    order = torch.argsort(logits.detach(), dim=1, descending=True)
    index = torch.gather(order, 1, target_rank.clamp(min=0).unsqueeze(1))
    one_hot = torch.zeros_like(cotangent).scatter(1, index, 1.0)
    out = torch.where((target_rank >= 0).unsqueeze(1), one_hot, cotangent)
    if cosine:
        e, f = logits.detach(), cotangent
        ne, nf = e.norm(dim=1, keepdim=True), f.norm(dim=1, keepdim=True)
        cos = (e * f).sum(dim=1, keepdim=True) / (ne * nf + 1e-12)
        grad = f / (ne * nf + 1e-12) - cos * e / (ne * ne + 1e-12)
        out = torch.where((target_rank == COSINE_RANK).unsqueeze(1), grad, out)
    return out


@contextlib.contextmanager
def leaf_hooks(layers: Sequence[nn.Module], store: list[torch.Tensor]) -> Iterator[None]:
    """Make each layer's output an autograd leaf (recorded in ``store``) while active.

    The module returns a differentiable copy of the leaf, so an in-place op right after
    the layer (densenet's ``relu(inplace=True)``) does not touch the leaf itself.
    """

    def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise ExportError(f"target layer {type(module).__name__} returns {type(output).__name__}, not a tensor: pick a layer with one tensor output")
        leaf = output.detach().requires_grad_(True)
        store.append(leaf)
        return leaf * 1.0

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _contiguous_pool_input(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    # ATen's adaptive_avg_pool2d re-strides channels-last inputs with as_strided_, which
    # traces to prims.as_strided_scatter (no ONNX translation); a contiguous input avoids it.
    return tuple(t.contiguous() if isinstance(t, torch.Tensor) else t for t in inputs)


@contextlib.contextmanager
def pool_fix(model: nn.Module) -> Iterator[None]:
    handles = [
        m.register_forward_pre_hook(_contiguous_pool_input)
        for m in model.modules()
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def matrix_upsampling() -> Iterator[None]:
    """Bilinear ``F.interpolate`` as two matmuls with constant matrices while tracing.

    PyTorch decomposes bilinear upsampling into gathers above autograd, so its backward
    traces to scatter-adds (ONNX ``ScatterND``, ``reduction=add``), which ONNX Runtime's CPU
    kernel does not sum deterministically over repeated indices (seen: 0.3-2% gradient
    errors on deeplabv3 / lraspp at batch 3). ``A_h x A_w^T`` is the same map, and its
    backward is two matmuls as well.
    """
    import torch.nn.functional as F

    from camserve.export.decompositions import bilinear_matrix

    original = F.interpolate

    def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                    recompute_scale_factor=None, antialias=False):
        if mode != "bilinear" or input.dim() != 4 or antialias or recompute_scale_factor:
            return original(input, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)
        in_h, in_w = int(input.shape[-2]), int(input.shape[-1])
        if size is not None:
            out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
            sh = sw = None
        else:
            sh, sw = (scale_factor, scale_factor) if isinstance(scale_factor, (int, float)) else scale_factor
            out_h, out_w = int(math.floor(in_h * sh)), int(math.floor(in_w * sw))
        ah = torch.tensor(bilinear_matrix(in_h, out_h, bool(align_corners), sh), dtype=input.dtype)
        aw = torch.tensor(bilinear_matrix(in_w, out_w, bool(align_corners), sw), dtype=input.dtype)
        return torch.matmul(torch.matmul(ah, input), aw.t())

    F.interpolate = interpolate
    try:
        yield
    finally:
        F.interpolate = original


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters without requires_grad while tracing (no parameter gradient is traced);
    the caller's flags are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _segmentation_terms(logits: torch.Tensor, cotangent: torch.Tensor, target_rank: torch.Tensor,
                        region: torch.Tensor, predicted: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The parts of a segmentation cotangent: class weights ``[N, K]``, the one-hot predicted
    mask ``[N, K, H, W]`` (no pixel on client-mask rows) and the client region ``[N, 1, H, W]``
    (0 on predicted-mask rows)."""
    k = logits.shape[1]
    if predicted is None:
        predicted = logits.detach().argmax(dim=1, keepdim=True)
    client = region[:, :, :1, :1] >= 0  # [N, 1, 1, 1]
    predicted = predicted + client.to(predicted.dtype) * k  # client rows: no class matches
    mask = (predicted == torch.arange(k, device=logits.device).view(1, k, 1, 1)).to(logits.dtype)
    weights = select_cotangent(mask.sum(dim=(2, 3)), cotangent, target_rank)
    return weights, mask, region.clamp(min=0.0)


def segmentation_cotangent(logits: torch.Tensor, cotangent: torch.Tensor, target_rank: torch.Tensor,
                           region: torch.Tensor, predicted: torch.Tensor | None = None) -> torch.Tensor:
    """A segmentation model's spatial cotangent ``[N, K, H, W]`` from ``[N, K]`` class weights.

    pytorch-grad-cam's ``SemanticSegmentationTarget``: the target of class ``k`` is ``sum
    over a mask of out[k]``, so the cotangent is the row's weight of ``k`` on the mask. The
    mask is the pixels predicted as ``k`` where the row's ``region [1, H, W]`` is negative
    (the common case: -1 everywhere), else ``region`` itself (a client's mask or box, the
    same for every class). Ranked rows pick the class of that rank by predicted area (rank
    0 = the class covering most pixels); client-mask rows have no predicted pixels, so they
    name their classes. ``predicted`` ``[N, 1, H, W]`` replaces the argmax (the parity check
    gives PyTorch ONNX Runtime's argmax where float rounding breaks a tie differently).
    """
    weights, mask, client = _segmentation_terms(logits, cotangent, target_rank, region, predicted)
    # (a broadcast Where is 5x slower than Mul in ONNX Runtime)
    return weights[:, :, None, None] * (mask + client)


def low_resolution_cotangent(logits: torch.Tensor, low: torch.Tensor, cotangent: torch.Tensor, target_rank: torch.Tensor,
                             region: torch.Tensor, predicted: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient at ``low [N, K, h, w]`` where ``logits`` is its bilinear upsampling (no
    align_corners): :func:`segmentation_cotangent` taken back through the upsampling.

    The upsampling ``U`` is linear and acts per channel, so ``U^T (w (M + R)) = w (U^T M +
    U^T R)``: the weights and the client region join at low resolution, and the full
    resolution sees only the mask and one transposed upsampling of it (``A_h^T M A_w``), not
    the weighted ``[N, K, H, W]`` sum and product (2 of the 5 full-resolution passes).
    """
    from camserve.export.decompositions import bilinear_matrix

    weights, mask, client = _segmentation_terms(logits, cotangent, target_rank, region, predicted)
    (h, w), (out_h, out_w) = low.shape[2:], logits.shape[2:]
    ah = torch.tensor(bilinear_matrix(int(h), int(out_h), False, None), dtype=logits.dtype)
    aw = torch.tensor(bilinear_matrix(int(w), int(out_w), False, None), dtype=logits.dtype)

    def back(x: torch.Tensor) -> torch.Tensor:  # the full-resolution side first: one large GEMM
        return torch.matmul(ah.t(), torch.matmul(x, aw))

    return weights[:, :, None, None] * (back(mask) + back(client))


def upsampled_head(model: nn.Module, layers: Sequence[nn.Module], size: tuple[int, int]) -> nn.Module | None:
    """The module whose output a segmentation model only upsamples (bilinear, no
    align_corners) into its logits, as torchvision's FCN / DeepLabV3 / LRASPP do with their
    ``classifier``; None where that is not so (checked on one eager forward: the upsampled
    output must equal the logits exactly) or where the head is a target layer itself."""
    import torch.nn.functional as F

    inner = getattr(model, "model", model)
    head = getattr(inner, "classifier", None)
    if not isinstance(head, nn.Module) or any(head is layer for layer in layers):
        return None
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            logits = model(torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)))
    finally:
        handle.remove()
    if len(seen) != 1 or not isinstance(seen[0], torch.Tensor) or not isinstance(logits, torch.Tensor):
        return None
    low = seen[0]
    if low.ndim != 4 or low.shape[:2] != logits.shape[:2]:
        return None
    up = F.interpolate(low, size=tuple(logits.shape[2:]), mode="bilinear", align_corners=False)
    return head if torch.equal(up, logits) else None


def joint_function(model: nn.Module, layers: Sequence[nn.Module], cosine: bool = False, segmentation: bool = False,
                   predicted: torch.Tensor | None = None, head: nn.Module | None = None):
    """The function that is traced: forward, cotangent selection (``cosine``: with the
    similarity mode of embedding models; ``segmentation``: spatial, over the predicted
    masks, or ``predicted`` ones: see :func:`segmentation_cotangent`), input-free backward.
    ``head`` (segmentation, from :func:`upsampled_head`): the backward starts at that module's
    low-resolution output (:func:`low_resolution_cotangent`), the same gradients."""

    def joint_with(image: torch.Tensor, cotangent: torch.Tensor, target_rank: torch.Tensor, region: torch.Tensor | None):
        store: list[torch.Tensor] = []
        low: list[torch.Tensor] = []
        with torch.enable_grad():
            hook = head.register_forward_hook(lambda _m, _i, out: low.append(out)) if head is not None else None
            try:
                with leaf_hooks(layers, store):
                    logits = model(image)
            finally:
                if hook is not None:
                    hook.remove()
            if not isinstance(logits, torch.Tensor) or logits.ndim != (4 if segmentation else 2):
                want = "[N, K, H, W]" if segmentation else "[N, K]"
                raise TypeError(f"model must return logits {want}, got {getattr(logits, 'shape', type(logits))}")
            if len(store) != len(layers):
                raise RuntimeError(f"expected each target layer to run once, saw {len(store)} outputs for {len(layers)} layers")
            logits_at = logits  # where the backward starts
            if segmentation:
                if region is None:
                    region = torch.full((image.shape[0], 1, *logits.shape[2:]), -1.0, dtype=logits.dtype)
                if head is not None and len(low) == 1:
                    cot = low_resolution_cotangent(logits, low[0], cotangent, target_rank, region, predicted)
                    logits_at = low[0]
                else:
                    cot = segmentation_cotangent(logits, cotangent, target_rank, region, predicted)
            else:
                cot = select_cotangent(logits, cotangent, target_rank, cosine)
            # the cotangent is the logits' gradient as given (not the gradient of
            # (logits * cot).sum(): that traces a ones Expand and a Mul at the logits' size,
            # two passes over [N, K, H, W] for segmentation)
            grads = torch.autograd.grad(logits_at, store, grad_outputs=cot.detach(), allow_unused=True)
        outs: list[torch.Tensor] = [logits.detach()]
        for act, grad in zip(store, grads):
            outs += [act.detach(), torch.zeros_like(act) if grad is None else grad]
        return tuple(outs)

    # the traced signature is the graph's inputs: a region input for segmentation only
    if segmentation:
        def joint(image: torch.Tensor, cotangent: torch.Tensor, target_rank: torch.Tensor, region: torch.Tensor):
            return joint_with(image, cotangent, target_rank, region)
    else:
        def joint(image: torch.Tensor, cotangent: torch.Tensor, target_rank: torch.Tensor):
            return joint_with(image, cotangent, target_rank, None)
    return joint


def batch_symbolic(example: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Fake copies of ``example`` whose batch dimension alone is symbolic.

    ``make_fx(tracing_mode="symbolic")`` makes every dimension symbolic; for Swin that
    costs minutes of symbolic reasoning over window sizes. Fixing H, W and the channels
    (they are fixed by the export anyway) and leaving only N symbolic traces in seconds.
    """
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)

    def fake(t: torch.Tensor) -> torch.Tensor:
        dims = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (t.dim() - 1)
        return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))

    return [fake(t) for t in example]


def trace_joint(model: nn.Module, layers: Sequence[nn.Module], example: tuple[torch.Tensor, ...],
                fn=None, class_token: bool = False) -> torch.fx.GraphModule:
    """Trace ``joint`` (or ``fn``, an extra graph's function) with a symbolic batch into an
    ATen graph ready for ONNX export; ``class_token``: a torchvision ViT's last block takes
    the class-token backward (:mod:`camserve.export.token_path`) where it applies."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from camserve.export.token_path import class_token_backward

    model.eval()
    fn = fn or joint_function(model, layers)
    token_path = class_token_backward(model, layers) if class_token else contextlib.nullcontext()
    with sdpa_kernel(SDPBackend.MATH), pool_fix(model), frozen(model), matrix_upsampling(), token_path:
        gm = make_fx(fn, decomposition_table=traced_decomposition_table(), tracing_mode="symbolic", _allow_non_fake_inputs=True)(
            *batch_symbolic(example)
        )
    gm.graph.eliminate_dead_code()
    out_of_place(gm)  # what torch.onnx.export's own decomposition pass would change (see lowering)
    return gm
