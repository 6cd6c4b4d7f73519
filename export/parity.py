"""Parity of the exported graph (ONNX Runtime) with PyTorch autograd on the same inputs.

Each output is compared relative to its scale: ``err = |ort - torch| / max|torch|``.
A check passes when the share of elements with ``err > tol`` is at most ``max_share``.
The share, not the maximum, is bounded because where a pre-activation lies within float
noise of 0 the two runtimes can disagree on a ReLU mask, and the few gradient elements
behind a flipped mask then differ by a whole term; the maximum is still reported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from camserve.errors import ParityError
from camserve.export import kinks

# ONNX Runtime phones home unless told not to; only loopback traffic is allowed.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

TOL = 1e-4
MAX_SHARE = 1e-3


def parity_cases(num_outputs: int, input_size: tuple[int, int], seed: int = 0,
                 cosine: bool = False, region: bool = False) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """Batch 1 and 3 inputs with one-hot (explicit and by rank) and mixed cotangents (and,
    ``cosine``, concepts whose similarity is explained; ``region``, a segmentation graph's
    client masks: a box on every other row, the predicted mask (-1) on the others)."""
    g = torch.Generator().manual_seed(seed)
    h, w = input_size
    cases = []
    for batch in (1, 3):
        image = torch.randn(batch, 3, h, w, generator=g)
        mixed = torch.randn(batch, num_outputs, generator=g)
        explicit = torch.zeros(batch, num_outputs)
        explicit[torch.arange(batch), torch.randint(num_outputs, (batch,), generator=g)] = 1.0
        none = torch.full((batch,), -1, dtype=torch.int64)
        ranks = torch.arange(batch, dtype=torch.int64) % min(num_outputs, 3)
        cases += [
            (f"b{batch}-onehot", (image, explicit, none)),
            (f"b{batch}-mixed", (image, mixed, none)),
            (f"b{batch}-rank", (image, mixed, ranks)),
        ]
        if cosine:
            cases.append((f"b{batch}-cosine", (image, mixed.abs(), torch.full((batch,), -2, dtype=torch.int64))))
    if region:
        cases = [(name, (*args, predicted_region(args[0]))) for name, args in cases]
        image = cases[-1][1][0]
        none = torch.full((len(image),), -1, dtype=torch.int64)  # client masks name their classes
        boxed = predicted_region(image)
        boxed[::2] = 0.0
        boxed[::2, :, h // 4 : h // 2, w // 3 : (3 * w) // 4] = 1.0
        cases.append((f"b{len(image)}-region", (image, torch.randn(len(image), num_outputs, generator=g), none, boxed)))
    return cases


def predicted_region(image: torch.Tensor) -> torch.Tensor:
    """The ``region`` input that asks for the predicted masks: -1 everywhere, ``[N, 1, H, W]``."""
    return torch.full((image.shape[0], 1, *image.shape[2:]), -1.0)


def compare(name: str, ours: np.ndarray, ref: np.ndarray, tol: float = TOL) -> dict[str, float]:
    if ours.shape != ref.shape:
        raise ParityError(f"{name}: ONNX Runtime shape {list(ours.shape)} != PyTorch shape {list(ref.shape)}")
    scale = float(np.abs(ref).max()) or 1.0
    err = np.abs(ours.astype(np.float64) - ref.astype(np.float64)) / scale
    return {"max_rel_err": float(err.max()), "share_off": float((err > tol).mean()), "scale": scale}


def check_parity(
    sess: Any,
    reference: Callable[..., Sequence[torch.Tensor]],
    names: Sequence[str],
    num_outputs: int,
    input_size: tuple[int, int],
    tol: float = TOL,
    cosine: bool = False,
    region: bool = False,
    with_predicted: Callable[[torch.Tensor], Callable[..., Sequence[torch.Tensor]]] | None = None,
    relus: tuple[nn.Module, Callable[[], kinks.Probe]] | None = None,
) -> dict[str, Any]:
    """Run the graph (an ONNX Runtime session) and the eager reference on the parity cases;
    raise on disagreement.

    ``relus = (model, make_probe)``: where a case's gradients break the share rule, the
    reference is run again on the graph's own ReLU decisions, if every unit they differ on
    is within ``tol`` of 0 (:mod:`camserve.export.kinks`; ``make_probe`` is called once, then).

    Returns the figures written to the manifest: per output name the worst
    ``max_rel_err`` and ``share_off`` over all cases.
    """
    worst: dict[str, dict[str, float]] = {}
    grads_seen: list[np.ndarray] = []
    mask_flips = 0.0
    relu_flips = 0
    probe: kinks.Probe | None = None
    cases = parity_cases(num_outputs, input_size, cosine=cosine, region=region)
    for case, args in cases:
        feeds = dict(zip(("image", "cotangent", "target_rank", "region"), (a.numpy() for a in args)))
        ours = sess.run(list(names), feeds)
        # the math attention kernel, as traced: CPU flash attention has no double backward (ShapleyCAM)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            ref_fn: Callable[..., Sequence[torch.Tensor]] = reference
            ref = [t.detach().numpy() for t in reference(*args)]
            if with_predicted is not None:  # segmentation: the gradients given the same mask
                flips, ref, ref_fn = _same_mask(ours[0], ref, args, with_predicted, tol, reference)
                mask_flips = max(mask_flips, flips)
            case_stats = [compare(f"{case}/{name}", o, r, tol) for name, o, r in zip(names, ours, ref)]
            if relus is not None and any(n.startswith("gradients_") and s["share_off"] > MAX_SHARE
                                         for n, s in zip(names, case_stats)):
                probe = probe or relus[1]()
                again = kinks.reference_on_graph_masks(relus[0], probe, feeds, ref_fn, args, tol)
                if again is not None:
                    ref, flipped = again
                    relu_flips = max(relu_flips, flipped)
                    case_stats = [compare(f"{case}/{name}", o, r, tol) for name, o, r in zip(names, ours, ref)]
        for name, stats in zip(names, case_stats):
            prev = worst.setdefault(name, {"max_rel_err": 0.0, "share_off": 0.0})
            prev["max_rel_err"] = max(prev["max_rel_err"], stats["max_rel_err"])
            prev["share_off"] = max(prev["share_off"], stats["share_off"])
        grads_seen += [o for n, o in zip(names, ours) if n.startswith("gradients_")]
    bad = {n: s for n, s in worst.items() if s["share_off"] > MAX_SHARE}
    if bad:
        detail = "; ".join(f"{n}: {s['share_off']:.2%} of elements beyond {tol:g} (max {s['max_rel_err']:.2e})" for n, s in bad.items())
        raise ParityError(f"ONNX Runtime and PyTorch disagree: {detail}")
    if grads_seen and all(not np.any(g) for g in grads_seen):
        raise ParityError("every gradient is zero on random inputs: the graph cannot explain anything (zero-initialized head?)")
    figures = {"tolerance": tol, "max_share_off": MAX_SHARE, "outputs": worst, "cases": [c for c, _ in cases]}
    if with_predicted is not None:
        figures["argmax_ties_share"] = mask_flips
    if relus is not None:
        figures["relu_units_flipped"] = relu_flips
    return figures


def _same_mask(ours_logits: np.ndarray, ref: list[np.ndarray], args: Sequence[torch.Tensor],
               with_predicted: Callable[[torch.Tensor], Callable[..., Sequence[torch.Tensor]]],
               tol: float, reference: Callable[..., Sequence[torch.Tensor]],
               ) -> tuple[float, list[np.ndarray], Callable[..., Sequence[torch.Tensor]]]:
    """A segmentation graph's mask is the argmax of its logits: where two classes' logits are
    tied within float rounding, ONNX Runtime and PyTorch may pick different ones (random
    weights tie often), and the gradients then differ around those pixels for a reason that
    is not the graph's. Such pixels must be ties (top-2 gap within ``tol`` of the logits'
    scale); the reference is then recomputed with ONNX Runtime's mask. Returns the share of
    pixels that flipped, the reference and the function that gave it."""
    ours_arg, ref_arg = ours_logits.argmax(axis=1), ref[0].argmax(axis=1)
    flipped = ours_arg != ref_arg
    if not flipped.any():
        return 0.0, ref, reference
    top2 = np.sort(ref[0], axis=1)[:, -2:]
    gap = (top2[:, 1] - top2[:, 0])[flipped]
    scale = float(np.abs(ref[0]).max()) or 1.0
    if (gap > tol * scale).any():
        raise ParityError(f"segmentation masks differ at {int(flipped.sum())} pixels, some not ties "
                          f"(top-2 logit gap up to {float(gap.max()):.2e} of scale {scale:.2e})")
    same = with_predicted(torch.from_numpy(ours_arg[:, None]))
    with torch.no_grad():
        again = same(*args)
    return float(flipped.mean()), [t.detach().numpy() for t in again], same


def check_head(graph: Path, reference: Callable[..., torch.Tensor], names: Sequence[str], example: Sequence[torch.Tensor]) -> None:
    """The head graph's logits must match the model with the layer's output replaced."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    image, acts = example
    feeds = {"image": image.numpy(), "activations": acts.numpy()}
    ours = sess.run(["logits"], {n: feeds[n] for n in names})[0]
    stats = compare("head/logits", ours, reference(image, acts).numpy())
    if stats["share_off"] > MAX_SHARE:
        raise ParityError(f"head graph disagrees with PyTorch: max relative error {stats['max_rel_err']:.2e}")
