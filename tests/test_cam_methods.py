"""Fast checks of camserve.cam: math against pytorch-grad-cam on random arrays, layouts,
resizing, targets, errors, and explain() on a tiny CNN (no exported graph needed)."""

from __future__ import annotations

import types

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import camserve.cam as cam
from camserve.cam import TopK, available_methods, explain, get_method
from camserve.cam.layouts import to_nchw
from camserve.cam.projection import first_component, kernel_first_component
from camserve.cam.scaling import combine_layers, resize_maps
from camserve.cam.targets import expand_targets, finer_cotangent
from camserve.errors import InputError
from camserve.manifest import LayerSpec

import pytorch_grad_cam as pgc
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection, get_2d_projection_kernel

from cam_reference import REFERENCE_CLASSES, TorchSession

RNG = np.random.default_rng(7)
PURE = ["gradcam", "hirescam", "gradcamelementwise", "gradcam++", "xgradcam", "layercam", "eigencam", "eigengradcam", "kpcacam", "fem"]


def _arrays(n: int = 3, c: int = 32, h: int = 5, w: int = 6) -> tuple[np.ndarray, np.ndarray]:
    a = np.maximum(RNG.standard_normal((n, c, h, w)), -0.2).astype(np.float32)
    g = (RNG.standard_normal((n, c, h, w)) * 1e-2).astype(np.float32)
    return a, g


def _reference_raw(name: str, a: np.ndarray, g: np.ndarray, eigen_smooth: bool) -> np.ndarray:
    """pytorch-grad-cam's get_cam_image on arrays (instance made without a model)."""
    ref = object.__new__(REFERENCE_CLASSES[name])
    ref.k, ref.kernel, ref.gamma = 2, "sigmoid", None
    ref.activations_and_grads = types.SimpleNamespace(release=lambda: None)  # its __del__ calls this
    return ref.get_cam_image(None, None, None, a, g, eigen_smooth)


def test_registry_lists_every_method_once() -> None:
    names = available_methods()
    assert names == list(cam.REGISTRY) and len(set(names)) == len(names) == 19
    # the methods of extra graphs and DFF are checked against the oracle in test_extra_methods.py
    extras = {n for n in names if get_method(n).extra or get_method(n).source == "dff"}
    assert extras == {"fullgrad", "shapleycam", "guidedbackprop", "guidedgradcam", "dff"}
    assert set(names) - extras == set(REFERENCE_CLASSES)
    assert get_method(" GradCAM++ ").name == "gradcam++"


@pytest.mark.parametrize("bad", ["gradcam+", "", 3, None])
def test_unknown_method_names_the_value(bad: object) -> None:
    with pytest.raises(InputError) as err:
        get_method(bad)
    assert repr(bad) in str(err.value) and "gradcam++" in str(err.value)


@pytest.mark.parametrize("name", PURE)
@pytest.mark.parametrize("eigen_smooth", [False, True])
def test_raw_maps_equal_pytorch_grad_cam(name: str, eigen_smooth: bool) -> None:
    a, g = _arrays()
    ours = get_method(name).function(a, g, eigen_smooth and get_method(name).eigen_smooth)
    ref = _reference_raw(name, a, g, eigen_smooth)
    assert ours.shape == (3, 5, 6) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("name", PURE)
def test_raw_maps_from_channels_last_views(name: str) -> None:
    """Methods take NCHW views of NHWC / token memory without a copy and give the same maps."""
    a, g = _arrays(2, 16, 4, 4)
    spec = LayerSpec("t", "tokens", (17, 16), grid=(4, 4), prefix_tokens=1)
    tok = lambda x: np.concatenate([np.ones((2, 1, 16), np.float32), x.reshape(2, 16, 16).transpose(0, 2, 1)], axis=1)  # noqa: E731
    fn = get_method(name).function
    np.testing.assert_allclose(fn(to_nchw(tok(a), spec), to_nchw(tok(g), spec)), fn(a, g), rtol=1e-5, atol=1e-6)


