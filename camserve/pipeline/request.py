"""One HTTP request as TorchServe hands it over: fields, parameter sources, responses.

TorchServe gives the handler one dict per request: the raw body under ``body`` (or
``data``), multipart parts under their field names, query values (on the routes that forward
them) under theirs. This module tells images from parameters and reads the parameter
header; :mod:`camserve.pipeline.service` does the work.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any

from camserve.pipeline import imageio
from camserve.errors import InputError
from camserve.pipeline.params import JSON_FIELDS, MAX_PARAMS_BYTES, PARAM_NAMES, BadParameter, UnknownParameter, json_object

#: Request header carrying parameters (``methods=gradcam&target=topk`` or a JSON object):
#: TorchServe 0.12 forwards the query string only on its legacy routes
#: (``/NAME[/VERSION]/predict``, ``/invocations``), not on ``/predictions`` or ``/explanations``.
PARAMS_HEADER = "x-camserve-params"
#: Fields TorchServe itself adds (``/invocations?model_name=...``), not ours to parse.
TORCHSERVE_FIELDS = ("model_name", "model_version")
RAW_BODY_FIELDS = ("body", "data")


class BodyTooLarge(InputError):
    kind = "body_too_large"
    status = 413


class TooManyImages(InputError):
    kind = "too_many_images"
    status = 413


@dataclass
class Request:
    """One HTTP request as the handler saw it: its fields (body, parts, query values)."""

    fields: dict[str, Any]
    request_id: str = ""
    explain_route: bool = False
    header_params: str | None = None
    #: A problem the front-end found before the pipeline (a KServe input of the wrong
    #: datatype, broken base64): the pipeline answers and audits it like its own refusals.
    refusal: Exception | None = None
    #: Every field is an image, as the protocol declared it (KServe's BYTES ``image`` input):
    #: no field is taken for a parameter, however short.
    images_only: bool = False

    def parts(self) -> tuple[list[tuple[str, bytes]], dict[str, Any], Any]:
        """:func:`split_fields` of this request's fields."""
        if self.images_only:
            return [(name, bytes(data)) for name, data in self.fields.items()], {}, None
        return split_fields(self.fields)


def header(context: Any, idx: int, name: str) -> str | None:
    """A request header by case-insensitive name from a TorchServe context (None if absent)."""
    try:
        headers = context.get_all_request_header(idx) or {}
    except Exception:  # noqa: BLE001 - an odd context must not fail the request
        return None
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name and isinstance(value, str):
            return value
    return None


def header_source(text: str | None) -> dict[str, Any] | None:
    """Parameters from the header: a JSON object, or query-string syntax."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if len(text) > MAX_PARAMS_BYTES:
        raise BadParameter(f"the {PARAMS_HEADER} header has {len(text)} characters, more than the limit of {MAX_PARAMS_BYTES}")
    if text.startswith("{"):
        return json_object(text, f"the {PARAMS_HEADER} header")
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise BadParameter(f"the {PARAMS_HEADER} header {text!r} is neither a JSON object nor name=value&... pairs") from None
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadParameter(f"parameter {key!r} is given twice in the {PARAMS_HEADER} header")
        out[key] = value
    return out


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    error_kind: str | None = None
    #: With ``output=array``: ``{method: [float32 [T, H, W] per image]}``, the maps the answer
    #: encodes as float16, for front-ends that return raw tensors (KServe's ``cam_<method>``).
    cams: dict[str, list[Any]] | None = None


def split_fields(fields: dict[str, Any]) -> tuple[list[tuple[str, bytes]], dict[str, Any], Any]:
    """Separate image parts from parameters: ``(images, query params, JSON params field)``.

    A field named like a parameter is a parameter; ``params``/``parameters`` is the JSON
    field; anything else must be image bytes. A short text under an unknown name is taken
    for a misspelt parameter and named as such.
    """
    images, query, json_field = [], {}, None
    for name, value in fields.items():
        if name in PARAM_NAMES:
            query[name] = value
        elif name in JSON_FIELDS:
            json_field = value
        elif name in TORCHSERVE_FIELDS:
            continue
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            if name not in RAW_BODY_FIELDS and _looks_like_text(data):
                raise UnknownParameter(f"unknown parameter {name!r} (known: {', '.join(PARAM_NAMES)})")
            images.append((name, data))
        elif isinstance(value, str) and name not in RAW_BODY_FIELDS:
            raise UnknownParameter(f"unknown parameter {name!r} (known: {', '.join(PARAM_NAMES)})")
        else:
            raise imageio.NotAnImage(f"field {name!r} is not image bytes (got {type(value).__name__}; send image/* or application/octet-stream)")
    return images, query, json_field


def _looks_like_text(data: bytes) -> bool:
    if len(data) > 256:
        return False
    try:
        imageio.sniff_format(data)
        return False
    except imageio.NotAnImage:
        pass
    try:
        return data.decode("utf-8").isprintable()
    except UnicodeDecodeError:
        return False
