"""Issue 3's localization proof: CAMs of a trained shapes CNN point at the shape.

The small CNN from :mod:`camserve.demo.shapes` is trained in the test session (seconds), exported
with ``camserve.export``, and explained through ONNX Runtime (``GraphSession``) with
``camserve.cam.explain``. On 100 held-out images the GradCAM and GradCAM++ peak (the
argmax of the map at input resolution, via ``camserve.pipeline.summary.summarize``) must fall inside
the shape's bounding box at least 90 % of the time.
"""

from __future__ import annotations

import numpy as np
import pytest

from camserve.demo import shapes as demo
from camserve.pipeline.summary import summarize

from _shapes_fixture import exported_shapes, trained_shapes

METHODS = ("gradcam", "gradcam++")
HELDOUT_SEED = 2026  # != the training seed (0) and the accuracy hold-out (1_000_003)


@pytest.fixture(scope="module")
def explained():
    from camserve.cam import TopK, explain
    from camserve.pipeline.runtime import GraphSession

    model, info = trained_shapes()
    directory, manifest = exported_shapes()
    session = GraphSession(directory, intra_op_threads=2)
    data = demo.make_shapes(100, seed=HELDOUT_SEED, size=info.input_size)
    images = demo.normalize(data.images, manifest.mean, manifest.std)
    targets = [[int(label)] for label in data.labels]  # explain the true class
    result = explain(session, images, targets, list(METHODS))
    cams = {m: np.concatenate(result.cams[m], axis=0) for m in METHODS}  # [100, 64, 64]
    top1 = explain(session, images, [TopK(1)] * len(images), list(METHODS))  # the serving default
    cams.update({(m, "top1"): np.concatenate(top1.cams[m], axis=0) for m in METHODS})
    return model, info, manifest, data, result, cams


def _inside(peaks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x, y = peaks[:, 0], peaks[:, 1]
    return (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])


def test_export_carries_the_model(explained):
    model, info, manifest, data, result, _ = explained
    assert manifest.labels == demo.CLASSES and manifest.input_size == (info.input_size, info.input_size)
    assert manifest.target_layers[0].name == info.target_layer
    # ONNX Runtime's logits give the same classes as the torch model
    torch_pred = demo.predict(model, data.images, info.mean, info.std)
    np.testing.assert_array_equal(result.logits.argmax(1), torch_pred)
    assert (torch_pred == data.labels).mean() >= 0.9


@pytest.mark.parametrize("method", METHODS)
def test_cam_peak_falls_inside_the_shape(explained, method):
    _, info, _, data, result, cams = explained
    assert cams[method].shape == (100, info.input_size, info.input_size)
    assert result.classes == [[int(label)] for label in data.labels]
    summary = summarize(cams[method])
    assert not summary.empty.any()
    hits = _inside(summary.peak, data.boxes)
    assert hits.mean() >= 0.90, f"{method}: peak inside the shape box for {hits.mean():.0%} of 100 images"
    # the criterion discriminates: guessing the image centre, or using the peaks against
    # other images' boxes, lands inside far less often
    centre = np.full_like(summary.peak, info.input_size // 2)
    assert _inside(centre, data.boxes).mean() < 0.6
    assert _inside(summary.peak, np.roll(data.boxes, 1, axis=0)).mean() < 0.5
    # explaining the predicted class (target=top1, what the server does by default) too
    top1_hits = _inside(summarize(cams[(method, "top1")]).peak, data.boxes)
    assert top1_hits.mean() >= 0.90, f"{method} top-1: peak inside the box for {top1_hits.mean():.0%}"
