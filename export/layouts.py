"""Infer a target layer's activation layout (NCHW, NHWC or tokens) from its shape."""

from __future__ import annotations

from collections.abc import Sequence

from camserve.errors import ExportError
from camserve.manifest import LayerSpec

MAX_PREFIX_TOKENS = 8


def _fits(spatial: tuple[int, int], input_size: tuple[int, int]) -> bool:
    h, w = spatial
    H, W = input_size
    return 1 <= h <= H and 1 <= w <= W and abs(h * W - w * H) <= max(H, W) // max(h, w, 1)


def infer_layout(name: str, shape: Sequence[int], input_size: tuple[int, int], override: str | None = None) -> LayerSpec:
    """Build the LayerSpec of a per-sample activation ``shape`` (batch left out).

    4-d activations are NCHW unless only the NHWC reading has a spatial grid with the
    input's aspect ratio (Swin). 3-d activations are tokens: the smallest number of
    leading special tokens (0..8) that leaves a grid of the input's aspect ratio (ViT:
    197 = 1 + 14 x 14). ``override`` ("NCHW", "NHWC", "tokens") skips the guess for
    4-d shapes.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        nchw, nhwc = _fits(shape[1:], input_size), _fits(shape[:2], input_size)
        layout = override or ("NHWC" if nhwc and not nchw else "NCHW")
        if layout not in ("NCHW", "NHWC"):
            raise ExportError(f"layer {name!r}: layout {layout!r} does not fit a 4-d activation {list(shape)}")
        return LayerSpec(name=name, layout=layout, shape=shape)
    if len(shape) == 2:
        tokens = shape[0]
        H, W = input_size
        for prefix in range(0, min(MAX_PREFIX_TOKENS, tokens - 1) + 1):
            n = tokens - prefix
            for h in range(1, n + 1):
                if n % h == 0 and h * W == (n // h) * H:
                    return LayerSpec(name=name, layout="tokens", shape=shape, grid=(h, n // h), prefix_tokens=prefix)
        raise ExportError(f"layer {name!r}: {tokens} tokens do not form a grid of aspect {H}:{W} after 0..{MAX_PREFIX_TOKENS} prefix tokens")
    raise ExportError(f"layer {name!r}: activation shape {list(shape)} is neither [C, h, w], [h, w, C] nor [tokens, C]")
