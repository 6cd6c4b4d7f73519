"""Arithmetic floors of the explain graphs whose speed goals are not met.

An exact input gradient of a convolution or a linear layer takes one multiply-add for every
multiply-add of its forward: the same (output position, tap, input channel, output channel)
pairs, read the other way round. So a graph that runs the forward and then the backward from
the output down to a layer costs at least

    (forward MACs + MACs of every layer after that one) / forward MACs

times the forward, on any dense runtime, before its element-wise masks and layout work. This
script counts those multiply-adds on the eager torchvision model (random weights: the count
does not depend on them), counting only the taps that read real input, not padding (ONNX
Runtime's NCHWc kernels skip padding taps, and DeepLab's dilated ASPP taps at 14 x 14 mostly
read padding), and prints the floor beside each goal.

    python bench/floors.py [--size 224]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np


def valid_taps(n_in: int, n_out: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """(output position, kernel tap) pairs along one axis whose input index is inside the input."""
    rows = np.arange(n_out)[:, None] * stride - padding + np.arange(kernel)[None, :] * dilation
    return int(((rows >= 0) & (rows < n_in)).sum())


@dataclass(frozen=True)
class Layer:
    name: str
    order: int  # when its forward ran
    macs: int


def layer_macs(model, example, layer: str | None = None) -> tuple[list[Layer], int]:
    """Every Conv2d / Linear call of one forward with its multiply-adds (valid taps only), and
    how many of them had run when ``layer``'s forward ended (0 for ``None``: the input)."""
    import torch
    from torch import nn

    found: list[Layer] = []
    mark = {"at": 0}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            if isinstance(module, nn.Conv2d):
                (h, w), (ho, wo) = x.shape[2:], output.shape[2:]
                taps = valid_taps(h, ho, module.kernel_size[0], module.stride[0], module.padding[0], module.dilation[0])
                taps *= valid_taps(w, wo, module.kernel_size[1], module.stride[1], module.padding[1], module.dilation[1])
                macs = x.shape[0] * taps * (module.in_channels // module.groups) * module.out_channels
            else:
                macs = int(np.prod(x.shape[:-1])) * module.in_features * module.out_features
            found.append(Layer(name, len(found), macs))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if layer is not None:  # registered last: runs after the layer's own Conv2d hook, if it is one
        handles.append(model.get_submodule(layer).register_forward_hook(lambda *_: mark.__setitem__("at", len(found))))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return found, mark["at"]


def floor(model, example, layer: str | None) -> tuple[float, int, int]:
    """(floor ratio, forward MACs, backward MACs) for a backward from the output to ``layer``
    (``None``: to the input, as FullGrad and Guided Backprop need)."""
    layers, start = layer_macs(model, example, layer)
    forward = sum(item.macs for item in layers)
    backward = sum(item.macs for item in layers if item.order >= start)
    return (forward + backward) / forward, forward, backward


CASES = (
    # model, layer (None: the input), the graph it bounds, its goal (x the forward)
    ("deeplabv3_mobilenet_v3_large", "backbone.16", "segmentation explain graph (issue 15)", 1.15),
    ("deeplabv3_mobilenet_v3_large", "classifier.3", "segmentation explain graph (issue 15)", 1.15),
    ("resnet50", "layer4", "explain graph (model.onnx)", 1.05),
    ("resnet50", None, "fullgrad.onnx (issue 13)", 1.6),
    ("resnet50", None, "guided.onnx (issue 13)", 2.2),
)


def build(name: str):
    import torchvision

    extra = {"weights_backbone": None, "aux_loss": False} if name.startswith("deeplab") else {}
    return torchvision.models.get_model(name, weights=None, **extra).eval()


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    example = torch.zeros(1, 3, args.size, args.size)
    print("| model | gradient down to | graph | forward GMACs | backward GMACs | floor | goal |")
    print("|---|---|---|---:|---:|---:|---:|")
    models = {}
    for name, layer, graph, goal in CASES:
        if name not in models:
            models[name] = build(name)
        model = models[name]
        ratio, forward, backward = floor(model, example, layer)
        verdict = "below the floor" if goal < ratio else "reachable"
        print(f"| {name} | {layer or 'the input'} | {graph} | {forward / 1e9:.3f} | {backward / 1e9:.3f} | "
              f"{ratio:.2f}x | {goal}x ({verdict}) |")


if __name__ == "__main__":
    main()
