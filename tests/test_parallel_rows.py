"""A large batch's CAMs split by rows over the post-processing threads
(:func:`camserve.cam.parallel.map_rows`): the same maps and ratios as one thread, for every
method computed from the main graph's arrays, in NCHW and token layouts."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from camserve.cam import TopK, explain, get_method, parallel
from camserve.cam.registry import available_methods
from camserve.manifest import LayerSpec, Manifest
from camserve.pipeline.runtime import GraphOutputs, check_images

RNG = np.random.default_rng(21)
LAYERS = {
    "NCHW": LayerSpec("layer4", "NCHW", (2048, 7, 7)),
    "tokens": LayerSpec("encoder.layers.-1.ln_1", "tokens", (197, 768), grid=(14, 14), prefix_tokens=1),
}


class ArraySession:
    """The graph's outputs as fixed arrays (rows = images: top-1 of each), and ``threads``."""

    def __init__(self, spec: LayerSpec, n: int, threads: int) -> None:
        self.threads = threads
        self.manifest = Manifest("rows", "0", (32, 32), tuple(str(i) for i in range(10)), (spec,))
        acts = RNG.standard_normal((n, *spec.shape), dtype=np.float32)
        if spec.layout == "NCHW":
            acts = np.maximum(acts, 0)
        self.outputs = GraphOutputs(RNG.standard_normal((n, 10), dtype=np.float32), [acts],
                                    [RNG.standard_normal((n, *spec.shape), dtype=np.float32) * 1e-3])

    def check_images(self, images: np.ndarray) -> np.ndarray:
        return check_images(images, self.manifest)

    def run(self, images, cotangent=None, target_rank=None, region=None) -> GraphOutputs:
        return self.outputs


def _array_methods() -> list[str]:
    return [m for m in available_methods() if get_method(m).source in ("gradients", "activations")]


@pytest.mark.parametrize("layout", sorted(LAYERS))
def test_split_batch_equals_one_thread(layout: str) -> None:
    n = 8
    one = ArraySession(LAYERS[layout], n, threads=1)
    two = ArraySession(LAYERS[layout], n, threads=2)
    two.outputs = one.outputs
    images = np.zeros((n, 3, 32, 32), np.float32)
    with parallel.using(2):  # the split happens (resnet50 and vit_b_16 shapes at N=8)
        assert len(parallel.row_parts(n, 2 * one.outputs.activations[0].size)) == 2
    methods = _array_methods()
    assert {"gradcam", "gradcam++", "layercam", "eigengradcam", "eigencam"} <= set(methods)
    a = explain(one, images, [TopK(1)] * n, methods)
    b = explain(two, images, [TopK(1)] * n, methods)
    for m in methods:
        np.testing.assert_array_equal(np.concatenate(a.cams[m]), np.concatenate(b.cams[m]), err_msg=m)
        np.testing.assert_array_equal(np.concatenate(a.signal_ratio[m]), np.concatenate(b.signal_ratio[m]), err_msg=m)


def test_row_parts_and_map_rows_order() -> None:
    assert parallel.row_parts(8, 10**9) == [slice(0, 8)]  # one thread outside explain()
    with parallel.using(2):
        assert parallel.row_parts(1, 10**9) == [slice(0, 1)]  # one row
        assert parallel.row_parts(32, parallel.MIN_SPLIT_ELEMENTS - 1) == [slice(0, 32)]  # too small to split
        assert parallel.row_parts(7, 10**9) == [slice(0, 3), slice(3, 7)]
    with parallel.using(4):
        assert parallel.row_parts(5, 2 * parallel.MIN_SPLIT_ELEMENTS) == [slice(0, 2), slice(2, 5)]
    x = np.arange(10.0)
    names: set[str] = set()

    def fn(rows: slice) -> tuple[np.ndarray, np.ndarray]:
        names.add(threading.current_thread().name)
        return x[rows] * 2, x[rows, None] + 1

    with parallel.using(3):
        doubled, plus = parallel.map_rows(fn, 10, 10**9)
    np.testing.assert_array_equal(doubled, x * 2)
    np.testing.assert_array_equal(plus, x[:, None] + 1)
    assert names and all(name.startswith("camserve-cam") for name in names)  # on the pool
