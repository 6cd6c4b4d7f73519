"""Export + parity for the torchvision architectures users deploy, each at the layer a user
would pick (random weights; zero-initialized heads re-initialized so gradients are not 0)."""

from __future__ import annotations

import time

import pytest
import torch
import torchvision
from torch import nn

from camserve.export import export_model

# (model, target layer, expected layout, expected per-sample activation shape)
CASES = [
    ("resnet18", "layer4.-1", "NCHW", (512, 7, 7)),
    ("resnet50", "layer4.-1", "NCHW", (2048, 7, 7)),
    ("vgg16", "features.29", "NCHW", (512, 14, 14)),
    ("mobilenet_v3_large", "features.-1", "NCHW", (960, 7, 7)),
    ("efficientnet_b0", "features.-1", "NCHW", (1280, 7, 7)),
    ("densenet121", "features", "NCHW", (1024, 7, 7)),
    ("convnext_tiny", "features.-1", "NCHW", (768, 7, 7)),
    ("vit_b_16", "encoder.layers.-1.ln_1", "tokens", (197, 768)),
    ("swin_t", "features.-1", "NHWC", (7, 7, 768)),
]


def reinit_zero_linears(model: nn.Module) -> nn.Module:
    """torchvision's ViT head starts at zero: every logit and gradient would be 0."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and not torch.any(m.weight):
            nn.init.normal_(m.weight, std=0.02)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name,layer,layout,shape", CASES, ids=[c[0] for c in CASES])
def test_architecture_exports_with_parity(tmp_path, name, layer, layout, shape):
    torch.manual_seed(0)
    model = reinit_zero_linears(torchvision.models.get_model(name, weights=None))
    t0 = time.perf_counter()
    manifest = export_model(model, [layer], tmp_path, input_size=224, model_name=name)
    print(f"{name}: exported with parity check in {time.perf_counter() - t0:.0f} s")
    (spec,) = manifest.target_layers
    assert (spec.layout, spec.shape) == (layout, shape)
    if layout == "tokens":
        assert (spec.grid, spec.prefix_tokens) == ((14, 14), 1)
    for out, stats in manifest.parity["outputs"].items():
        assert stats["share_off"] <= 1e-3, (out, stats)
        assert stats["max_rel_err"] < 1e-2, (out, stats)
