"""The target layers' activations and gradients from the guided graph, where they are exact.

Guided Backprop changes only the backward of ``nn.ReLU`` modules. Where none runs after the
target layers (resnet50's ``layer4``: only pooling and the classifier follow), the gradient
at a target layer in the guided graph is the plain one, so the ``guided`` graph can also
answer ``activations_i`` / ``gradients_i`` and Guided Grad-CAM needs no run of ``model.onnx``
for its GradCAM. Where one does (vgg16's classifier has ReLUs), the guided graph answers the
picture alone, as before.

The guided graph is traced on a batch-norm-folded ``torch.fx`` copy
(:mod:`camserve.export.folding`), in which containers such as ``layer4`` are inlined and
never called as modules; :func:`tap_outputs` puts an identity module after each target
layer's output node there, to be hooked like the layer itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn


class Tap(nn.Module):
    """Identity: marks a target layer's output in a traced copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def tap_outputs(gm: fx.GraphModule, paths: Sequence[str]) -> list[nn.Module] | None:
    """An identity :class:`Tap` after each layer ``paths[i]``'s output node of ``gm`` (the
    one node inside the layer that nodes outside it read), or None where a layer has no such
    single node (its module stack is not recorded, or it answers several tensors)."""
    nodes = list(gm.graph.nodes)
    ends: list[fx.Node] = []
    for path in paths:  # every layer's output node first: gm is changed only when all have one
        inside = {n for n in nodes if any(key.split("@")[0] == path for key in n.meta.get("nn_module_stack", {}))}
        outputs = [n for n in nodes if n in inside and any(u not in inside for u in n.users)]
        if len(outputs) != 1:
            return None
        ends.append(outputs[0])
    taps: list[nn.Module] = []
    for i, end in enumerate(ends):
        name = f"camserve_tap_{i}"
        gm.add_submodule(name, Tap())
        with gm.graph.inserting_after(end):
            tap = gm.graph.call_module(name, (end,))
        end.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap)
        taps.append(gm.get_submodule(name))
    gm.recompile()
    return taps


def relu_free_after(model: nn.Module, layers: Sequence[nn.Module], image: torch.Tensor) -> bool:
    """True when no ``nn.ReLU`` module runs after the first of ``layers`` has answered, in a
    forward of ``image``: the guided gradient at every layer is then the plain one."""
    events: list[str] = []
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    handles = [m.register_forward_hook(lambda *_: events.append("relu")) for m in relus]
    handles += [m.register_forward_hook(lambda *_: events.append("layer")) for m in layers]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for h in handles:
            h.remove()
    if "layer" not in events:
        return False
    return "relu" not in events[events.index("layer"):]
