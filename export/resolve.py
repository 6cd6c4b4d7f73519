"""Resolve what the user named: a model spec, a weights file, target-layer paths, labels."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from camserve.errors import CamserveError, ExportError


def load_model(spec: str) -> nn.Module:
    """Build a model from ``torchvision:NAME`` or ``package.module:factory`` (random weights)."""
    if ":" not in spec:
        raise CamserveError(f"model {spec!r} must be 'torchvision:NAME' or 'package.module:factory'")
    module_name, attr = spec.split(":", 1)
    if module_name == "torchvision":
        import torchvision

        try:
            model = torchvision.models.get_model(attr, weights=None)
        except ValueError as exc:
            names = torchvision.models.list_models(module=torchvision.models)
            near = difflib.get_close_matches(attr, names, n=5)
            raise CamserveError(f"unknown torchvision model {attr!r}; nearest: {', '.join(near) or 'none'}") from exc
    else:
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise CamserveError(f"cannot import {spec!r}: {exc}") from exc
        model = factory()
    if not isinstance(model, nn.Module):
        raise CamserveError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a ``state_dict`` file with ``weights_only=True`` (no arbitrary unpickling)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CamserveError(f"weights file {str(path)!r} does not exist") from exc
    except Exception as exc:  # pickle errors for non-state-dict content
        raise CamserveError(f"weights file {str(path)!r} is not a plain state_dict (weights_only load failed: {exc})") from exc
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CamserveError(f"weights file {str(path)!r} does not hold a state_dict of tensors")
    try:
        result = model.load_state_dict(dict(state), strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = str(exc).splitlines()[-1].strip()
        raise CamserveError(f"weights file {str(path)!r} does not fit the model: {detail}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise CamserveError(
            f"weights file {str(path)!r} does not fit the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def resolve_layer(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    """Resolve a dotted path such as ``layer4.-1`` to (canonical name, module).

    Each part is an attribute name or an integer index into a Sequential/ModuleList
    (negative indices count from the end). An unknown path raises an error listing the
    nearest valid module names.
    """
    module: nn.Module = model
    for part in path.split("."):
        child = None
        if part.lstrip("-").isdigit() and isinstance(module, (nn.Sequential, nn.ModuleList)):
            index = int(part)
            if -len(module) <= index < len(module):
                child = module[index]
        elif part in dict(module.named_children()):
            child = getattr(module, part)
        if child is None:
            names = [n for n, _ in model.named_modules() if n]
            near = difflib.get_close_matches(path, names, n=5, cutoff=0.4)
            raise CamserveError(f"unknown target layer {path!r}; nearest valid names: {', '.join(near) or ', '.join(names[-5:])}")
        module = child
    canonical = next(n for n, m in model.named_modules() if m is module)
    return canonical, module


def read_labels(path: str | Path | None, labels: Sequence[str] | None, num_outputs: int) -> list[str]:
    """Labels from a file (one per line), a list, or ``class_i``; the count must match."""
    if path is not None:
        try:
            labels = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
        except OSError as exc:
            raise CamserveError(f"cannot read labels file {str(path)!r}: {exc}") from exc
    if labels is None:
        return [f"class_{i}" for i in range(num_outputs)]
    labels = list(labels)
    if len(labels) != num_outputs:
        raise CamserveError(f"{len(labels)} labels given but the model has {num_outputs} outputs")
    return labels


def check_output(logits: object) -> int:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ExportError(f"model must return logits of shape [N, K], got {getattr(logits, 'shape', type(logits).__name__)}")
    return int(logits.shape[1])
