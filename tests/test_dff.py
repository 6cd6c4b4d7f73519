"""Deep Feature Factorization (camserve.cam.dff) against pytorch-grad-cam 1.5.7's as the oracle."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from camserve.cam.dff import (DEFAULT_COMPONENTS, concept_scores, factorize, top_classes)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _scale_like_oracle(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch_grad_cam.utils.image.scale_cam_image on [k, h, w]: min-max, then cv2 resize."""
    import cv2

    out = []
    for m in maps:
        m = m - np.min(m)
        m = m / (1e-7 + np.max(m))
        out.append(cv2.resize(np.float32(m), size, interpolation=cv2.INTER_LINEAR))
    return np.float32(out)


@pytest.fixture(scope="module")
def resnet50_case():
    """resnet50 (random weights, seed 0), one 224 px image, and its layer4 activations."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    image = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32))
    return model, image


@pytest.mark.parametrize("n_components", [4, DEFAULT_COMPONENTS])
def test_parity_with_pytorch_grad_cam(resnet50_case, n_components):
    torch = pytest.importorskip("torch")
    from pytorch_grad_cam import DeepFeatureFactorization

    model, image = resnet50_case
    captured = []
    # Taken in the oracle's own forward pass, before it writes NaN -> 0 into its copy.
    handle = model.layer4.register_forward_hook(
        lambda m, i, o: captured.append(o.detach().numpy().astype(np.float32, copy=True)))
    oracle = DeepFeatureFactorization(model=model, target_layer=model.layer4,
                                      computation_on_concepts=model.fc)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the oracle's NMF ConvergenceWarning
            o_concepts, o_explanations, o_outputs = oracle(image, n_components)
    finally:
        handle.remove()
        oracle.activations_and_grads.release()
    activations = captured[0]
    assert activations.shape == (1, 2048, 7, 7)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        concepts, maps = factorize(activations, n_components)
    assert not caught, [str(w.message) for w in caught]  # ConvergenceWarning kept local
    assert concepts.shape == (1, 2048, n_components) and concepts.dtype == np.float32
    assert maps.shape == (1, n_components, 7, 7) and maps.dtype == np.float32
    # The oracle's NMF runs in the input's dtype: float32 here, as ours.
    assert o_concepts.dtype == np.float32

    # (a) concepts [C, k]
    assert np.abs(concepts[0] - o_concepts).max() <= 1e-4
    # (b) maps, scaled and resized as the oracle does
    o_explanations = np.stack(o_explanations)
    assert o_explanations.shape == (1, n_components, 224, 224)
    assert np.abs(_scale_like_oracle(maps[0], (224, 224)) - o_explanations[0]).max() <= 1e-4
    # (c) concept scores: the oracle returns raw head outputs [k, K]
    scores = concept_scores(concepts, lambda x: model.fc(torch.from_numpy(x)).detach().numpy())
    assert scores.shape == (1, n_components, 1000) and scores.dtype == np.float32
    assert np.abs(scores[0] - _softmax(o_outputs)).max() <= 1e-5

    idx, probs = top_classes(scores, 2)
    assert idx.shape == probs.shape == (1, n_components, 2)
    np.testing.assert_array_equal(idx[0], np.argsort(-o_outputs, axis=-1, kind="stable")[:, :2])
    assert np.all(probs[..., 0] >= probs[..., 1])


def _activations(n: int, seed: int = 0) -> np.ndarray:
    """Small post-ReLU-like activations [n, 32, 6, 6] with an all-positive channel (offset != 0)."""
    a = np.maximum(np.random.default_rng(seed).standard_normal((n, 32, 6, 6)), 0).astype(np.float32)
    a[:, 3] += 0.5
    return a


def test_each_image_factorized_on_its_own():
    batch = _activations(2)
    concepts, maps = factorize(batch, 4)
    alone_c, alone_m = factorize(batch[:1], 4)
    np.testing.assert_array_equal(concepts[:1], alone_c)
    np.testing.assert_array_equal(maps[:1], alone_m)
    # Changing image 1 leaves image 0 alone.
    other = batch.copy()
    other[1] = _activations(1, seed=5)[0]
    np.testing.assert_array_equal(factorize(other, 4)[0][0], concepts[0])

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((32, 10)).astype(np.float32)
    scores = concept_scores(concepts, lambda x: x @ weight)
    np.testing.assert_allclose(scores[:1], concept_scores(alone_c, lambda x: x @ weight), atol=1e-6)
    np.testing.assert_allclose(scores.sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 37, 2.0])
def test_bad_n_components_raises_naming_value(bad):
    # C=32, h*w=36: valid is 1..32.
    with pytest.raises(ValueError, match=repr(bad)):
        factorize(_activations(1), bad)


def test_input_not_modified_and_nan_read_as_zero():
    a = _activations(1)
    a[0, 2, 1, 1] = np.nan
    before = a.copy()
    concepts, maps = factorize(a, 3)
    np.testing.assert_array_equal(a, before)  # NaN still in place
    assert np.isnan(a[0, 2, 1, 1])
    zeroed = np.nan_to_num(before, nan=0.0)
    c0, m0 = factorize(zeroed, 3)
    np.testing.assert_array_equal(concepts, c0)
    np.testing.assert_array_equal(maps, m0)
    assert np.isfinite(concepts).all() and (maps >= 0).all()


def test_top_classes_order_and_bad_top_k():
    scores = np.array([[[0.1, 0.5, 0.4], [0.3, 0.3, 0.4]]], dtype=np.float32)
    idx, probs = top_classes(scores, 2)
    np.testing.assert_array_equal(idx, [[[1, 2], [2, 0]]])
    np.testing.assert_array_equal(probs, np.float32([[[0.5, 0.4], [0.4, 0.3]]]))
    with pytest.raises(ValueError, match="top_k=4"):
        top_classes(scores, 4)