def test_projections_equal_reference_including_sign() -> None:
    for shape in [(4, 64, 7, 7), (2, 768, 14, 14), (3, 8, 15, 15)]:
        x = RNG.standard_normal(shape).astype(np.float32)
        x[0, 0, 0, 0] = np.nan
        np.testing.assert_allclose(first_component(x), get_2d_projection(x), atol=2e-5 * np.nanmax(np.abs(x)) * shape[1] ** 0.5)
    for shape in [(2, 32, 7, 7), (2, 16, 15, 15)]:  # 225 positions: scikit-learn switches to ARPACK
        x = RNG.standard_normal(shape).astype(np.float32)
        ref = get_2d_projection_kernel(x)
        np.testing.assert_allclose(kernel_first_component(x), ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("src,dst", [((7, 7), (224, 224)), ((4, 6), (128, 96)), ((14, 14), (224, 224)), ((9, 9), (5, 7)), ((1, 3), (8, 8))])
def test_resize_equals_cv2_inter_linear(src: tuple[int, int], dst: tuple[int, int]) -> None:
    maps = RNG.random((5, *src)).astype(np.float32)
    ours = resize_maps(maps, dst)
    ref = np.stack([cv2.resize(m, (dst[1], dst[0]), interpolation=cv2.INTER_LINEAR) for m in maps])
    assert ours.shape == (5, *dst)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_align_corners_resize_equals_torch() -> None:
    maps = RNG.random((2, 3, 4, 5)).astype(np.float32)
    ref = torch.nn.UpsamplingBilinear2d(size=(33, 21))(torch.from_numpy(maps)).numpy()
    np.testing.assert_allclose(resize_maps(maps, (33, 21), align_corners=True), ref, atol=1e-6)


def test_layer_combination_equals_pytorch_grad_cam() -> None:
    raw = [RNG.standard_normal((3, 4, 4)).astype(np.float32), RNG.standard_normal((3, 7, 5)).astype(np.float32)]
    per_layer = [scale_cam_image(np.maximum(r, 0), (40, 48))[:, None] for r in raw]
    ref = scale_cam_image(np.maximum(np.concatenate(per_layer, axis=1), 0).mean(axis=1))
    ours = combine_layers(raw, (48, 40))
    assert ours.shape == (3, 48, 40) and ours.dtype == np.float32 and ours.min() >= 0 and ours.max() <= 1
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_layouts_and_shape_errors() -> None:
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    assert to_nchw(x, LayerSpec("a", "NCHW", (3, 4, 5))) is x
    np.testing.assert_array_equal(to_nchw(x.transpose(0, 2, 3, 1), LayerSpec("b", "NHWC", (4, 5, 3))), x)
    tokens = np.concatenate([np.zeros((2, 2, 3), np.float32), x.reshape(2, 3, 20).transpose(0, 2, 1)], axis=1)
    np.testing.assert_array_equal(to_nchw(tokens, LayerSpec("c", "tokens", (22, 3), grid=(4, 5), prefix_tokens=2)), x)
    with pytest.raises(InputError, match=r"'a'.*\[2, 3, 4, 5\].*\[2, 3, 5, 4\]"):
        to_nchw(x.transpose(0, 1, 3, 2), LayerSpec("a", "NCHW", (3, 4, 5)))


def test_targets_expand_and_errors_name_the_value() -> None:
    rows = expand_targets([[2, 0], TopK(2)], 2, 5)
    assert rows.image.tolist() == [0, 0, 1, 1] and rows.cls.tolist() == [2, 0, -1, -1] and rows.rank.tolist() == [-1, -1, 0, 1]
    logits = np.array([[0, 1, 2, 3, 4], [5, 9, 1, 7, 0]] * 2, np.float32)[[0, 0, 1, 1]]
    assert rows.resolve(logits).tolist() == [2, 0, 1, 3]
    cases = [
        ([[5]], 1, r"class index 5 is out of range \[0, 5\)"),
        ([[-1]], 1, "class index -1"),
        ([[]], 1, r"non-empty.*\[\]"),
        ([[1.5]], 1, "1.5 is not an integer"),
        ([[True]], 1, "True is not an integer"),
        ([TopK(6)], 1, r"TopK\(6\)"),
        ([[1]], 2, "1 entries for 2 images"),
        (TopK(1), 1, "TopK"),
    ]
    for targets, n, pattern in cases:
        with pytest.raises(InputError, match=pattern):
            expand_targets(targets, n, 5)
    with pytest.raises(InputError, match="got 0"):
        TopK(0)


def test_resolve_top_class_equals_the_stable_sort_with_ties_and_nan() -> None:
    """Rows that ask only for the top class take argmax; it must pick what the stable sort's
    first column picks (lowest index of a tie, signed zeros equal); a NaN logit or a deeper
    rank keeps the sort."""
    rng = np.random.default_rng(3)
    logits = rng.integers(0, 4, (64, 9)).astype(np.float32)  # many ties
    logits[0] = [0.0, -0.0, 0.0, -0.0, -1, -1, -1, -1, -1]
    for targets in ([TopK(1)] * 64, [TopK(3)] * 64, [TopK(1), [4]] * 32):
        rows = expand_targets(targets, 64, 9)
        per_row = logits[rows.image]
        order = np.argsort(-per_row, axis=1, kind="stable")
        expected = np.where(rows.cls >= 0, rows.cls, order[np.arange(len(rows)), np.maximum(rows.rank, 0)])
        assert rows.resolve(per_row).tolist() == expected.tolist()
    with_nan = logits.copy()
    with_nan[5, 2] = np.nan
    rows = expand_targets([TopK(1)] * 64, 64, 9)
    expected = np.argsort(-with_nan, axis=1, kind="stable")[:, 0]
    assert rows.resolve(with_nan).tolist() == expected.tolist()
    assert expand_targets([[7], [1]], 2, 9).resolve(logits[:2]).tolist() == [7, 1]


def test_finer_cotangent_is_the_gradient_of_finer_weighted_target() -> None:
    logits = RNG.standard_normal((4, 10)).astype(np.float32) * 3
    main = np.array([3, 0, 9, 5])
    ours = finer_cotangent(logits, main)
    for r in range(4):
        z = torch.tensor(logits[r], dtype=torch.float64, requires_grad=True)
        order = np.argsort(np.abs(logits[r] - logits[r, main[r]]))
        target = FinerWeightedTarget(int(main[r]), [int(i) for i in order[1:4]], 1.0)
        (grad,) = torch.autograd.grad(target(z), z)
        np.testing.assert_allclose(ours[r], grad.numpy(), rtol=1e-4, atol=1e-6)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny() -> TorchSession:
    return TorchSession(_Tiny(), ["features.3"], [LayerSpec("features.3", "NCHW", (16, 8, 8))], 16, 6)


def test_explain_shapes_ranges_and_one_run(tiny: TorchSession) -> None:
    images = RNG.standard_normal((3, 3, 16, 16)).astype(np.float32)
    tiny.calls.clear()
    grad_family = [n for n in available_methods() if get_method(n).source in ("gradients", "activations")]
    out = explain(tiny, images, [[1], TopK(2), [0, 5, 2]], grad_family)
    assert tiny.calls == [("run", 6)]
    assert out.logits.shape == (3, 6) and out.logits.dtype == np.float32
    top = np.argsort(-out.logits[1])[:2].tolist()
    assert out.classes == [[1], top, [0, 5, 2]]
    assert set(out.cams) == set(grad_family) and {"inference", "cam"} <= set(out.timings)
    for maps in out.cams.values():
        assert [m.shape for m in maps] == [(1, 16, 16), (2, 16, 16), (3, 16, 16)]
        for m in maps:
            assert m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1 + 1e-6
    # different targets give different gradient CAMs; activation-only CAMs do not depend on them
    assert not np.allclose(out.cams["gradcam"][2][0], out.cams["gradcam"][2][1])
    np.testing.assert_array_equal(out.cams["eigencam"][2][0], out.cams["eigencam"][2][1])


def test_explain_activation_only_needs_one_forward(tiny: TorchSession) -> None:
    tiny.calls.clear()
    explain(tiny, np.zeros((2, 3, 16, 16), np.float32), [[1, 2], TopK(3)], ["eigencam", "fem"])
    assert tiny.calls == [("run", 2)]


def test_explain_errors_name_the_value(tiny: TorchSession) -> None:
    images = np.zeros((2, 3, 16, 16), np.float32)
    with pytest.raises(InputError, match=r"'nope'"):
        explain(tiny, images, [[1], [1]], ["gradcam", "nope"])
    with pytest.raises(InputError, match=r"\[2, 3, 15, 16\]"):
        explain(tiny, images[:, :, 1:], [[1], [1]], ["gradcam"])
    with pytest.raises(InputError, match="class index 6"):
        explain(tiny, images, [[1], [6]], ["gradcam"])
    with pytest.raises(InputError, match="'gradcam'"):
        explain(tiny, images, [[1], [1]], "gradcam")
    with pytest.raises(InputError, match="batch of 0"):
        explain(tiny, images[:0], [], ["gradcam"])


def test_augment_stacks_copies_and_deaugment_undoes_flips() -> None:
    from camserve.cam.augment import AUGMENTATIONS, augment, deaugment_mean

    images = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    stacked = augment(images)
    assert stacked.shape == (12, 3, 4, 5) and AUGMENTATIONS[0] == (False, 1.0)
    np.testing.assert_array_equal(stacked[:2], images)
    for a, (flip, factor) in enumerate(AUGMENTATIONS):
        expected = (images[..., ::-1] if flip else images) * np.float32(factor)
        np.testing.assert_allclose(stacked[2 * a : 2 * a + 2], expected, rtol=1e-6)
    # a flip-equivariant "CAM" (channel 0 of each copy) is flipped back before the mean
    mean_factor = np.mean([f for _, f in AUGMENTATIONS])
    np.testing.assert_allclose(deaugment_mean(stacked[:, 0]), images[:, 0] * mean_factor, rtol=1e-5, atol=1e-6)


def test_ablation_value_rule() -> None:
    from camserve.cam.runs import ablation_values

    acts = np.stack([np.maximum(RNG.standard_normal((4, 3)), 0), RNG.standard_normal((4, 3)) - 5]).astype(np.float32)
    values = ablation_values(acts)
    assert values[0] == 0 and values[1] == np.float32(acts[1].min() - 1e7)


def test_model_run_methods_batch_their_runs(tiny: TorchSession) -> None:
    """ScoreCAM: N x C masked images in batches of 32 shared by an image's targets;
    AblationCAM: N x C head runs in batches of 64; FinerCAM: one extra run."""
    images = RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)
    tiny.calls.clear()
    out = explain(tiny, images, [[1, 2], [3]], ["scorecam"])
    assert tiny.calls == [("run", 2)] + [("logits", 32)] * 1  # 2 images x 16 channels
    tiny.calls.clear()
    explain(tiny, images, [[1, 2], [3]], ["ablationcam", "finercam"])
    assert tiny.calls == [("run", 2), ("head", 32), ("run", 3)]
    assert [m.shape for m in out.cams["scorecam"]] == [(2, 16, 16), (1, 16, 16)]


