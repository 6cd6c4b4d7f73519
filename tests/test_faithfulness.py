"""Issue 14: faithfulness metrics (ROAD, CAM-multiplied confidence change) against
pytorch-grad-cam 1.5.7, and their meaning on a model that really looks at the object."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camserve import faithfulness
from camserve.errors import InputError
from camserve.faithfulness import road

pgc_road = pytest.importorskip("pytorch_grad_cam.metrics.road")
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange, DropInConfidence, IncreaseInConfidence  # noqa: E402
from pytorch_grad_cam.metrics.perturbation_confidence import RemoveMostRelevantFirst  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget  # noqa: E402


def _blobs(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth maps in [0, 1] with a random bright blob each (plus texture, so no ties)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(0, size, 2)
        m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 5) ** 2)) + 0.05 * rng.random((size, size))
        out.append((m - m.min()) / (m.max() - m.min()))
    return np.asarray(out, dtype=np.float32)


@pytest.fixture
def no_pgc_noise(monkeypatch):
    """pytorch-grad-cam's imputer with its noise off (its ROAD classes build it with 0.01)."""
    monkeypatch.setattr(pgc_road.NoisyLinearImputer.__init__, "__defaults__", (0.0, pgc_road.neighbors_weights))


@pytest.mark.parametrize("percentile, morf", [(10, True), (50, True), (90, False), (30, False)])
def test_keep_masks_match_the_oracle(percentile, morf):
    cams = _blobs(3, 40, seed=percentile)
    ours = road.keep_masks(cams, percentile, morf)
    for cam, keep in zip(cams, ours):
        values = torch.from_numpy(cam if morf else 1 - cam)
        expected = (values < np.percentile(values.numpy(), percentile)).numpy()
        np.testing.assert_array_equal(keep, expected)
        assert abs(keep.mean() - percentile / 100) < 0.02  # p % of the pixels are kept


@pytest.mark.parametrize("morf", [True, False])
def test_keep_masks_keep_the_percentile_where_values_tie(morf):
    """A ReLU'd map, 0 on 60 % of the pixels: pytorch-grad-cam's threshold would keep no pixel
    at p = 10..60 (MoRF); ours keeps exactly p %, the lowest values first, ties scattered."""
    cam = _blobs(1, 50, seed=4)
    cam[cam < np.percentile(cam, 60)] = 0.0
    values = cam[0] if morf else 1 - cam[0]
    for percentile in road.PERCENTILES:
        keep = road.keep_masks(cam, percentile, morf)[0]
        assert keep.sum() == road.kept_count(values.size, percentile)
        assert values[keep].max() <= values[~keep].min()  # the order of relevance is kept
    keep = road.keep_masks(cam, 20, True)[0]
    rows = np.flatnonzero(keep.any(axis=1))
    assert rows.max() - rows.min() > 40  # ties broken over the whole image, not the top rows
    np.testing.assert_array_equal(keep, road.keep_masks(cam, 20, True)[0])  # and reproducibly


@pytest.mark.parametrize("percentile", [10, 40, 90])
def test_imputation_matches_the_oracle_without_noise(percentile):
    rng = np.random.default_rng(percentile)
    image = rng.standard_normal((3, 48, 56)).astype(np.float32)
    cam = _blobs(1, 56, seed=1)[0][:48]
    keep = road.keep_masks(cam[None], percentile, True)[0]
    keep[0, :] = False  # removed pixels on the border too (weights renormalized there)
    ours = road.impute_one(image, keep, noise=0.0)
    theirs = pgc_road.NoisyLinearImputer(noise=0.0)(torch.from_numpy(image), torch.from_numpy(keep.astype(np.float32))).numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=0)
    np.testing.assert_array_equal(ours[:, keep], image[:, keep])  # kept pixels untouched
    assert np.abs(ours - image)[:, ~keep].mean() > 0.1  # removed pixels really changed


def test_imputation_noise_statistics():
    rng = np.random.default_rng(7)
    image = rng.standard_normal((3, 64, 64)).astype(np.float32)
    keep = road.keep_masks(_blobs(1, 64, seed=3), 50, True)[0]
    clean = road.impute_one(image, keep, noise=0.0)
    noisy = road.impute_one(image, keep, noise=road.NOISE, seed=11)
    delta = (noisy - clean)[:, ~keep]
    assert abs(delta.mean()) < 1e-3 and abs(delta.std() - road.NOISE) < 1e-3
    np.testing.assert_array_equal(noisy[:, keep], image[:, keep])  # noise on imputed pixels only
    again = road.impute_one(image, keep, noise=road.NOISE, seed=11)
    np.testing.assert_array_equal(noisy, again)  # a fixed seed gives the same scores
    batch, ok = road.impute(np.stack([image, image]), np.stack([keep, np.zeros_like(keep)]), seed=11)
    np.testing.assert_array_equal(batch[0], noisy)  # a row does not depend on its batch
    assert ok.tolist() == [True, False]  # nothing kept: undefined, not a crash


def test_parse_metrics_names_the_bad_one():
    assert faithfulness.parse_metrics("road, Drop,road") == ("road", "drop")
    with pytest.raises(InputError, match="'roadd'"):
        faithfulness.parse_metrics("roadd")
    with pytest.raises(InputError, match="empty"):
        faithfulness.parse_metrics("road,,drop")
    assert faithfulness.forward_cost(("road", "drop")) == 19 and faithfulness.forward_cost(("road_morf",)) == 9


