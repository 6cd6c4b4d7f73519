"""Test support for the CAM tests: a PyTorch stand-in for GraphSession, and pytorch-grad-cam.

``TorchSession`` answers the graph contract of :class:`camserve.pipeline.runtime.GraphSession`
(``run(images, cotangent, target_rank)``, ``logits``, ``head_logits``) with PyTorch autograd,
so the CAM math and ``explain``'s orchestration are checked against pytorch-grad-cam even
where no exported graph is at hand; the end-to-end tests swap in a real GraphSession.
"""

from __future__ import annotations

import contextlib
import io
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from camserve.manifest import LayerSpec, Manifest
from camserve.pipeline.runtime import GraphOutputs, GraphSession

import pytorch_grad_cam as pgc
from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget


def module_at(model: nn.Module, path: str) -> nn.Module:
    """``"layer4.-1"`` -> ``model.layer4[-1]`` (negative indices allowed)."""
    module = model
    for part in path.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    return module


def reinit_zero_linears(model: nn.Module, seed: int = 0) -> nn.Module:
    """torchvision ViT heads start at zero (all logits 0): give them random weights."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and not mod.weight.detach().any():
            with torch.no_grad():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.02)
    return model


class TorchSession:
    """GraphSession look-alike computed with PyTorch (activations in the layer's layout)."""

    def __init__(self, model: nn.Module, layers: Sequence[str], specs: Sequence[LayerSpec], input_size: int, num_classes: int):
        self.model = model.eval()
        self.modules = [module_at(model, p) for p in layers]
        self.manifest = Manifest(
            model_name="torch",
            model_version="0",
            input_size=(input_size, input_size),
            labels=tuple(str(i) for i in range(num_classes)),
            target_layers=tuple(specs),
        )
        self.calls: list[tuple[str, int]] = []

    check_images = GraphSession.check_images

    def run(self, images: np.ndarray, cotangent: np.ndarray | None = None, target_rank: np.ndarray | None = None) -> GraphOutputs:
        self.calls.append(("run", len(images)))
        store: list[torch.Tensor] = []
        handles = [m.register_forward_hook(lambda _m, _i, o: store.append(o)) for m in self.modules]
        try:
            x = torch.from_numpy(np.ascontiguousarray(images))
            logits = self.model(x)
            cot = torch.zeros_like(logits) if cotangent is None else torch.from_numpy(cotangent).clone()
            if target_rank is not None:
                order = torch.argsort(logits.detach(), dim=1, descending=True, stable=True)
                for row, rank in enumerate(target_rank.tolist()):
                    if rank >= 0:
                        cot[row] = 0
                        cot[row, order[row, rank]] = 1.0
            grads = torch.autograd.grad((logits * cot).sum(), store, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(store, grads)]
        as_np = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
        return GraphOutputs(as_np(logits), [as_np(a) for a in store], [as_np(g) for g in grads])

    def logits(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(("logits", len(images)))
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(images))).numpy()

    def head_logits(self, activations: np.ndarray, images: np.ndarray | None = None) -> np.ndarray:
        """Logits with the first target layer's output replaced; without ``images`` the
        layer must be a cut of the model (zeros stand in for the image)."""
        self.calls.append(("head", len(activations)))
        value = torch.from_numpy(np.ascontiguousarray(activations))
        handle = self.modules[0].register_forward_hook(lambda _m, _i, _o: value)
        size = self.manifest.input_size
        x = torch.zeros(len(activations), 3, *size) if images is None else torch.from_numpy(np.ascontiguousarray(images))
        try:
            with torch.no_grad():
                return self.model(x).numpy()
        finally:
            handle.remove()


REFERENCE_CLASSES: dict[str, Callable] = {
    "gradcam": pgc.GradCAM,
    "hirescam": pgc.HiResCAM,
    "gradcamelementwise": pgc.GradCAMElementWise,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
    "eigencam": pgc.EigenCAM,
    "eigengradcam": pgc.EigenGradCAM,
    "segeigencam": pgc.SegEigenCAM,
    "kpcacam": pgc.KPCA_CAM,
    "fem": pgc.FEM,
    "scorecam": pgc.ScoreCAM,
    "ablationcam": pgc.AblationCAM,
    "finercam": pgc.FinerCAM,
}


class FixedValueAblation(AblationLayer):
    """pytorch-grad-cam's ablation layer with our ablation value: the same for every row
    of a batch (its stock layer lowers it by 1e7 per row when the minimum is not 0)."""

    channels_last = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activations
        if self.channels_last:
            out = out.movedim(-1, 1)
        low = torch.min(out)
        value = 0.0 if low == 0 else low - 1e7
        for i in range(out.size(0)):
            out[i, self.indices[i]] = value
        return out.movedim(1, -1) if self.channels_last else out


class FixedValueAblationLastAxis(FixedValueAblation):
    channels_last = True
    set_next_batch = AblationLayerVit.set_next_batch


def reference_cams(
    method: str,
    model: nn.Module,
    layers: Sequence[str],
    images: np.ndarray,
    row_image: Sequence[int],
    row_class: Sequence[int] | None,
    *,
    reshape: Callable | None = None,
    eigen_smooth: bool = False,
    aug_smooth: bool = False,
    batch_size: int = 32,
    channels_last_ablation: bool = False,
    stock_ablation: bool = False,
) -> np.ndarray:
    """pytorch-grad-cam's CAMs ``[R, H, W]`` for rows (image, class); ``row_class=None`` = its default (argmax)."""
    modules = [module_at(model, p) for p in layers]
    x = torch.from_numpy(np.ascontiguousarray(images[list(row_image)]))
    if method == "finercam":
        outs = []
        with pgc.FinerCAM(model, modules, reshape_transform=reshape) as cam:
            for r in range(len(x)):
                idx = None if row_class is None else int(row_class[r])
                outs.append(cam(x[r : r + 1], eigen_smooth=eigen_smooth, target_idx=idx))
        return np.concatenate(outs)
    cls = REFERENCE_CLASSES[method]
    kwargs = {}
    if method == "ablationcam":
        layer = FixedValueAblationLastAxis() if channels_last_ablation else FixedValueAblation()
        layer = AblationLayer() if stock_ablation else layer
        kwargs = {"ablation_layer": layer, "batch_size": batch_size}
    targets = None if row_class is None else [ClassifierOutputTarget(int(c)) for c in row_class]
    with contextlib.redirect_stderr(io.StringIO()), cls(model, modules, reshape_transform=reshape, **kwargs) as cam:
        if method == "scorecam":
            cam.batch_size = batch_size
        return cam(x, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)


def vit_reshape(grid: int) -> Callable:
    return lambda t: t[:, 1:, :].reshape(t.size(0), grid, grid, t.size(2)).permute(0, 3, 1, 2)


def nhwc_reshape(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


class SmallReLU(nn.Module):
    """A cut of the model at a ReLU output (minimum activation 0): the paper's zero ablation."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 48, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(48, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))
