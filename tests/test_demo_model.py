"""camserve.demo.shapes: the synthetic-shapes generator and the small CNN trained on it."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from camserve.demo import shapes as demo
from camserve.errors import InputError

from _shapes_fixture import STEPS, trained_shapes


def test_generator_is_deterministic():
    a, b = demo.make_shapes(12, seed=5), demo.make_shapes(12, seed=5)
    for field in ("images", "labels", "shapes", "boxes", "colours"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = demo.make_shapes(12, seed=6)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (12, 64, 64, 3) and a.images.dtype == np.uint8
    assert demo.make_shapes(3, seed=1, size=48).images.shape == (3, 48, 48, 3)


def test_all_classes_appear():
    data = demo.make_shapes(200, seed=0)
    assert set(data.labels.tolist()) == set(range(len(demo.CLASSES)))
    np.testing.assert_array_equal(data.labels, data.shapes)
    assert data.markers is None


@pytest.mark.parametrize("size", [64, 96])
def test_boxes_are_tight_on_the_shape(size):
    data = demo.make_shapes(60, seed=3, size=size)
    fill = {k: [] for k in range(len(demo.CLASSES))}
    for img, box, colour, label in zip(data.images, data.boxes, data.colours, data.labels):
        # the shape colour appears nowhere but on the shape (clutter uses other colours)
        ys, xs = np.nonzero((img == colour).all(axis=2))
        assert len(xs) > 0
        assert [xs.min(), ys.min(), xs.max(), ys.max()] == box.tolist()
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 < size and 0 <= y0 < y1 < size
        assert 2 * demo.R_MIN * size - 2 <= max(x1 - x0, y1 - y0) + 1 <= 2 * demo.R_MAX * size + 2
        fill[int(label)].append(len(xs) / ((x1 - x0 + 1) * (y1 - y0 + 1)))
    # the label is the shape drawn: how much of its box the shape fills
    assert min(fill[1]) == 1.0  # square
    assert 0.7 < np.mean(fill[0]) < 0.85  # circle: pi / 4
    assert 0.35 < np.mean(fill[2]) < 0.62  # triangle: ~1/2 of its box
    assert 0.25 < np.mean(fill[3]) < 0.6  # cross: two bars


def test_shortcut_mode_puts_the_class_in_a_corner():
    data = demo.make_shapes(80, seed=4, shortcut=True)
    assert data.markers is not None
    assert (data.shapes != data.labels).mean() > 0.5  # the shape no longer tells the class
    for img, label, (x0, y0, x1, y1) in zip(data.images, data.labels, data.markers):
        assert (img[y0 : y1 + 1, x0 : x1 + 1] == demo.MARKER_COLOURS[label]).all()
        corner = (int(x0 > 32), int(y0 > 32))
        assert corner == [(0, 0), (1, 0), (0, 1), (1, 1)][label]
    for img, box, colour in zip(data.images, data.boxes, data.colours):  # shape intact
        ys, xs = np.nonzero((img == colour).all(axis=2))
        assert [xs.min(), ys.min(), xs.max(), ys.max()] == box.tolist()


def test_bad_generator_arguments():
    with pytest.raises(InputError, match="n=0"):
        demo.make_shapes(0)
    with pytest.raises(InputError, match="size=16"):
        demo.make_shapes(4, size=16)


def test_write_samples(tmp_path):
    paths = demo.write_samples(tmp_path, n=5, seed=2)
    assert len(paths) == 5 and all(p.suffix == ".png" and p.exists() for p in paths)
    records = json.loads((tmp_path / "samples.json").read_text())
    data = demo.make_shapes(5, seed=2)
    for path, rec, img, label in zip(paths, records, data.images, data.labels):
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(rgb, img)  # lossless, RGB order
        assert rec["file"] == path.name and rec["label"] == demo.CLASSES[label] in path.name


def test_normalize_layout_and_values():
    images = np.zeros((2, 4, 5, 3), np.uint8)
    images[..., 0] = 255
    x = demo.normalize(images, (0.5, 0.5, 0.5), (0.5, 0.25, 0.5))
    assert x.shape == (2, 3, 4, 5) and x.dtype == np.float32
    assert np.allclose(x[:, 0], 1.0) and np.allclose(x[:, 1], -2.0) and np.allclose(x[:, 2], -1.0)


def test_training_reaches_90_percent_heldout_in_seconds():
    import torch

    model, info = trained_shapes()
    assert info.heldout_accuracy >= 0.90, info
    assert info.steps == STEPS and info.labels == demo.CLASSES and info.input_size == 64
    # ~15-30 s on a quiet 2-core box, 70 s seen with three other jobs on it: a sanity bound
    assert info.train_seconds < 180, f"training took {info.train_seconds:.1f} s"
    assert not model.training
    # the reported accuracy is real: recompute it on fresh held-out images
    test = demo.make_shapes(200, seed=424242)
    assert (demo.predict(model, test.images, info.mean, info.std) == test.labels).mean() >= 0.9
    # the named target layer exists and yields a spatial map
    module = dict(model.named_modules())[info.target_layer]
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.from_numpy(demo.normalize(test.images[:2], info.mean, info.std)))
    handle.remove()
    assert len(seen) == 1 and seen[0][0] == 2 and seen[0][2] >= 8 and seen[0][3] >= 8
