"""Export (with the parity check) every model issue 15 names, one line per model: the
segmentation, detection, embedding and multi-label kinds, random weights.

CI exports one model per kind (tests/test_segmentation.py, test_detection.py,
test_embeddings.py, test_heads.py); this sweep is the by-hand run over all of them.

    python bench/sweep_kinds.py [--models NAME ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def _segmentation(name: str, layer: str, size: int = 224) -> Callable[[str], Any]:
    def run(out: str) -> Any:
        import torch
        import torchvision

        from camserve.export import export_model

        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, aux_loss=False)
        return export_model(model.eval(), [layer], out, input_size=size, model_name=name, kind="segmentation")
    return run


def _detection(name: str, level: str | None = None, size: int = 320, extras: tuple[str, ...] = ()) -> Callable[[str], Any]:
    def run(out: str) -> Any:
        import torch
        import torchvision

        from camserve.export.detection import export_detection

        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
        return export_detection(model.eval(), out, level=level, input_size=size, model_name=name, min_score=0.0, extras=extras)
    return run


def _embedding(out: str) -> Any:
    import torch
    import torchvision

    from camserve.export import export_model

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Identity()
    return export_model(model.eval(), ["layer4.-1"], out, input_size=224, model_name="resnet50-embedding", kind="embedding")


def _multilabel(out: str) -> Any:
    import torch
    import torchvision

    from camserve.export import export_model

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=20)
    return export_model(model.eval(), ["layer4.-1"], out, input_size=224, model_name="resnet18-multilabel",
                        output_activation="sigmoid")


MODELS: dict[str, Callable[[str], Any]] = {
    "fcn_resnet50": _segmentation("fcn_resnet50", "backbone.layer4"),
    "deeplabv3_mobilenet_v3_large": _segmentation("deeplabv3_mobilenet_v3_large", "backbone.16"),
    "lraspp_mobilenet_v3_large": _segmentation("lraspp_mobilenet_v3_large", "backbone.16"),
    "fasterrcnn_mobilenet_v3_large_320_fpn": _detection("fasterrcnn_mobilenet_v3_large_320_fpn"),
    "fasterrcnn_mobilenet_v3_large_320_fpn+boxscore": _detection("fasterrcnn_mobilenet_v3_large_320_fpn", extras=("boxscore",)),
    "retinanet_resnet50_fpn": _detection("retinanet_resnet50_fpn"),
    "fcos_resnet50_fpn": _detection("fcos_resnet50_fpn"),
    "ssdlite320_mobilenet_v3_large": _detection("ssdlite320_mobilenet_v3_large", level="0"),
    "resnet50-embedding": _embedding,
    "resnet18-multilabel": _multilabel,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    args = parser.parse_args()
    failed = 0
    print("| model | kind | layer | parity (worst max rel err, share off) | export s |\n|---|---|---|---|---:|")
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="camserve-sweep-") as out:
            start = time.perf_counter()
            try:
                manifest = MODELS[name](out)
            except Exception as exc:  # noqa: BLE001 - one line per model, the sweep goes on
                failed += 1
                print(f"| {name} | - | - | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160]} | - |", flush=True)
                continue
            outputs = manifest.parity.get("outputs", {})
            worst = max(outputs.values(), key=lambda f: f["max_rel_err"])
            layer = manifest.target_layers[0]
            flipped = manifest.parity.get("relu_units_flipped", 0)
            kinks = f" ({flipped} ReLU units decided on ONNX Runtime's side of the kink)" if flipped else ""
            route = manifest.extras.get("boxscore", {}).get("parity")
            if route:  # the box-score route against torch autograd (camserve.export.box_score)
                kinks += f"; box-score gradients {route['max_rel_gradient_diff']:.1e} of scale on {route['boxes']} boxes"
            print(f"| {name} | {manifest.kind} | {layer.name} {list(layer.shape)} | {worst['max_rel_err']:.1e}, "
                  f"{max(f['share_off'] for f in outputs.values()):.2%}{kinks} | {time.perf_counter() - start:.0f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
