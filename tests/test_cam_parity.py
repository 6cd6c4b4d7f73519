"""Parity of camserve.cam.explain with pytorch-grad-cam on real architectures.

Activations and gradients come from PyTorch autograd through ``TorchSession`` (the graph
contract computed by torch), so these tests check all CAM math and explain()'s row,
target and smoothing logic; ``test_cam_e2e.py`` repeats a subset on exported ONNX graphs.
Random weights with fixed seeds; ViT's zero head is re-initialized. Tolerance: max abs
difference 1e-4 between the final [0, 1] maps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from camserve.cam import TopK, explain
from camserve.manifest import LayerSpec

from cam_reference import SmallReLU, TorchSession, nhwc_reshape, reference_cams, reinit_zero_linears, vit_reshape

TOL = 1e-4
GRADIENT_FAMILY = ["gradcam", "hirescam", "gradcamelementwise", "gradcam++", "xgradcam", "layercam", "eigencam", "eigengradcam", "kpcacam", "fem"]


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


class Case:
    """A model, its target layers (path + LayerSpec) and pytorch-grad-cam's reshape_transform."""

    def __init__(self, model: nn.Module, layers: Sequence[str], specs: Sequence[LayerSpec], size: int, reshape: Callable | None = None):
        self.model, self.layers, self.size, self.reshape = model.eval(), list(layers), size, reshape
        with torch.no_grad():
            k = model(torch.zeros(1, 3, size, size)).shape[1]
        self.session = TorchSession(model, layers, specs, size, k)

    def compare(self, images: np.ndarray, targets: list, methods: list[str], *, eigen_smooth: bool = False,
                aug_smooth: bool = False, reference_default_targets: bool = False, **ref_kwargs) -> None:
        out = explain(self.session, images, targets, methods, eigen_smooth=eigen_smooth, aug_smooth=aug_smooth)
        row_image = [i for i, cls in enumerate(out.classes) for _ in cls]
        row_class = None if reference_default_targets else [c for cls in out.classes for c in cls]
        for method in methods:
            ours = np.concatenate(out.cams[method])
            ref = reference_cams(method, self.model, self.layers, images, row_image, row_class, reshape=self.reshape,
                                 eigen_smooth=eigen_smooth, aug_smooth=aug_smooth, **ref_kwargs)
            assert ours.shape == ref.shape, method
            assert ref.max() > 0.5, f"{method}: reference CAM is degenerate"
            diff = float(np.abs(ours - ref).max())
            assert diff <= TOL, f"{method} (eigen_smooth={eigen_smooth}, aug_smooth={aug_smooth}): max abs diff {diff:.2e}"


@pytest.fixture(scope="module")
def resnet50() -> Case:
    torch.manual_seed(0)
    return Case(torchvision.models.resnet50(), ["layer4"], [LayerSpec("layer4", "NCHW", (2048, 3, 3))], 96)


@pytest.fixture(scope="module")
def resnet18() -> Case:
    torch.manual_seed(1)
    return Case(torchvision.models.resnet18(num_classes=10), ["layer4"], [LayerSpec("layer4", "NCHW", (512, 3, 3))], 96)


@pytest.mark.slow
@pytest.mark.parametrize("eigen_smooth", [False, True])
def test_resnet50_all_methods_one_and_several_targets(resnet50: Case, eigen_smooth: bool) -> None:
    # eigencam, eigengradcam, kpcacam and fem do not read eigen_smooth; with it the other six
    # share two code paths (projection of weighted activations / of element-wise products)
    methods = ["gradcam", "hirescam"] if eigen_smooth else GRADIENT_FAMILY
    resnet50.compare(_images(2, 96), [[3], [5, 7]], methods, eigen_smooth=eigen_smooth)


@pytest.mark.slow
def test_resnet50_top1_matches_reference_default_target(resnet50: Case) -> None:
    resnet50.compare(_images(2, 96, seed=1), [TopK(1)] * 2, ["gradcam", "eigengradcam"], reference_default_targets=True)


@pytest.mark.slow
@pytest.mark.parametrize("eigen_smooth", [False, True])
def test_finercam(resnet18: Case, eigen_smooth: bool) -> None:
    # resnet18 with 10 classes: with 1000 random-weight classes (resnet50) the logits spread over
    # hundreds, the comparison classes' softmax weights underflow and FinerCAM is all zero.
    images = _images(2, 96, seed=11)
    resnet18.compare(images, [[3], [5, 7]], ["finercam"], eigen_smooth=eigen_smooth)
    resnet18.compare(images, [TopK(1)] * 2, ["finercam"], eigen_smooth=eigen_smooth, reference_default_targets=True)


