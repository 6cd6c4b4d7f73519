"""CAM methods on graph outputs: numpy only (OpenCV for resizing), batched, no torch.

Public API::

    explain(session, images, targets, methods, *, eigen_smooth=False, aug_smooth=False) -> Explanation
    TopK(k)                  target: the k highest logits of an image
    available_methods()      registered method names
    get_method(name)         MethodSpec (InputError if unknown)
    DEGENERATE_RATIO         signal ratio below which a map is float rounding noise (1e-4)
    degenerate_reason(r)     None, or why a map with signal ratio r is not a heatmap

``Explanation.signal_ratio[method][i]`` ``[T_i]`` holds each map's signal ratio; the math
is in :mod:`camserve.cam.degenerate`.

Pure per-layer functions live in :mod:`camserve.cam.methods`, layout handling in
:mod:`camserve.cam.layouts`, scaling/resizing in :mod:`camserve.cam.scaling`.
"""

from camserve.cam.degenerate import DEGENERATE_RATIO, degenerate_reason
from camserve.cam.explain import Explanation, explain
from camserve.cam.registry import REGISTRY, MethodSpec, available_methods, get_method
from camserve.cam.targets import TopK

__all__ = [
    "DEGENERATE_RATIO",
    "REGISTRY",
    "Explanation",
    "MethodSpec",
    "TopK",
    "available_methods",
    "degenerate_reason",
    "explain",
    "get_method",
]
