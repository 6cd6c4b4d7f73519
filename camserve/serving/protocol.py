"""KServe's request forms (v1 instances, v2 BYTES inputs) as camserve pipeline fields.

Shared by the two places that speak KServe's protocols: camserve's own KServe model server
(:mod:`camserve.serving.kserve.model`) and the TorchServe handler under KServe's request
envelopes (:mod:`camserve.serving.torchserve.envelopes`). Nothing here imports ``kserve``,
so the TorchServe path does not need that extra.

An image always travels as base64 text: KServe's REST server turns BYTES elements into text,
and TorchServe's v2 envelope hands the handler the element as the client sent it.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from camserve.errors import InputError
from camserve.pipeline.params import PARAM_NAMES, UnknownParameter

INPUT = "image"
#: Request parameters that clients add for themselves (tritonclient's binary_data_output, ...).
CLIENT_PARAMETERS = ("binary_data_output", "binary_data", "binary_data_size")
#: Keys of a v1 instance that hold its image: camserve's ``image`` and ``data``, the key of
#: KServe's TorchServe image-classifier samples, so their clients work unchanged.
INSTANCE_KEYS = ("image", "data")


class BadInput(InputError):
    """A KServe input that is not what the model takes (names the input and the problem)."""

    kind = "bad_input"


def b64_image(text: Any, where: str) -> bytes:
    """The image bytes of one base64 element (``str`` or ``bytes``), strictly decoded."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("ascii", errors="replace")
    if not isinstance(text, str):
        raise BadInput(f"{where} must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{where} is not valid base64 ({len(text)} characters)") from None


def instance_fields(instances: Any) -> dict[str, bytes]:
    """``{"image_i": bytes}`` from v1 ``instances``: ``[{"image": {"b64": ...}} | {"data": "..."}, ...]``."""
    if not isinstance(instances, list) or not instances:
        raise BadInput("'instances' must be a non-empty list of {\"image\": {\"b64\": ...}}")
    fields = {}
    for i, inst in enumerate(instances):
        key = next((k for k in INSTANCE_KEYS if isinstance(inst, dict) and k in inst), None)
        image = inst[key] if key else None
        b64 = image.get("b64") if isinstance(image, dict) else image
        if b64 is None:
            raise BadInput(f"instance {i} has no image (send {{\"image\": {{\"b64\": \"...\"}}}})")
        fields[f"image_{i}"] = b64_image(b64, f"instance {i}")
    return fields


def v1_fields(payload: Any) -> tuple[dict[str, bytes], dict[str, Any]]:
    """(``{"image_i": bytes}``, parameters) from ``{"instances": [...], "parameters": {...}}``."""
    if not isinstance(payload, dict):
        raise BadInput(f"the body must be a JSON object with 'instances', got {type(payload).__name__}")
    unknown = [k for k in payload if k not in ("instances", "parameters")]
    if unknown:
        raise BadInput(f"unknown key {unknown[0]!r} in the body (known: instances, parameters)")
    fields = instance_fields(payload.get("instances"))
    params = payload.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadInput(f"'parameters' must be a JSON object, got {type(params).__name__}")
    return fields, client_parameters(params)


def client_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """camserve's parameters from a request's ``parameters`` (client-protocol keys dropped)."""
    out = {}
    for key, value in params.items():
        if key in CLIENT_PARAMETERS or key.startswith("triton_"):
            continue
        if key not in PARAM_NAMES:
            raise UnknownParameter(f"unknown parameter {key!r} (known: {', '.join(PARAM_NAMES)})")
        out[key] = value
    return out
