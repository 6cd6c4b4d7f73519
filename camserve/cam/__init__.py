"""CAM methods on graph outputs: numpy only (OpenCV for resizing), batched, no torch.

Public API::

    explain(session, images, targets, methods, *, eigen_smooth=False, aug_smooth=False) -> Explanation
    TopK(k)                  target: the k highest logits of an image
    available_methods()      registered method names
    get_method(name)         MethodSpec (InputError if unknown)

Pure per-layer functions live in :mod:`camserve.cam.methods`, layout handling in
:mod:`camserve.cam.layouts`, scaling/resizing in :mod:`camserve.cam.scaling`.
"""

from .explain import Explanation, explain
from .registry import REGISTRY, MethodSpec, available_methods, get_method
from .targets import TopK

__all__ = ["REGISTRY", "Explanation", "MethodSpec", "TopK", "available_methods", "explain", "get_method"]
