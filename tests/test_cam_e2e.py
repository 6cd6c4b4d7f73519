"""End to end: CAMs from ONNX Runtime outputs of exported graphs vs pytorch-grad-cam on PyTorch.

Exports are cached per session (tmp_path_factory). Small members of each family keep the
exports at seconds: resnet18 (NCHW, with the head graph for AblationCAM) and a small
torchvision VisionTransformer (tokens with a class token). The full-size vit_b_16 and
swin_t are checked through PyTorch outputs in test_cam_parity.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from camserve.cam import TopK, explain

from cam_reference import SmallReLU, reference_cams, reinit_zero_linears, vit_reshape

export = pytest.importorskip("camserve.export")
from camserve.pipeline.runtime import GraphSession  # noqa: E402

TOL = 1e-4


def _images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


class Exported:
    def __init__(self, model: nn.Module, layer: str, size: int, out_dir, reshape=None, head: bool = False) -> None:
        self.model, self.layer, self.size, self.reshape = model.eval(), layer, size, reshape
        export.export_model(model, [layer], out_dir, input_size=size, model_name="t", head=head, check=False)
        for p in model.parameters():  # export_model leaves them requires_grad=False; pytorch-grad-cam needs a graph
            p.requires_grad_(True)
        self.session = GraphSession(out_dir, intra_op_threads=2)

    def compare(self, images: np.ndarray, targets: list, methods: list[str], *, default_targets: bool = False, **kw) -> None:
        eigen, aug = kw.pop("eigen_smooth", False), kw.pop("aug_smooth", False)
        out = explain(self.session, images, targets, methods, eigen_smooth=eigen, aug_smooth=aug)
        with torch.no_grad():
            np.testing.assert_allclose(out.logits, self.model(torch.from_numpy(images)).numpy(), rtol=1e-3, atol=1e-4)
        row_image = [i for i, cls in enumerate(out.classes) for _ in cls]
        row_class = None if default_targets else [c for cls in out.classes for c in cls]
        for method in methods:
            ours = np.concatenate(out.cams[method])
            ref = reference_cams(method, self.model, [self.layer], images, row_image, row_class, reshape=self.reshape,
                                 eigen_smooth=eigen, aug_smooth=aug, **kw)
            assert ref.max() > 0.5, f"{method}: reference CAM is degenerate"
            diff = float(np.abs(ours - ref).max())
            assert diff <= TOL, f"{method} (eigen_smooth={eigen}, aug_smooth={aug}): max abs diff {diff:.2e}"


@pytest.fixture(scope="session")
def resnet18_export(tmp_path_factory) -> Exported:
    torch.manual_seed(11)
    return Exported(torchvision.models.resnet18(num_classes=10), "layer4", 96, tmp_path_factory.mktemp("cam-resnet18"), head=True)


@pytest.fixture(scope="session")
def small_vit_export(tmp_path_factory) -> Exported:
    torch.manual_seed(12)
    model = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                                                 mlp_dim=64, num_classes=10)
    reinit_zero_linears(model)
    return Exported(model, "encoder.layers.-1.ln_1", 64, tmp_path_factory.mktemp("cam-vit"), reshape=vit_reshape(4))


GRADIENT_FAMILY = ["gradcam", "hirescam", "gradcamelementwise", "gradcam++", "xgradcam", "layercam", "eigencam", "eigengradcam", "kpcacam", "fem"]


@pytest.mark.slow
@pytest.mark.parametrize("eigen_smooth", [False, True])
def test_resnet18_onnx_gradient_family(resnet18_export: Exported, eigen_smooth: bool) -> None:
    resnet18_export.compare(_images(2, 96, 1), [[1], [2, 7]], GRADIENT_FAMILY + ["finercam"], eigen_smooth=eigen_smooth)


@pytest.mark.slow
def test_resnet18_onnx_top1_and_aug_smooth(resnet18_export: Exported) -> None:
    images = _images(2, 96, 2)
    resnet18_export.compare(images, [TopK(1)] * 2, ["gradcam", "gradcam++", "finercam"], default_targets=True)
    resnet18_export.compare(images, [TopK(1)] * 2, ["gradcam", "layercam"], default_targets=True, aug_smooth=True)


@pytest.fixture(scope="session")
def small_relu_export(tmp_path_factory) -> Exported:
    torch.manual_seed(13)
    return Exported(SmallReLU(), "features", 32, tmp_path_factory.mktemp("cam-small"), head=True)


@pytest.mark.slow
def test_onnx_score_and_ablation(small_relu_export: Exported) -> None:
    # 48 channels keep pytorch-grad-cam's per-channel model runs at seconds (see test_cam_parity)
    assert small_relu_export.session.manifest.head_graph_file
    small_relu_export.compare(_images(2, 32, 3), [[3], [4, 5]], ["ablationcam", "scorecam"], batch_size=16, stock_ablation=True)


@pytest.mark.slow
def test_vit_tokens_onnx(small_vit_export: Exported) -> None:
    images = _images(2, 64, 4)
    small_vit_export.compare(images, [[1], [2, 3]], ["gradcam", "gradcam++", "layercam", "eigencam", "kpcacam", "finercam"])
    small_vit_export.compare(images, [TopK(2), [0]], ["gradcam", "hirescam"], eigen_smooth=True)
