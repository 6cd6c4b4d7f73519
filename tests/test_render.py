"""camserve.pipeline.render and .summary: summaries against hand-computed numbers, encoder round trips, errors."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from camserve.pipeline import render
from camserve.pipeline.summary import Summary, summarize
from camserve.demo.sheet import contact_sheet, contact_sheet_png
from camserve.errors import InputError


def _one(summary: Summary) -> dict:
    (d,) = summary.as_dicts()
    return d


# ------------------------------------------------------------------ summary ----------


def test_single_hot_pixel():
    cam = np.zeros((1, 10, 10), np.float32)
    cam[0, 3, 7] = 1.0  # row 3, column 7 -> (x, y) = (7, 3)
    d = _one(summarize(cam))
    assert d["peak"] == [7, 3]
    assert d["box"] == [7, 3, 7, 3]
    assert d["box_mass"] == 1.0
    assert d["box_area"] == pytest.approx(1 / 100)
    assert d["entropy_bits"] == 0.0 and d["entropy_norm"] == 0.0
    assert d["empty"] is False


def test_uniform_map_ties_are_all_in():
    cam = np.full((1, 8, 8), 0.5, np.float32)
    d = _one(summarize(cam))
    assert d["peak"] == [0, 0]  # first maximum in raster order
    assert d["box"] == [0, 0, 7, 7]  # 20 % of the mass needs 13 pixels, but all 64 tie
    assert d["box_mass"] == 1.0 and d["box_area"] == 1.0
    assert d["entropy_bits"] == pytest.approx(6.0)  # log2(64)
    assert d["entropy_norm"] == pytest.approx(1.0)


def test_box_on_background():
    # 10 x 20 map: 0.25 everywhere, 1.0 in rows 2..4 x columns 5..9 (15 pixels).
    cam = np.full((1, 10, 20), 0.25, np.float32)
    cam[0, 2:5, 5:10] = 1.0
    total = 15 * 1.0 + 185 * 0.25  # 61.25; 20 % = 12.25 <= 15, so the hot box alone
    d = _one(summarize(cam))
    assert d["peak"] == [5, 2]
    assert d["box"] == [5, 2, 9, 4]
    assert d["box_mass"] == pytest.approx(15 / total, abs=1e-6)
    assert d["box_area"] == pytest.approx(15 / 200)
    p_hot, p_bg = 1.0 / total, 0.25 / total
    entropy = -(15 * p_hot * math.log2(p_hot) + 185 * p_bg * math.log2(p_bg))
    assert d["entropy_bits"] == pytest.approx(entropy, abs=1e-5)
    assert d["entropy_norm"] == pytest.approx(entropy / math.log2(200), abs=1e-5)


def test_top_set_grows_by_whole_level_sets():
    # 5 x 5: centre 1.0, its 4 neighbours 0.5, the other 20 pixels 0.125. M = 1 + 2 + 2.5.
    cam = np.full((1, 5, 5), 0.125, np.float32)
    cam[0, 2, 1] = cam[0, 2, 3] = cam[0, 1, 2] = cam[0, 3, 2] = 0.5
    cam[0, 2, 2] = 1.0
    total = 5.5
    # 20 % = 1.1 > 1.0: the centre is not enough, the next level (all four 0.5s) comes in.
    d = _one(summarize(cam))
    assert d["box"] == [1, 1, 3, 3]
    assert d["box_mass"] == pytest.approx((1.0 + 4 * 0.5 + 4 * 0.125) / total)
    # 15 % = 0.825 <= 1.0: the centre alone.
    d = _one(summarize(cam, top_mass=0.15))
    assert d["box"] == [2, 2, 2, 2] and d["box_mass"] == pytest.approx(1.0 / total)
    assert d["top_mass"] == 0.15
    # 70 % = 3.85 > 3.0: every pixel.
    assert _one(summarize(cam, top_mass=0.7))["box"] == [0, 0, 4, 4]


def test_coordinates_scale_to_the_input_image():
    cam = np.zeros((1, 7, 7), np.float32)
    cam[0, 2, 3] = 1.0
    # image 224 high, 448 wide: one CAM pixel spans 64 x 32 image pixels
    d = _one(summarize(cam, image_size=(224, 448)))
    assert d["peak"] == [int(3.5 * 64), int(2.5 * 32)]
    assert d["box"] == [3 * 64, 2 * 32, 4 * 64 - 1, 3 * 32 - 1]


def test_empty_map_and_batch_mix():
    cams = np.zeros((2, 6, 6), np.float32)
    cams[1, 5, 0] = 0.5
    out = summarize(cams).as_dicts()
    assert out[0]["empty"] is True and out[0]["peak"] is None and out[0]["box"] is None
    assert out[0]["entropy_bits"] is None and out[0]["box_mass"] == 0.0
    assert out[1]["peak"] == [0, 5] and out[1]["box"] == [0, 5, 0, 5]
    json.dumps(out)  # JSON-ready: no numpy scalars, no NaN


def _reference_box(cam: np.ndarray, top_mass: float) -> tuple[list[int], float]:
    """Brute force in float64: grow the set one value at a time, then add ties."""
    values = np.sort(cam.astype(np.float64).ravel())[::-1]
    total, running, t = values.sum(), 0.0, values[0]
    for v in values:
        running += v
        t = v
        if running >= top_mass * total:
            break
    ys, xs = np.nonzero(cam >= t)
    box = [xs.min(), ys.min(), xs.max(), ys.max()]
    return [int(v) for v in box], float(cam[box[1] : box[3] + 1, box[0] : box[2] + 1].sum() / total)


@pytest.mark.parametrize("shape", [(7, 7), (37, 53), (224, 224)])
def test_batch_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    low = rng.random((5, 4, 4), dtype=np.float32) ** 3
    cams = np.clip(render.resize_maps(low, shape), 0, 1)
    cams /= cams.max(axis=(1, 2), keepdims=True)
    summary = summarize(cams)
    for i, d in enumerate(summary.as_dicts()):
        box, mass = _reference_box(cams[i], 0.2)
        assert d["box"] == box and d["box_mass"] == pytest.approx(mass, abs=1e-5)
        assert d["peak"] == [int(np.argmax(cams[i]) % shape[1]), int(np.argmax(cams[i]) // shape[1])]
        p = cams[i].astype(np.float64).ravel() / cams[i].sum(dtype=np.float64)
        p = p[p > 0]
        assert d["entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum(), abs=1e-4)
        # each map alone gives the same answer as inside the batch
        assert summarize(cams[i : i + 1]).as_dicts()[0] == d


# ------------------------------------------------------------------ encoders ---------


def _smooth_cams(n=3, size=(40, 56), seed=0):
    rng = np.random.default_rng(seed)
    cams = np.clip(render.resize_maps(rng.random((n, 5, 5), dtype=np.float32), size), 0, 1)
    return cams


def test_heatmap_png_round_trip():
    cams = _smooth_cams()
    pngs = render.heatmap_png(cams)
    assert len(pngs) == 3 and all(b[:8] == b"\x89PNG\r\n\x1a\n" for b in pngs)
    expected = np.rint(cams * 255).astype(np.uint8)
    for png, exp in zip(pngs, expected):
        decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert decoded.dtype == np.uint8 and decoded.shape == exp.shape  # 8-bit, one channel
        np.testing.assert_array_equal(decoded, exp)


def test_float16_round_trip_bytes_and_json():
    cams = _smooth_cams(seed=1)
    raw = render.to_float16(cams)
    assert raw.shape == cams.shape and len(raw.data) == 2 * cams.size
    back = render.from_float16(raw)
    assert back.dtype == np.float32 and back.shape == cams.shape
    assert np.abs(back - cams).max() <= 1e-3
    payload = json.loads(json.dumps(raw.to_json()))
    np.testing.assert_array_equal(render.from_float16(payload), back)
    with pytest.raises(InputError, match="needs"):
        render.from_float16(render.RawMaps(data=raw.data[:-2], shape=raw.shape))
    with pytest.raises(InputError, match="'<f4'"):
        render.from_float16({**payload, "dtype": "<f4"})


def test_overlay_dims_and_jet_colours():
    image = np.full((300, 200, 3), 128, np.uint8)  # any size: H 300, W 200
    cam = np.zeros((7, 7), np.float32)
    cam[5:, 5:] = 1.0  # hot bottom-right corner, cold elsewhere
    out = render.overlay(image, cam)
    assert out.shape == (300, 200, 3) and out.dtype == np.uint8
    hot, cold = out[290, 190].astype(int), out[10, 10].astype(int)
    # JET's high end is (dark) red, its low end (dark) blue; channels in RGB order
    assert hot[0] - max(hot[1], hot[2]) >= 50, hot
    assert cold[2] - max(cold[0], cold[1]) >= 50, cold
    # weight 0 gives the image back, weight 1 the pure colour map
    np.testing.assert_array_equal(render.overlay(image, cam, weight=0.0), image)
    assert tuple(render.overlay(image, cam, weight=1.0)[299, 199]) == (128, 0, 0)  # JET(255) = dark red
    assert not np.array_equal(render.overlay(image, cam, colormap="viridis"), out)


def test_overlay_bytes_png_and_jpeg():
    rng = np.random.default_rng(2)
    image = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (120, 90))  # smooth, photo-like
    cam = _smooth_cams(1, (8, 8))[0]
    expected = render.overlay(image, cam)
    png = render.overlay_bytes(image, cam, "png")
    np.testing.assert_array_equal(render.decode_image(png), expected)  # lossless, RGB order kept
    jpeg = render.overlay_bytes(image, cam, "jpeg", quality=95)
    assert jpeg[:2] == b"\xff\xd8"
    assert np.abs(render.decode_image(jpeg).astype(int) - expected).mean() < 4  # RGB order kept
    small = render.overlay_bytes(image, cam, "jpeg", quality=20)
    assert len(small) < len(jpeg)


def test_overlay_batch_equals_single():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)
    cams = _smooth_cams(4, (7, 7), seed=3)
    batch = render.overlay_batch(images, cams, colormap="turbo", weight=0.3)
    for i in range(4):
        np.testing.assert_array_equal(batch[i], render.overlay(images[i], cams[i], colormap="turbo", weight=0.3))


# ------------------------------------------------------------------ errors -----------


@pytest.mark.parametrize(
    "cams, fragment",
    [
        (np.zeros((8, 8), np.float32), r"\[8, 8\]"),
        (np.zeros((1, 8, 8), np.int64), "int64"),
        (np.full((1, 4, 4), 1.5, np.float32), "1.5"),
        (np.full((1, 4, 4), -0.25, np.float32), "-0.25"),
        (np.full((1, 4, 4), np.nan, np.float32), "nan"),
        ([[[0.5]]], "list"),
    ],
)
def test_bad_cams_name_the_value(cams, fragment):
    for fn in (summarize, render.heatmap_png, render.to_float16):
        with pytest.raises(InputError, match=fragment):
            fn(cams)


def test_bad_overlay_arguments():
    cam = np.zeros((4, 4), np.float32)
    image = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(InputError, match="float32"):
        render.overlay(image.astype(np.float32), cam)
    with pytest.raises(InputError, match=r"\[10, 10, 4\]"):
        render.overlay(np.zeros((10, 10, 4), np.uint8), cam)
    with pytest.raises(InputError, match="'plasmaa'"):
        render.overlay(image, cam, colormap="plasmaa")
    with pytest.raises(InputError, match="1.5"):
        render.overlay(image, cam, weight=1.5)
    with pytest.raises(InputError, match="'gif'"):
        render.overlay_bytes(image, cam, "gif")
    with pytest.raises(InputError, match="quality .* 0"):
        render.overlay_bytes(image, cam, "jpeg", quality=0)
    with pytest.raises(InputError, match="3 cams for 2 images"):
        render.overlay_batch(np.zeros((2, 5, 5, 3), np.uint8), np.zeros((3, 5, 5), np.float32))
    with pytest.raises(InputError, match="0.0"):
        summarize(np.ones((1, 3, 3), np.float32), top_mass=0.0)
    with pytest.raises(InputError, match="5 bytes"):
        render.decode_image(b"hello")


def test_small_values_outside_range_are_clipped_not_refused():
    cams = np.full((1, 3, 3), 1.0 + 1e-7, np.float32)  # float noise from a resize
    assert render.to_uint8(cams).max() == 255


# ------------------------------------------------------------------ sheet, cost ------


def test_contact_sheet():
    tiles = [np.full((20 + i, 30, 3), 40 * i, np.uint8) for i in range(5)]
    labels = [f"image {i}: a rather long label that must be cut" for i in range(5)]
    sheet = contact_sheet(tiles, labels, columns=3, tile_size=64, pad=4)
    assert sheet.shape == (2 * (64 + 18 + 4) + 4, 3 * (64 + 4) + 4, 3)
    assert (sheet[4 + 18 + 10, 4 + 68 + 10] == 40).all()  # second tile, resized into place
    assert (sheet[:, :, :][4 + 18 : 4 + 18 + 64, 4 + 2 * 68 + 64 + 1] == 255).all()  # padding between tiles
    decoded = render.decode_image(contact_sheet_png(tiles, labels, columns=3, tile_size=64, pad=4))
    np.testing.assert_array_equal(decoded, sheet)
    with pytest.raises(InputError, match="2 tiles and 1 labels"):
        contact_sheet(tiles[:2], labels[:1])


def test_encoding_cost_is_small():
    costs = render.measure(n=4, repeats=2)
    assert set(costs) >= {"heatmap png (level 1, SUB)", "overlay + jpeg q90", "float16 + base64", "summary + dicts"}
    assert all(v > 0 for v in costs.values())
    # ~0.5-1 ms on an idle 2-core box; a generous bound that still catches e.g. level 9 (~20 ms)
    assert costs["heatmap png (level 1, SUB)"] < 10.0, costs
    assert costs["summary + dicts"] < 15.0, costs
