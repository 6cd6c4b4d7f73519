"""Shared test set-up: ONNX Runtime stays offline; small exported models are cached per session."""

from __future__ import annotations

import os

os.environ["ORT_DISABLE_TELEMETRY"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def resnet18_export(tmp_path_factory):
    """resnet18 (random weights, seed 0) at 64 px with a head graph: the cheapest real export."""
    import torch
    import torchvision

    from camserve.export import export_model

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    out = tmp_path_factory.mktemp("resnet18")
    manifest = export_model(model, ["layer4.-1"], out, input_size=64, model_name="resnet18", head=True)
    return out, manifest, model