@pytest.mark.slow
def test_multi_layer_combination() -> None:
    torch.manual_seed(2)
    specs = [LayerSpec("layer3", "NCHW", (256, 8, 8)), LayerSpec("layer4", "NCHW", (512, 4, 4))]
    case = Case(torchvision.models.resnet18(num_classes=10), ["layer3", "layer4"], specs, 128)
    case.compare(_images(2, 128, seed=2), [[1, 2], TopK(2)], ["gradcam", "layercam", "eigencam", "finercam"])


@pytest.mark.slow
@pytest.mark.parametrize("eigen_smooth", [False, True])
def test_aug_smooth(eigen_smooth: bool) -> None:
    # the augmentation logic is model-independent: a small CNN keeps 6 copies x methods cheap
    torch.manual_seed(8)
    case = Case(SmallReLU(), ["features"], [LayerSpec("features", "NCHW", (48, 8, 8))], 32)
    images = _images(2, 32, seed=3)
    case.compare(images, [[1], [2, 4]], ["gradcam", "gradcam++", "hirescam", "eigencam"], aug_smooth=True, eigen_smooth=eigen_smooth)
    # TopK(1): every augmented copy ranks its own logits, like pytorch-grad-cam with targets=None
    case.compare(images, [TopK(1)] * 2, ["gradcam", "xgradcam"], aug_smooth=True, reference_default_targets=True)


@pytest.mark.slow
@pytest.mark.parametrize("eigen_smooth", [False, True])
def test_vgg16(eigen_smooth: bool) -> None:
    torch.manual_seed(3)
    case = Case(torchvision.models.vgg16(), ["features.29"], [LayerSpec("features.29", "NCHW", (512, 6, 6))], 96)
    methods = ["gradcam", "layercam"] if eigen_smooth else ["gradcam", "xgradcam", "layercam", "eigengradcam", "fem"]
    case.compare(_images(2, 96, seed=4), [[10], [20, 30]], methods, eigen_smooth=eigen_smooth)


@pytest.mark.slow
def test_vit_b_16_tokens() -> None:
    torch.manual_seed(4)
    model = reinit_zero_linears(torchvision.models.vit_b_16())
    layer = "encoder.layers.-1.ln_1"
    case = Case(model, [layer], [LayerSpec(layer, "tokens", (197, 768), grid=(14, 14), prefix_tokens=1)], 224, vit_reshape(14))
    # one image, two targets: a 224 px ViT-B costs seconds per reference pass on 2 cores
    images = _images(1, 224, seed=5)
    case.compare(images, [[1, 2]], ["gradcam", "layercam", "eigencam", "kpcacam"])
    case.compare(images, [TopK(1)], ["gradcam"], eigen_smooth=True)


@pytest.mark.slow
def test_swin_t_nhwc() -> None:
    torch.manual_seed(5)
    case = Case(torchvision.models.swin_t(), ["features.-1"], [LayerSpec("features.-1", "NHWC", (7, 7, 768))], 224, nhwc_reshape)
    case.compare(_images(1, 224, seed=6), [[1, 2]], ["gradcam", "hirescam", "eigencam", "fem"])
    case.compare(_images(1, 224, seed=7), [[4]], ["gradcam"], eigen_smooth=True)


@pytest.mark.slow
@pytest.mark.parametrize("eigen_smooth", [False, True])
def test_scorecam_and_ablationcam_relu_layer(eigen_smooth: bool) -> None:
    # Model runs are per channel: a 48-channel CNN keeps pytorch-grad-cam's side at seconds
    # (resnet18 took minutes). With minimum 0 its stock ablation rule equals ours, so the
    # reference runs with pytorch-grad-cam's default AblationLayer here.
    torch.manual_seed(7)
    case = Case(SmallReLU(), ["features"], [LayerSpec("features", "NCHW", (48, 8, 8))], 32)
    case.compare(_images(2, 32, seed=8), [[1], [2, 4]], ["scorecam", "ablationcam"], eigen_smooth=eigen_smooth,
                 batch_size=16, stock_ablation=True)


class _ChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class _NegativeNHWC(nn.Module):
    """Target layer with negative activations in NHWC layout (the ablation value min - 1e7)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 24, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(24, 32, 3, stride=2, padding=1))
        self.nhwc = _ChannelsLast()
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.nhwc(self.conv(x)))).mean(dim=(1, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("eigen_smooth", [False, True])
def test_ablationcam_negative_channels_last(eigen_smooth: bool) -> None:
    torch.manual_seed(6)
    case = Case(_NegativeNHWC(), ["nhwc"], [LayerSpec("nhwc", "NHWC", (8, 8, 32))], 32, nhwc_reshape)
    case.compare(_images(2, 32, seed=10), [[1, 5], [2]], ["ablationcam", "scorecam"], eigen_smooth=eigen_smooth,
                 batch_size=16, channels_last_ablation=True)
