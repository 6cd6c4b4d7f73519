"""Degenerate maps: the signal ratio ``max |sum_c T| / max sum_c |T|`` of the channel terms.

Unit checks of the ratio on hand-made arrays (weighted-sum and element-wise forms, batched,
several layers, aug_smooth), then ONNX Runtime outputs of exported graphs: a conv layer
followed by a LayerNorm over channels (HiResCAM's ``sum_c G A`` cancels) and the tiny CNN
of the server tests (nothing cancels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from camserve.cam import DEGENERATE_RATIO, TopK, available_methods, degenerate_reason, explain, get_method
from camserve.cam.degenerate import cancellation_ratio, combine_ratios
from camserve.cam.layouts import to_nchw
from camserve.cam.methods import reduce_terms
from camserve.manifest import LayerSpec, Manifest
from camserve.pipeline.runtime import GraphOutputs, GraphSession

from _server_fixture import INPUT, tiny_export

RNG = np.random.default_rng(5)


def _brute_ratio(terms: np.ndarray) -> np.ndarray:
    """Per row, in float64 with an explicit loop: ``terms [N, C, h, w]``."""
    out = []
    for t in terms.astype(np.float64):
        scale = np.abs(t).sum(axis=0).max()
        out.append(1.0 if scale == 0 else np.abs(t.sum(axis=0)).max() / scale)
    return np.array(out)


def _pairs(x: np.ndarray) -> np.ndarray:
    """``[N, K, h, w]`` -> ``[N, 2K, h, w]`` with channel ``2k`` and ``2k + 1`` both ``x_k``."""
    return np.repeat(x, 2, axis=1)


def test_weighted_sum_ratio_batched() -> None:
    """Row 0 cancels exactly (opposite weights on equal channels), row 1 agrees (all terms
    positive), row 2 is a random mix, row 3 is empty (all-zero activations)."""
    n, c, h, w = 4, 12, 5, 6
    a = RNG.random((n, c, h, w)).astype(np.float32) + 0.1
    weights = RNG.random((n, c)).astype(np.float32) + 0.1
    a[0] = _pairs(a[:1, : c // 2])[0]
    weights[0, 1::2] = -weights[0, 0::2]
    weights[2] = RNG.standard_normal(c).astype(np.float32)
    a[3] = 0
    cam, ratio = reduce_terms("weights", weights, a)
    assert cam.shape == (n, h, w) and ratio.shape == (n,) and ratio.dtype == np.float64
    assert ratio[0] < 1e-6 and ratio[1] == pytest.approx(1.0, abs=1e-6) and ratio[3] == 1.0
    np.testing.assert_allclose(ratio, _brute_ratio(weights[:, :, None, None] * a), rtol=1e-5, atol=1e-7)
    assert 1e-3 < ratio[2] < 1
    # the same maps in NHWC memory (a transposed view, as to_nchw gives): same ratio
    nhwc = to_nchw(np.ascontiguousarray(a.transpose(0, 2, 3, 1)), LayerSpec("x", "NHWC", (h, w, c)))
    np.testing.assert_allclose(reduce_terms("weights", weights, nhwc)[1], ratio, rtol=1e-6, atol=1e-7)
    # eigen smoothing projects: the check does not apply
    assert np.isnan(reduce_terms("weights", weights, a, eigen_smooth=True)[1]).all()


def test_elementwise_ratio_batched() -> None:
    """HiResCAM's ``E = G * A`` with ``G`` of opposite sign on equal channels cancels."""
    n, c, h, w = 3, 8, 4, 4
    a = _pairs(RNG.random((n, c // 2, h, w)).astype(np.float32) + 0.1)
    g = _pairs(RNG.random((n, c // 2, h, w)).astype(np.float32) + 0.1)
    g[0, 1::2] *= -1  # row 0: every pair cancels
    g[2] = RNG.standard_normal((c, h, w)).astype(np.float32)  # row 2: a random mix
    elements = g * a
    cam, ratio = reduce_terms("elements", elements)
    np.testing.assert_array_equal(cam, get_method("hirescam").function(a, g))
    assert ratio[0] < 1e-6 and ratio[1] == 1.0 and 1e-3 < ratio[2] < 1
    np.testing.assert_allclose(ratio, _brute_ratio(elements), rtol=1e-5, atol=1e-7)
    assert np.isnan(reduce_terms("elements", elements, eigen_smooth=True)[1]).all()
    # zero terms: an empty map, not a degenerate one
    assert reduce_terms("elements", np.zeros((2, 3, 4, 4), np.float32))[1].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_nonnegative_maps_take_one_pass_with_the_same_result(layout: str) -> None:
    """With ``A >= 0`` (after a ReLU) map and magnitude are two rows of one matmul; one
    negative element anywhere sends the batch down the general ``|w| @ |A|`` path. Both must
    give the float64 formula's map and ratio, in either memory order."""
    n, c, h, w = 3, 10, 4, 5
    weights = RNG.standard_normal((n, c)).astype(np.float32)
    for negative in (False, True):
        a = RNG.random((n, c, h, w)).astype(np.float32)
        if negative:
            a[2, 3, 1, 1] = -0.5
        maps = a if layout == "NCHW" else to_nchw(np.ascontiguousarray(a.transpose(0, 2, 3, 1)), LayerSpec("x", "NHWC", (h, w, c)))
        cam, ratio = reduce_terms("weights", weights, maps)
        expected = np.einsum("nc,nchw->nhw", weights.astype(np.float64), a.astype(np.float64))
        np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ratio, _brute_ratio(weights[:, :, None, None] * a), rtol=1e-5, atol=1e-7)
    # NaN activations are not "non-negative": the general path keeps the NaN in the ratio
    a = RNG.random((1, c, h, w)).astype(np.float32)
    a[0, 0, 0, 0] = np.nan
    assert np.isnan(reduce_terms("weights", weights[:1], a)[1]).all()


def test_nonnegative_elements_are_their_own_magnitude() -> None:
    """GradCAM element-wise ``relu(G A)`` and LayerCAM on ``A >= 0`` give non-negative terms:
    the ratio (1 for every row) equals the brute formula; signed terms still cancel."""
    a = RNG.random((3, 6, 4, 4)).astype(np.float32)
    g = RNG.standard_normal((3, 6, 4, 4)).astype(np.float32)
    for name in ("gradcamelementwise", "layercam"):
        terms = get_method(name).terms(a, g)
        cam, ratio = reduce_terms("elements", terms)
        np.testing.assert_array_equal(cam, terms.sum(axis=1))
        np.testing.assert_allclose(ratio, _brute_ratio(terms), rtol=1e-6)
    signed = get_method("hirescam").terms(a, g)
    np.testing.assert_allclose(reduce_terms("elements", signed)[1], _brute_ratio(signed), rtol=1e-5, atol=1e-7)


def test_cancellation_ratio_and_layer_minimum() -> None:
    signed = np.array([[[1e-8, -2e-8]], [[0.0, 0.5]], [[0.0, 0.0]]], np.float32)
    magnitude = np.array([[[1.0, 0.5]], [[2.0, 1.0]], [[0.0, 0.0]]], np.float32)
    ratio = cancellation_ratio(signed, magnitude)
    np.testing.assert_allclose(ratio, [2e-8, 0.25, 1.0], rtol=1e-6)
    nan = np.nan
    per_layer = [np.array([0.5, 1e-7, 0.3]), np.array([0.2, 0.9, 1.0])]
    np.testing.assert_array_equal(combine_ratios(per_layer), [0.2, 1e-7, 0.3])
    assert np.isnan(combine_ratios([np.array([nan, nan])] * 2)).all()


@pytest.mark.parametrize("eigen_smooth", [False, True])
def test_terms_reduce_to_the_method_functions(eigen_smooth: bool) -> None:
    """``reduce_terms(form, terms(A, G), A)`` is each summing method's map bit for bit (the
    terms are computed once for map and ratio); projections have no terms."""
    a = np.maximum(RNG.standard_normal((3, 16, 5, 6)), -0.2).astype(np.float32)
    g = (RNG.standard_normal((3, 16, 5, 6)) * 1e-2).astype(np.float32)
    for name in available_methods():
        spec = get_method(name)
        smooth = eigen_smooth and spec.eigen_smooth
        if spec.form == "projection":
            assert spec.terms is None, name
            continue
        assert spec.form in ("weights", "elements"), name
        if spec.terms is None:  # ScoreCAM / AblationCAM: weights from their runs
            weights = RNG.random((3, 16)).astype(np.float32)
            cam, ratio = reduce_terms(spec.form, weights, a, smooth)
            np.testing.assert_array_equal(cam, spec.function(weights, a, smooth), err_msg=name)
        else:
            cam, ratio = reduce_terms(spec.form, spec.terms(a, g if spec.needs_gradients else None), a, smooth)
            np.testing.assert_array_equal(cam, spec.function(a, g, smooth), err_msg=name)
        assert ratio.shape == (3,) and ratio.dtype == np.float64
        assert np.isnan(ratio).all() if smooth else ((ratio > 0) & (ratio <= 1 + 1e-6)).all(), name


def test_degenerate_reason() -> None:
    assert degenerate_reason(float("nan")) is None
    assert degenerate_reason(DEGENERATE_RATIO) is None and degenerate_reason(0.3) is None
    reason = degenerate_reason(4.4e-7)
    assert reason is not None and "4.4e-07" in reason and "1e-04" in reason and "noise" in reason
    assert degenerate_reason(np.float64(1.23e-7)) is not None and "1.2e-07" in degenerate_reason(1.23e-7)


class _StubSession:
    """GraphSession look-alike with hand-made layers and no model.

    Layer ``plain`` (NCHW) has positive activations and gradients: every channel term
    agrees (ratio 1). Layer ``cancel`` (NHWC) has equal activations on channel pairs; its
    gradients have opposite signs on a pair, so ``G * A`` and ``w A`` cancel, for images
    whose top-left pixel is brighter than the top-right one (flipped copies too), else the
    same sign.
    """

    check_images = GraphSession.check_images

    def __init__(self) -> None:
        layers = (LayerSpec("plain", "NCHW", (4, 3, 3)), LayerSpec("cancel", "NHWC", (3, 3, 6)))
        self.manifest = Manifest("stub", "0", (6, 6), ("a", "b", "c"), layers)

    def run(self, images: np.ndarray, cotangent: np.ndarray | None = None, target_rank: np.ndarray | None = None) -> GraphOutputs:
        n = len(images)
        rng = np.random.default_rng(0)
        level = 1.0 + np.abs(images).mean(axis=(1, 2, 3))[:, None, None, None]
        plain_a = (rng.random((1, 4, 3, 3)) + 0.1) * level
        plain_g = (rng.random((1, 4, 3, 3)) + 0.1) * level
        a = np.repeat((rng.random((1, 3, 3, 3)) + 0.1) * level, 2, axis=-1)
        g = np.repeat((rng.random((1, 3, 3, 3)) + 0.1) * level, 2, axis=-1)
        flip = images[:, 0, 0, 0] > images[:, 0, 0, -1]
        g[flip, ..., 1::2] *= -1
        logits = images.reshape(n, 3, -1).mean(axis=2)
        f32 = lambda x: np.ascontiguousarray(x, dtype=np.float32)  # noqa: E731
        return GraphOutputs(f32(logits), [f32(plain_a), f32(a)], [f32(plain_g), f32(g)])


def _stub_images() -> np.ndarray:
    images = RNG.random((2, 3, 6, 6)).astype(np.float32)
    images[:, 0, 0, 0], images[:, 0, 0, -1] = 0.1, 0.9
    images[1, 0, 0, 0], images[1, 0, 0, -1] = 0.9, 0.1  # image 1: its "cancel" layer cancels
    return images


def test_explain_ratio_is_the_minimum_over_layers() -> None:
    out = explain(_StubSession(), _stub_images(), [[0, 2], TopK(1)], ["hirescam", "gradcam", "layercam", "eigencam", "fem"])
    for name, ratios in out.signal_ratio.items():
        assert [r.shape for r in ratios] == [(2,), (1,)] and all(r.dtype == np.float64 for r in ratios), name
    for name in ("hirescam", "gradcam"):
        r = out.signal_ratio[name]
        assert r[0].tolist() == pytest.approx([1.0, 1.0]) and r[1][0] < 1e-6, (name, r)
        assert degenerate_reason(r[1][0]) is not None and degenerate_reason(r[0][0]) is None
    # LayerCAM's relu(G) keeps only the positive gradient of each pair: no cancellation
    assert all((r > 0.4).all() for r in out.signal_ratio["layercam"])
    assert all(np.isnan(r).all() for r in out.signal_ratio["eigencam"])
    assert all((r == 1.0).all() for r in out.signal_ratio["fem"])  # activations only, all positive


def test_explain_ratio_with_smoothing() -> None:
    """aug_smooth: minimum over the six copies (the flipped ones of image 0 cancel);
    eigen_smooth: nan for the methods it projects, FEM (never smoothed) still checked."""
    session, images = _StubSession(), _stub_images()
    aug = explain(session, images, [[0], [1]], ["hirescam"], aug_smooth=True)
    assert aug.signal_ratio["hirescam"][0][0] < 1e-6 and aug.signal_ratio["hirescam"][1][0] < 1e-6
    eigen = explain(session, images, [[0], [1]], ["hirescam", "gradcam", "fem"], eigen_smooth=True)
    assert np.isnan(np.concatenate(eigen.signal_ratio["hirescam"] + eigen.signal_ratio["gradcam"])).all()
    assert not np.isnan(np.concatenate(eigen.signal_ratio["fem"])).any()


# ONNX Runtime outputs of exported graphs.


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels at each position of an NCHW map (as Swin's stages end)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


#: Scale of the target conv's weights. A LayerNorm's gradient is orthogonal to its centred
#: input up to its eps, so ``sum_c G A`` keeps a residue of about eps / var of the terms:
#: ~2e-4 at this model's natural variance, ~2e-7 (float rounding) once scaled by 30.
LN_SCALE = 30.0


def _layernorm_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        _ChannelLayerNorm(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    with torch.no_grad():
        model[2].weight.mul_(LN_SCALE)
        model[2].bias.mul_(LN_SCALE)
        nn.init.normal_(model[3].norm.weight, 1.0, 0.5)  # a non-trivial affine part
        nn.init.normal_(model[3].norm.bias, 0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def layernorm_session(tmp_path_factory) -> GraphSession:
    from camserve.export import export_model

    out = tmp_path_factory.mktemp("layernorm-export")
    export_model(_layernorm_model(), ["2"], out, input_size=INPUT, labels=list("abcde"), model_name="ln")
    return GraphSession(out, intra_op_threads=1)


@pytest.fixture(scope="module")
def tiny_session(tmp_path_factory) -> GraphSession:
    return GraphSession(tiny_export(tmp_path_factory.mktemp("tiny")), intra_op_threads=1)


def _images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, INPUT, INPUT)).astype(np.float32)


def test_layernorm_target_hirescam_is_degenerate(layernorm_session: GraphSession) -> None:
    methods = ["hirescam", "gradcam", "layercam", "eigencam"]
    out = explain(layernorm_session, _images(), [[0], [1, 2], TopK(2)], methods)
    for name in methods:
        print(name, [r.tolist() for r in out.signal_ratio[name]])
    hires = np.concatenate(out.signal_ratio["hirescam"])
    assert hires.shape == (5,) and (hires < DEGENERATE_RATIO / 10).all(), hires
    for r in hires:
        reason = degenerate_reason(r)
        assert reason is not None and f"{r:.1e}" in reason and "1e-04" in reason
    # the same layer is fine for methods whose terms do not cancel
    for name in ("gradcam", "layercam"):
        assert (np.concatenate(out.signal_ratio[name]) > 1e-2).all(), name
    assert np.isnan(np.concatenate(out.signal_ratio["eigencam"])).all()


def test_normal_model_ratios_are_well_above_threshold(tiny_session: GraphSession) -> None:
    methods = ["hirescam", "gradcam", "layercam", "eigencam"]
    out = explain(tiny_session, _images(), [[0], [1, 4], TopK(2)], methods)
    for name in methods:
        print(name, [r.tolist() for r in out.signal_ratio[name]])
        assert [r.shape for r in out.signal_ratio[name]] == [(1,), (2,), (2,)]
    for name in ("hirescam", "gradcam", "layercam"):
        ratios = np.concatenate(out.signal_ratio[name])
        assert (ratios > 100 * DEGENERATE_RATIO).all(), (name, ratios)
        assert all(degenerate_reason(r) is None for r in ratios)
    assert np.isnan(np.concatenate(out.signal_ratio["eigencam"])).all()


def test_served_answer_audit_summary_and_counter_say_degenerate(layernorm_session: GraphSession, tiny_session) -> None:
    """Through the request pipeline: the answer's summary, the audit record and the counter."""
    import json

    from _server_fixture import png_bytes, sample_image
    from camserve.pipeline.metrics import DEGENERATE, Recorder
    from camserve.pipeline.request import Request
    from camserve.pipeline.service import Service

    seen: list[tuple[str, float, list[str]]] = []

    class Cache:  # TorchServe's context.metrics, recording what the worker would emit
        def get_metric(self, name, _kind):
            return type("M", (), {"add_or_update": lambda _s, value, dims: seen.append((name, value, dims))})()

    records: list[dict] = []
    service = Service(layernorm_session, recorder=Recorder(Cache(), "ln", "1.0"), hooks=[records.append])
    body = png_bytes(sample_image(4))
    (response,) = service.handle([Request({"body": body}, "r1", explain_route=True,
                                          header_params="methods=hirescam,gradcam&target=topk&topk=2&output=summary")])
    assert response.status == 200, response.body[:300]
    explanations = json.loads(response.body)["images"][0]["explanations"]
    by_method = {m: [e["summary"] for e in explanations if e["method"] == m] for m in ("hirescam", "gradcam")}
    assert [s["degenerate"] for s in by_method["hirescam"]] == [True, True]
    assert all("cancel" in s["degenerate_reason"] and s["signal_ratio"] < DEGENERATE_RATIO for s in by_method["hirescam"])
    assert [s["degenerate"] for s in by_method["gradcam"]] == [False, False]
    assert all(s["degenerate_reason"] is None and s["signal_ratio"] > 1e-2 for s in by_method["gradcam"])
    audited = [e["summary"] for e in records[0]["images"][0]["explanations"] if e["method"] == "hirescam"]
    assert [s["degenerate"] for s in audited] == [True, True] and audited[0]["degenerate_reason"]
    assert [(v, d) for n, v, d in seen if n == DEGENERATE] == [(2, ["ln", "1.0", "hirescam"])]

    plain = Service(tiny_session, recorder=Recorder(Cache(), "tiny", "1.0"))
    seen.clear()
    (ok,) = plain.handle([Request({"body": body}, "r2", explain_route=True, header_params="methods=hirescam,eigencam")])
    summaries = [e["summary"] for e in json.loads(ok.body)["images"][0]["explanations"]]
    assert [s["degenerate"] for s in summaries] == [False, False] and summaries[1]["signal_ratio"] is None
    assert not any(n == DEGENERATE for n, _v, _d in seen)
