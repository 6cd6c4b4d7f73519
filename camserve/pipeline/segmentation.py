"""A segmentation request's client mask: which pixels a class's output is summed over.

By default a segmentation model explains a class over the pixels it predicts as that class
(pytorch-grad-cam's ``SemanticSegmentationTarget`` with the predicted mask). A client may
name the pixels instead, for every image of the request:

* ``box=x0,y0,x1,y1``: a box in the sent image's pixels, corners inclusive;
* a multipart part named ``mask``: an image of the sent image's size whose non-zero pixels
  are the mask (grey levels weigh: 255 = 1).

The mask is resized to the model's input like the image itself (area when shrinking,
bilinear otherwise), so a pixel on the model's grid weighs the share of it that the mask
covers, and feeds the graph's ``region`` input (:meth:`GraphSession.run`). A client mask
names its classes (``target=3``): the top-k classes rank by predicted area, which a client
mask does not have.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from camserve.pipeline import imageio
from camserve.pipeline.params import BadParameter

#: The multipart part that carries a client mask.
MASK_PART = "mask"


def split_parts(parts: list[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], bytes | None]:
    """The images to explain, and the bytes of the part named ``mask`` (None if absent)."""
    masks = [data for name, data in parts if name == MASK_PART]
    if len(masks) > 1:
        raise BadParameter(f"the request has {len(masks)} parts named {MASK_PART!r}; send one mask")
    return [(name, data) for name, data in parts if name != MASK_PART], (masks[0] if masks else None)


def check(params: Any, manifest: Any, has_mask: bool, model: str, takes_region: bool) -> None:
    """400s for client-mask asks the model or the request cannot honour, naming them
    (``takes_region``: the model's graph has the ``region`` input)."""
    asked = "parameter box" if params.box is not None else f"a part named {MASK_PART!r}" if has_mask else None
    if asked is None:
        return
    if not getattr(manifest, "segmentation", False):
        raise BadParameter(f"{asked} applies to segmentation models; model {model!r} is a {manifest.kind}")
    if not takes_region:
        raise BadParameter(f"{asked}: model {model!r} was exported without client masks; re-export it with camserve export")
    if params.box is not None and has_mask:
        raise BadParameter(f"send either parameter box or a part named {MASK_PART!r}, not both")
    if not params.explain:
        return
    if params.target.topk is not None:
        raise BadParameter(f"{asked}: name the classes to explain (target=3,7); top-k classes rank by predicted area, "
                           "which a client mask has not")
    if params.aug_smooth:
        raise BadParameter(f"{asked}: aug_smooth is not defined with a client mask (the mask would move with the image)")


def regions(params: Any, mask: np.ndarray | None, images: list[tuple[str, np.ndarray]],
            input_size: tuple[int, int]) -> np.ndarray | None:
    """The ``region`` rows ``[N, h, w]`` float32 in [0, 1] at the model's input size for the
    request's images (``(name, rgb)``), or None without a client mask. ``mask`` is the
    decoded mask part (grey or RGB)."""
    if params.box is None and mask is None:
        return None
    rows = []
    for name, rgb in images:
        h, w = rgb.shape[:2]
        if params.box is not None:
            x0, y0, x1, y1 = params.box
            if x1 >= w or y1 >= h:
                raise BadParameter(f"parameter box={x0},{y0},{x1},{y1} reaches outside image {name!r} ({w}x{h} pixels)")
            full = np.zeros((h, w), np.uint8)
            full[y0 : y1 + 1, x0 : x1 + 1] = 255
        else:
            if mask.shape[:2] != (h, w):
                raise BadParameter(f"the {MASK_PART!r} part is {mask.shape[1]}x{mask.shape[0]} pixels, image {name!r} "
                                   f"is {w}x{h}: send a mask of the image's size")
            full = mask if mask.ndim == 2 else mask.max(axis=2)
            if not full.any():
                raise BadParameter(f"the {MASK_PART!r} part has no non-zero pixel: the mask is empty")
        rows.append(imageio.resize(full, input_size).astype(np.float32) / 255.0)  # as the image is resized
    return np.stack(rows)
