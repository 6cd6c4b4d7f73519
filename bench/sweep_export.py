"""Export (with the parity check) one torchvision classification model per family beyond
the ones the tests cover, at the layer a user would pick, and print one line per model.

Each model goes through a ``--weights`` round trip first: its random weights are saved with
``torch.save(model.state_dict())`` and loaded into a fresh model the way ``camserve export
--weights`` does (``load_model`` + ``load_weights``); that fresh model is the one exported.

    python bench/sweep_export.py [--models NAME ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# (model, target layer, input size)
FAMILIES = [
    ("alexnet", "features.-2", 224), ("vgg11_bn", "features.-2", 224), ("resnext50_32x4d", "layer4.-1", 224),
    ("wide_resnet50_2", "layer4.-1", 224), ("regnet_y_400mf", "trunk_output.-1", 224),
    ("regnet_x_400mf", "trunk_output.-1", 224), ("googlenet", "inception5b", 224), ("inception_v3", "Mixed_7c", 299),
    ("mnasnet0_5", "layers.-1", 224), ("shufflenet_v2_x0_5", "conv5", 224), ("squeezenet1_0", "features.-1", 224),
    ("mobilenet_v2", "features.-1", 224), ("mobilenet_v3_small", "features.-1", 224),
    ("efficientnet_v2_s", "features.-1", 224), ("densenet161", "features", 224), ("convnext_small", "features.-1", 224),
    ("vit_b_32", "encoder.layers.-1.ln_1", 224), ("swin_v2_t", "features.-1", 256), ("maxvit_t", "blocks.-1", 224),
]


def _random_model(name: str) -> nn.Module:
    """torchvision ``name`` with seeded random weights; all-zero Linear layers (zero-initialised
    heads) get random ones so that the logits and gradients are not all zero."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not torch.any(m.weight):
            torch.nn.init.normal_(m.weight, std=0.02)
    return model


def _weights_round_trip(name: str, model: nn.Module, tmp: Path) -> nn.Module:
    """A fresh ``torchvision:name`` with ``model``'s weights, saved as a plain state_dict and
    loaded as ``camserve export --weights`` loads it; raises when any tensor differs after."""
    import torch

    from camserve.errors import CamserveError
    from camserve.export import load_model, load_weights

    path = tmp / "weights.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)  # other random weights than the saved ones
    fresh = load_model(f"torchvision:{name}")
    load_weights(fresh, path)
    want = model.state_dict()
    differs = [k for k, v in fresh.state_dict().items() if not torch.equal(v, want[k])]
    if differs:
        raise CamserveError(f"{len(differs)} tensors differ after load_weights({str(path)!r}), e.g. {differs[:3]}")
    return fresh


def _sweep_one(name: str, layer: str, size: int) -> bool:
    """Round-trip the weights of one model, export it and print one line; True when it passed."""
    from camserve.errors import CamserveError
    from camserve.export import export_model

    with tempfile.TemporaryDirectory() as tmp:
        try:
            model = _weights_round_trip(name, _random_model(name), Path(tmp))
        except Exception as exc:  # any failure here is a --weights bug to report, not to stop the sweep
            print(f"FAIL {name} --weights: {type(exc).__name__}: {exc}", flush=True)
            return False
        t0 = time.perf_counter()
        try:
            manifest = export_model(model, [layer], Path(tmp) / "out", input_size=size, model_name=name)
        except CamserveError as exc:
            print(f"FAIL {name} {layer}: {exc}", flush=True)
            return False
    (spec,) = manifest.target_layers
    worst = max(s["max_rel_err"] for s in manifest.parity["outputs"].values())
    share = max(s["share_off"] for s in manifest.parity["outputs"].values())
    print(f"ok   {name} --weights {spec.name} {spec.layout} {list(spec.shape)} max_rel_err={worst:.1e} "
          f"share_off={share:.2%} relu_units_flipped={manifest.parity.get('relu_units_flipped', 0)} "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*")
    args = ap.parse_args()
    failures = 0
    for name, layer, size in FAMILIES:
        if args.models and name not in args.models:
            continue
        failures += not _sweep_one(name, layer, size)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
