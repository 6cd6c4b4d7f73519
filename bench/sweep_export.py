"""Export (with the parity check) one torchvision classification model per family beyond
the ones the tests cover, at the layer a user would pick, and print one line per model.

    python bench/sweep_export.py [--models NAME ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

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


def main() -> int:
    import torch
    import torchvision

    from camserve.errors import CamserveError
    from camserve.export import export_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*")
    args = ap.parse_args()
    failures = 0
    for name, layer, size in FAMILIES:
        if args.models and name not in args.models:
            continue
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not torch.any(m.weight):
                torch.nn.init.normal_(m.weight, std=0.02)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                manifest = export_model(model, [layer], tmp, input_size=size, model_name=name)
            except CamserveError as exc:
                failures += 1
                print(f"FAIL {name} {layer}: {exc}", flush=True)
                continue
        (spec,) = manifest.target_layers
        worst = max(s["max_rel_err"] for s in manifest.parity["outputs"].values())
        share = max(s["share_off"] for s in manifest.parity["outputs"].values())
        print(f"ok   {name} {spec.name} {spec.layout} {list(spec.shape)} max_rel_err={worst:.1e} share_off={share:.2%} "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
