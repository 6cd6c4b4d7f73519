"""Resolve what the user named: a model spec, a weights file, target-layer paths, labels."""

from __future__ import annotations

import difflib
import importlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from camserve.errors import CamserveError, ExportError


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (lines joined by ``; ``, cut at ``limit``) for error texts.

    User code raises whatever it likes; the CLI prints a CamserveError on one line, so the
    original type and message are folded into that line here.
    """
    text = "; ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_model(spec: str) -> nn.Module:
    """Build a model from ``torchvision:NAME`` or ``package.module:factory`` (random weights).

    The random initialization is seeded (0, in a forked RNG: the caller's stream is left
    alone), so exporting the same spec twice gives the same graph and the same parity figures.
    Any exception from importing or calling a user's factory becomes a CamserveError naming
    the spec (KeyboardInterrupt passes through).
    """
    if ":" not in spec:
        raise CamserveError(f"model {spec!r} must be 'torchvision:NAME' or 'package.module:factory'")
    module_name, attr = spec.split(":", 1)
    if module_name == "torchvision":
        import torchvision

        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = torchvision.models.get_model(attr, weights=None, **_no_backbone_weights(attr))
        except ValueError as exc:
            names = torchvision.models.list_models(module=torchvision.models)
            near = difflib.get_close_matches(attr, names, n=5)
            raise CamserveError(f"unknown torchvision model {attr!r}; nearest: {', '.join(near) or 'none'}") from exc
    else:
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:  # ImportError, AttributeError, or whatever the module raises on import
            raise CamserveError(f"cannot import {spec!r}: {one_line(exc)}") from exc
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = factory()
        except Exception as exc:
            raise CamserveError(f"model factory {spec!r} failed: {one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise CamserveError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _no_backbone_weights(name: str) -> dict[str, None]:
    """``weights_backbone=None`` for the builders that take it (detection, segmentation):
    their default is a pretrained backbone, which cannot be downloaded here."""
    import inspect

    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        return {}
    return {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}


def torchvision_labels(name: str) -> list[str] | None:
    """The class names a torchvision builder's weights declare (offline: the enum's metadata)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None
    first = next(iter(weights), None)
    categories = first.meta.get("categories") if first is not None else None
    return list(categories) if categories else None


def _unpickle_detail(exc: Exception) -> str:
    """The one informative line of torch's multi-line weights_only refusal (else the whole, folded)."""
    line = next((ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler error:" in ln), None)
    return f"{type(exc).__name__}: {line}" if line else one_line(exc)


def _with_metadata(state: Mapping[str, torch.Tensor], model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """``state`` as an OrderedDict that carries ``_metadata`` (per-module versions).

    ``load_state_dict`` hands each module its version from ``_metadata``; versioned modules
    (MNASNet raises ValueError without one) need it, and ``dict(state)`` would drop it.
    ``torch.save(model.state_dict())`` keeps it through a weights_only load; a file saved as a
    plain dict has none, and then the model's own versions stand in (the file is meant for
    this model code).
    """
    metadata = getattr(state, "_metadata", None)
    if metadata is None:
        metadata = getattr(model.state_dict(), "_metadata", None)
    ordered = OrderedDict(state)
    if metadata is not None:
        ordered._metadata = metadata  # type: ignore[attr-defined]
    return ordered


def _read_state_dict(path: str | Path) -> Mapping[str, torch.Tensor]:
    """The state_dict in ``path`` (loaded with weights_only=True), unwrapped from
    ``{"state_dict": ...}`` / ``{"model": ...}``; the mapping is returned as loaded, ``_metadata`` included."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CamserveError(f"weights file {str(path)!r} does not exist") from exc
    except Exception as exc:  # pickle errors for non-state-dict content
        raise CamserveError(
            f"weights file {str(path)!r} is not a plain state_dict (weights_only load failed: {_unpickle_detail(exc)})"
        ) from exc
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CamserveError(f"weights file {str(path)!r} does not hold a state_dict of tensors")
    return state


def _mismatch_detail(exc: RuntimeError) -> str:
    """torch's "Error(s) in loading state_dict for X:" + one line per mismatch, as one line
    (the first three mismatches and a count of the rest)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    more = f"; ... ({len(lines) - 3} more)" if len(lines) > 3 else ""
    return f"{type(exc).__name__}: " + "; ".join(lines[:3]) + more


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a ``state_dict`` file with ``weights_only=True`` (no arbitrary unpickling).

    Module versions (``_metadata``) are kept. Any exception from ``load_state_dict`` (the
    model's own loading hooks raise what they like) becomes a CamserveError naming the file.
    A missing ``num_batches_tracked`` is not reported: only training with momentum=None reads it.
    """
    state = _with_metadata(_read_state_dict(path), model)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CamserveError(f"weights file {str(path)!r} does not fit the model: {_mismatch_detail(exc)}") from exc
    except Exception as exc:
        raise CamserveError(f"weights file {str(path)!r} cannot be loaded into the model: {one_line(exc)}") from exc
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise CamserveError(
            f"weights file {str(path)!r} does not fit the model: missing {missing[:5]}, "
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


class SegmentationOutput(nn.Module):
    """A segmentation model's ``out`` map: torchvision's models answer ``{"out", "aux"}``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.model(image)
        return out["out"] if isinstance(out, dict) else out


def check_output(logits: object, segmentation: bool = False) -> int:
    if segmentation:
        if not isinstance(logits, torch.Tensor) or logits.ndim != 4:
            raise ExportError(f"a segmentation model must return a map [N, K, H, W] (or a dict with 'out'), "
                              f"got {getattr(logits, 'shape', type(logits).__name__)}")
        return int(logits.shape[1])
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ExportError(f"model must return logits of shape [N, K], got {getattr(logits, 'shape', type(logits).__name__)}")
    return int(logits.shape[1])