@pytest.fixture(scope="module")
def resnet50_export(tmp_path_factory):
    """resnet50 with random weights and randomized BatchNorm statistics (so the softmax is
    not flat and the metrics move), exported at 64 px."""
    import torchvision

    from camserve.export import export_model
    from test_extra_methods import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet50(weights=None), seed=0).eval()
    out = tmp_path_factory.mktemp("resnet50-faith")
    export_model(model, ["layer4.-1"], out, input_size=64, model_name="resnet50", check=False)
    return out, model


def test_forward_graph_is_the_explain_graphs_forward(resnet50_export):
    from camserve.pipeline.runtime import GraphSession

    out, _ = resnet50_export
    session = GraphSession(out, intra_op_threads=2)
    assert session.manifest.forward_graph_file == "forward.onnx" and (out / "forward.onnx").is_file()
    assert [i.name for i in session.forward.get_inputs()] == ["image"]
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(session.forward_logits(images), session.run(images).logits)


def test_scores_match_the_oracle_on_resnet50(resnet50_export, no_pgc_noise):
    from camserve.pipeline.runtime import GraphSession

    out, model = resnet50_export
    session = GraphSession(out, intra_op_threads=2)
    rng = np.random.default_rng(5)
    images = rng.standard_normal((3, 3, 64, 64)).astype(np.float32)
    cams = _blobs(3, 64, seed=9)
    classes = session.run(images).logits.argmax(1)
    ours = faithfulness.score_maps(session.forward_logits, images, cams, classes, faithfulness.METRIC_NAMES, noise=0.0)
    x = torch.from_numpy(images)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    torch.set_num_threads(2)
    expected = {
        "road": pgc_road.ROADCombined()(x, cams, targets, model),
        "road_morf": pgc_road.ROADMostRelevantFirstAverage()(x, cams, targets, model),
        "road_lerf": pgc_road.ROADLeastRelevantFirstAverage()(x, cams, targets, model),
        "confidence_change": CamMultImageConfidenceChange()(x, cams, targets, model),
        "drop": DropInConfidence()(x, cams, targets, model),
        "increase": IncreaseInConfidence()(x, cams, targets, model),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(ours[name], np.asarray(value, dtype=np.float64).ravel(), atol=2e-5, rtol=1e-3, err_msg=name)
    # the figures are not trivially zero on this model: the test can tell a wrong removal
    assert np.abs(ours["road_morf"]).max() > 1e-3 and np.abs(ours["confidence_change"]).max() > 1e-3
    single = RemoveMostRelevantFirst(50, pgc_road.NoisyLinearImputer(noise=0.0))(x[0], torch.from_numpy(cams[0])).numpy()
    keep = road.keep_masks(cams[:1], 50, True)[0]
    np.testing.assert_allclose(road.impute_one(images[0], keep, noise=0.0), single, atol=2e-5)


def test_constant_map_scores_zero_road(resnet50_export):
    """A constant map orders no pixel before another: MoRF and LeRF remove the same
    (scattered) pixels, so ROADCombined is exactly 0, not NaN as in pytorch-grad-cam."""
    from camserve.pipeline.runtime import GraphSession

    session = GraphSession(resnet50_export[0], intra_op_threads=2)
    images = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    cams = np.stack([np.zeros((64, 64), np.float32), _blobs(1, 64, seed=2)[0]])
    top = session.forward_logits(images).argmax(1)
    scores = faithfulness.score_maps(session.forward_logits, images, cams, top, ["road", "drop"])
    assert scores["road"][0] == 0.0 and scores["road_morf"][0] < 0 and np.isfinite(scores["road"][1])
    assert set(scores) == {"road", "road_morf", "road_lerf", "drop"}
    with pytest.raises(InputError, match="cams"):
        faithfulness.score_maps(session.forward_logits, images, cams[:1], np.array([1, 2]), ["drop"])


def test_morf_drops_the_true_class_more_than_lerf_on_the_shapes_cnn():
    """A faithful map: removing its most relevant pixels hurts the true class more than
    removing its least relevant ones (GradCAM of the trained shapes CNN, held-out images)."""
    from camserve.cam import explain
    from camserve.demo import shapes as demo
    from camserve.pipeline.runtime import GraphSession
    from _shapes_fixture import exported_shapes, trained_shapes

    _, info = trained_shapes()
    directory, manifest = exported_shapes()
    session = GraphSession(directory, intra_op_threads=2)
    data = demo.make_shapes(60, seed=4242, size=info.input_size)
    images = demo.normalize(data.images, manifest.mean, manifest.std)
    labels = np.asarray(data.labels, dtype=np.int64)
    result = explain(session, images, [[int(c)] for c in labels], ["gradcam"])
    cams = np.concatenate(result.cams["gradcam"], axis=0)
    scores = faithfulness.score_maps(session.forward_logits, images, cams, labels, ["road"], base_logits=result.logits)
    morf_worse = scores["road_morf"] < scores["road_lerf"]
    assert morf_worse.mean() >= 0.9, f"MoRF below LeRF on {morf_worse.mean():.0%} of 60 images"
    # and a map that points elsewhere (another image's) is less faithful on average
    shuffled = faithfulness.score_maps(session.forward_logits, images, np.roll(cams, 1, axis=0), labels, ["road"],
                                       base_logits=result.logits)
    assert np.nanmean(shuffled["road"]) < np.nanmean(scores["road"])
