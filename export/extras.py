"""Opt-in extra graphs for the methods that need more than activations and gradients.

Each extra is its own ONNX file beside ``model.onnx`` (ONNX Runtime runs a whole graph
whatever outputs are fetched, so extra outputs in the main graph would slow every other
method). Every extra graph has the main graph's inputs (``image``, ``cotangent``,
``target_rank``; the cotangent row is chosen as in :func:`camserve.export.trace.select_cotangent`)
and answers ``logits`` first:

* ``fullgrad`` (FullGrad): outputs ``fullgrad_<h>x<w>`` ``[N, h, w]``, one per distinct
  resolution. FullGrad (Srinivas & Fleuret) sums, over every ``Conv2d`` / ``BatchNorm2d`` with
  a bias (the oracle's choice, in module order; BatchNorm's folded bias
  ``beta - mean * gamma / sqrt(var + eps)``), the per-(image, channel) min-max normalized
  ``|b_c * g_c|`` with ``g`` the gradient at the layer's output, plus the normalized input
  term ``|x * dy/dx|`` per colour channel; every term is resized to the input and the sum
  min-max normalized. Resizing is linear and comes after the normalization, so the graph
  sums the normalized terms of equal resolution itself and outputs a few small maps instead
  of every gradient (53 layers, ~42 MB per 224 px image on ResNet-50).
* ``guided`` (Guided Backprop): output ``guided`` ``[N, 3, H, W]``, the input gradient with
  every ``nn.ReLU`` module's backward replaced by ``grad * [x > 0] * [grad > 0]`` (as the
  oracle: modules only, not functional ``relu``).
* ``shapley`` (ShapleyCAM, target ReST ``2 z_c - logsumexp(z)``): outputs
  ``activations_i`` and ``gradients_i = g - hvp / 2`` per target layer, with ``g = dL/dA``
  and ``hvp = (d^2 L / dA^2) A`` traced as a double backward, so ShapleyCAM's weights are
  GradCAM's weights of these gradients: ``w_c = mean_ij (g - hvp/2)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from camserve.errors import ExportError
from camserve.export.trace import leaf_hooks, select_cotangent

EXTRAS: tuple[str, ...] = ("fullgrad", "guided", "shapley")
Joint = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


def check_extras(extras: Sequence[str]) -> list[str]:
    """The extras named, checked and de-duplicated in :data:`EXTRAS` order."""
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        raise ExportError(f"unknown export extra {unknown[0]!r} (known: {', '.join(EXTRAS)})")
    return [e for e in EXTRAS if e in extras]


# ------------------------------------------------------------------ FullGrad ---


def bias_layers(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    """Every Conv2d / BatchNorm2d (exact types, as the oracle) with a bias, and its bias."""
    out = []
    for module in model.modules():
        if type(module) in (nn.Conv2d, nn.BatchNorm2d) and module.bias is not None:
            if isinstance(module, nn.BatchNorm2d):
                bias = module.bias - module.running_mean * module.weight / torch.sqrt(module.running_var + module.eps)
            else:
                bias = module.bias
            out.append((module, bias.detach().clone()))
    return out


@contextlib.contextmanager
def output_hooks(modules: Sequence[nn.Module], store: list[tuple[nn.Module, torch.Tensor]]) -> Iterator[None]:
    """Record ``(module, output)`` for every call (kept in the graph, not detached); the module
    returns a copy, so an in-place op after it (ResNet's ``ReLU(inplace=True)``) leaves the
    record as it was: its gradient is the gradient at the layer's output, as the oracle's hook
    sees it. Outputs are paired with their module, not by position: a layer that does not
    run (inception_v3's auxiliary head in eval) or runs out of registration order cannot shift
    the pairing (the oracle's zip does, pytorch-grad-cam #371)."""

    def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        store.append((module, output))
        return output.clone()

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _channel_minmax_sum(t: torch.Tensor) -> torch.Tensor:
    """``sum_c (t_c - min t_c) / (1e-7 + max(t_c - min t_c))`` over [N, C, h, w] -> [N, h, w]."""
    shifted = t - t.amin(dim=(2, 3), keepdim=True)
    return (shifted / (1e-7 + shifted.amax(dim=(2, 3), keepdim=True))).sum(dim=1)


def _bias_term(bias: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``_channel_minmax_sum(|b_c g_c|)`` for a per-channel bias ``[C]``, in fewer passes over
    ``[N, C, h, w]``: ``|b_c g_c| = |b_c| |g_c|`` and a positive factor keeps the minimum's
    place, so each channel's normalized term is ``w_c (|g_c| - m_c)`` with ``m_c, M_c`` the
    extremes of ``|g_c|`` and ``w_c = |b_c| / (1e-7 + |b_c| (M_c - m_c))``; the sum over
    channels is one batched matmul. Abs, two reductions, a subtraction and the matmul, where
    the plain form also multiplies, divides and sums over channels (FullGrad's graph on
    resnet50: 53 such terms)."""
    a = grad.abs()
    low, high = a.amin(dim=(2, 3), keepdim=True), a.amax(dim=(2, 3), keepdim=True)
    b = bias.abs()[None, :, None, None]
    weights = (b / (1e-7 + b * (high - low)))[:, :, 0, 0]  # [N, C]
    n, c, h, w = a.shape
    return torch.matmul(weights[:, None, :], (a - low).reshape(n, c, h * w)).reshape(n, h, w)


def fullgrad_layout(model: nn.Module, size: tuple[int, int]) -> list[tuple[int, int]]:
    """The distinct resolutions of the FullGrad terms (input first), in output order."""
    layers = bias_layers(model)
    store: list[tuple[nn.Module, torch.Tensor]] = []
    with torch.no_grad(), output_hooks([m for m, _ in layers], store):
        model(torch.zeros(1, 3, *size))
    resolutions = [tuple(size)]
    for _, out in store:
        if out.ndim != 4:
            raise ExportError(f"FullGrad needs 4-d layer outputs, got {list(out.shape)}")
        if tuple(out.shape[2:]) not in resolutions:
            resolutions.append(tuple(out.shape[2:]))
    return resolutions


def fullgrad_function(model: nn.Module, size: tuple[int, int]) -> tuple[Joint, list[str]]:
    """The FullGrad joint function and its output names (``logits`` + one map per resolution)."""
    layers = bias_layers(model)
    bias = {id(m): b for m, b in layers}
    resolutions = fullgrad_layout(model, size)
    names = ["logits"] + [f"fullgrad_{h}x{w}" for h, w in resolutions]

    def joint(image: torch.Tensor, cotangent: torch.Tensor, target_rank: torch.Tensor) -> tuple[torch.Tensor, ...]:
        store: list[tuple[nn.Module, torch.Tensor]] = []
        with torch.enable_grad():
            x = image.detach().requires_grad_(True)
            with output_hooks([m for m, _ in layers], store), relu_modules(model, _MaskReLU):
                logits = model(x)
            cot = select_cotangent(logits, cotangent, target_rank)
            grads = torch.autograd.grad((logits * cot).sum(), [x, *[out for _, out in store]], allow_unused=True)
        maps = {res: None for res in resolutions}
        terms = [_channel_minmax_sum((x.detach() * grads[0]).abs())]
        for (m, out), g in zip(store, grads[1:]):
            terms.append(_bias_term(bias[id(m)], torch.zeros_like(out) if g is None else g))
        for term in terms:
            res = tuple(term.shape[1:])
            maps[res] = term if maps[res] is None else maps[res] + term
        return (logits.detach(), *[maps[r] for r in resolutions])

    return joint, names


# ------------------------------------------------------------------- Guided ---


class _MaskReLU(torch.autograd.Function):
    """ReLU with its usual gradient ``grad * [y > 0]`` written as a product: ``Greater``,
    ``Cast`` and ``Mul`` in the graph, where autograd's ``threshold_backward`` exports as
    ``LessOrEqual`` and ``Where``, and ONNX Runtime's CPU ``Where`` alone costs more than the
    three (0.98 against 1.71 ms on [1, 256, 56, 56], 2 threads)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return grad * (y > 0).to(grad.dtype)


class _GuidedReLU(_MaskReLU):
    """ReLU whose backward is ``grad * [x > 0] * [grad > 0]``, written ``relu(grad) * [y > 0]``
    with ``y = relu(x)``: four elementwise ops per ReLU in the graph instead of six (two
    compares, two casts, two products). ONNX Runtime's CPU ``Sign`` would make it three, but it
    is slower than ``Greater`` and ``Cast`` together."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return torch.relu(grad) * (y > 0).to(grad.dtype)


@contextlib.contextmanager
def relu_modules(model: nn.Module, function: type[torch.autograd.Function]) -> Iterator[int]:
    """Every ``nn.ReLU`` module computes ``function`` while active; yields how many."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    originals = [m.forward for m in relus]
    for m in relus:
        m.forward = function.apply  # type: ignore[method-assign]
    try:
        yield len(relus)
    finally:
        for m, fwd in zip(relus, originals):
            m.forward = fwd  # type: ignore[method-assign]


def guided_relus(model: nn.Module) -> contextlib.AbstractContextManager[int]:
    """Every ``nn.ReLU`` module computes a guided ReLU while active; yields how many."""
    return relu_modules(model, _GuidedReLU)


def guided_function(model: nn.Module, layers: Sequence[nn.Module] = ()) -> tuple[Joint, list[str]]:
    """The Guided Backprop joint function: ``(logits, guided [N, 3, H, W])``, then
    ``activations_i, gradients_i`` of ``layers`` (pass them only where no ``nn.ReLU`` module
    runs after them, :mod:`camserve.export.guided_taps`: there they are the plain ones)."""
    names = ["logits", "guided"] + [n for i in range(len(layers)) for n in (f"activations_{i}", f"gradients_{i}")]

    def joint(image: torch.Tensor, cotangent: torch.Tensor, target_rank: torch.Tensor) -> tuple[torch.Tensor, ...]:
        calls: list[tuple[nn.Module, torch.Tensor]] = []
        with torch.enable_grad(), guided_relus(model) as count, output_hooks(layers, calls):
            if count == 0:
                raise ExportError("Guided Backprop needs nn.ReLU modules; this model has none")
            x = image.detach().requires_grad_(True)
            logits = model(x)
            cot = select_cotangent(logits, cotangent, target_rank)
            outputs = dict(calls)
            store = [outputs[layer] for layer in layers]
            grads = torch.autograd.grad((logits * cot).sum(), [x, *store])
        pairs = [t for a, g in zip(store, grads[1:]) for t in (a.detach(), g)]
        return (logits.detach(), grads[0], *pairs)

    return joint, names


# ------------------------------------------------------------------ Shapley ---


@contextlib.contextmanager
def affine_batch_norms(model: nn.Module) -> Iterator[int]:
    """Every eval ``BatchNorm2d`` computes ``x * s + t`` (its folded scale and shift) while
    active; yields how many. The same map, but its double backward is a product: the batch
    norm's traced double backward fixes the batch size of the graph (ShapleyCAM's graph for a
    layer with batch norms after it took batch 2 only)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and not m.training and m.track_running_stats]
    originals = [m.forward for m in norms]

    def affine(m: nn.BatchNorm2d) -> Callable[[torch.Tensor], torch.Tensor]:
        scale = (m.weight if m.affine else torch.ones_like(m.running_var)) / torch.sqrt(m.running_var + m.eps)
        shift = (m.bias if m.affine else torch.zeros_like(m.running_mean)) - m.running_mean * scale
        scale, shift = scale.detach()[None, :, None, None], shift.detach()[None, :, None, None]
        return lambda x: x * scale + shift

    for m in norms:
        m.forward = affine(m)  # type: ignore[method-assign]
    try:
        yield len(norms)
    finally:
        for m, fwd in zip(norms, originals):
            m.forward = fwd  # type: ignore[method-assign]


def shapley_function(model: nn.Module, layers: Sequence[nn.Module]) -> tuple[Joint, list[str]]:
    """ShapleyCAM's joint function: ``(logits, activations_i, g_i - hvp_i / 2, ...)``, ReST target."""
    names = ["logits"] + [n for i in range(len(layers)) for n in (f"activations_{i}", f"gradients_{i}")]

    def joint(image: torch.Tensor, cotangent: torch.Tensor, target_rank: torch.Tensor) -> tuple[torch.Tensor, ...]:
        store: list[torch.Tensor] = []
        with torch.enable_grad():
            with leaf_hooks(layers, store), affine_batch_norms(model):
                logits = model(image)
            cot = select_cotangent(logits, cotangent, target_rank)
            # ReST: z_c - CE(z, c) = 2 z_c - logsumexp(z) for a one-hot row; rows weighted by cot.
            rest = 2 * (logits * cot).sum(dim=1) - cot.sum(dim=1) * torch.logsumexp(logits, dim=1)
            grads = torch.autograd.grad(rest.sum(), store, create_graph=True)
            hvps = torch.autograd.grad(grads, store, grad_outputs=[a.detach() for a in store], allow_unused=True)
        outs: list[torch.Tensor] = [logits.detach()]
        for act, g, hvp in zip(store, grads, hvps):
            outs += [act.detach(), (g if hvp is None else g - 0.5 * hvp).detach()]
        return tuple(outs)

    return joint, names