def test_gradcam_plus_plus_weights_are_the_literal_formula_bit_for_bit() -> None:
    """The in-place weights equal the oracle's expression, zeros of the gradient included."""
    from camserve.cam.methods import gradcam_plus_plus_weights

    for scale in (1e-6, 1e-3, 1.0):
        a = np.maximum(RNG.standard_normal((3, 32, 5, 5), dtype=np.float32), 0)
        g = RNG.standard_normal((3, 32, 5, 5), dtype=np.float32) * np.float32(scale)
        g[RNG.random(g.shape) < 0.2] = 0
        g2 = g * g
        alpha = g2 / (2.0 * g2 + a.sum(axis=(2, 3), keepdims=True) * (g2 * g) + 1e-6)
        literal = (np.maximum(g, 0) * np.where(g != 0, alpha, 0.0)).sum(axis=(2, 3))
        np.testing.assert_array_equal(gradcam_plus_plus_weights(a, g), literal)


def test_one_layer_combination_is_the_general_formula_to_the_bit() -> None:
    """combine_layers' one-layer path (no stack, ReLU or mean) equals the general formula."""
    from camserve.cam.scaling import combine_layers, minmax, scale_layer

    rng = np.random.default_rng(7)
    for shape in [(1, 7, 7), (5, 14, 14), (2, 1, 1)]:
        raw = rng.standard_normal(shape).astype(np.float32)
        general = minmax(np.maximum(np.stack([scale_layer(raw, (64, 48))], axis=1), 0).mean(axis=1))
        got = combine_layers([raw], (64, 48))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, general)
