"""The TorchServe handler under KServe's request envelopes (KServe's TorchServe runtime).

KServe's TorchServe runtime starts TorchServe with ``TS_SERVICE_ENVELOPE=kserve`` (v1) or
``kservev2`` (Open Inference Protocol). TorchServe then wraps the handler's ``handle`` in an
envelope object (``ts.torch_handler.request_envelope``) that parses the body *before* the
handler runs and formats whatever the handler returns *after* it. The handler cannot be told
which envelope wraps it, so :func:`detect` looks at its caller: the envelope's own ``handle``.

What the envelopes hand over, and what camserve makes of it (both answer only the first
request of a TorchServe batch, hence batch size 1 in ``camserve archive --kserve-layout``):

* ``kserve`` (v1, ``/v1/models/NAME:predict`` and ``:explain``): the body's ``instances``
  (``[{"image": {"b64": ...}} | {"data": "<base64>"}, ...]``; the body's ``parameters`` are
  read from the envelope, the ``x-camserve-params`` header works too). The handler returns the
  answer's ``images`` list, which the envelope wraps as ``{"predictions": [...]}`` (or
  ``{"explanations": [...]}`` on ``:explain``). A refusal is the 4xx status with the error
  answer as the only element: ``{"predictions": [{"schema", "error": {...}, ...}]}``.
* ``kservev2`` (``/v2/models/NAME/infer``): one BYTES input per image, its first element
  the base64 file (the envelope keeps only the first element of a BYTES input), any names;
  parameters as a JSON object in an optional BYTES input named ``parameters`` (the envelope
  drops the request's ``parameters``). Output *i* is named after input *i* (the envelope does
  that): for an image, its answer object as JSON text; for ``parameters``, the answer's
  request-level fields (request id, model, timings, batch). A refusal is the 4xx status with
  the error answer in every output.

A body the envelope itself cannot parse (not JSON, no ``inputs``) fails inside TorchServe's
code, before camserve runs: TorchServe answers that with its own error and no audit record.
``camserve kserve serve`` has no such gap.
"""

from __future__ import annotations

import json
from types import FrameType
from typing import Any, Protocol

from camserve.errors import InputError
from camserve.pipeline.params import BadParameter
from camserve.pipeline.request import PARAMS_HEADER, Request, Response, header
from camserve.serving.protocol import BadInput, b64_image, client_parameters, instance_fields

#: The v2 input that carries parameters (a JSON object as its one BYTES element).
PARAMETERS_INPUT = "parameters"


class Envelope(Protocol):
    name: str

    def request(self, data: Any, context: Any) -> Request: ...

    def output(self, response: Response, data: Any) -> list[Any]: ...


def _base_request(context: Any, fields: dict[str, bytes], refusal: Exception | None, params: str | None) -> Request:
    return Request(
        fields=fields,
        request_id=context.get_request_id(0) or "",
        explain_route=str(context.get_request_header(0, "explain")) == "True",
        header_params=params,
        refusal=refusal,
        images_only=True,
    )


class V1:
    """``TS_SERVICE_ENVELOPE=kserve``: instances in, ``{"predictions"|"explanations": [...]}`` out."""

    name = "kserve"

    def __init__(self, envelope: Any) -> None:
        self.envelope = envelope

    def _body_parameters(self) -> dict[str, Any]:
        """The body's ``parameters``: the envelope keeps the parsed body, ours to read."""
        bodies = getattr(self.envelope, "_data_list", None) or [None]
        body = bodies[0]
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body)
        params = body.get("parameters") if isinstance(body, dict) else None
        if params is not None and not isinstance(params, dict):
            raise BadInput(f"'parameters' must be a JSON object, got {type(params).__name__}")
        return client_parameters(params or {})

    def request(self, data: Any, context: Any) -> Request:
        fields, refusal, params = {}, None, header(context, 0, PARAMS_HEADER)
        try:
            fields = instance_fields(data)
            body_params = self._body_parameters()
            if body_params and params:
                raise BadParameter(f"parameters are given in the body and in the {PARAMS_HEADER} header: use one")
            params = json.dumps(body_params) if body_params else params
        except InputError as exc:
            refusal = exc
        return _base_request(context, fields, refusal, params)

    def output(self, response: Response, data: Any) -> list[Any]:
        body = json.loads(response.body)
        return body["images"] if response.status == 200 else [body]


class V2:
    """``TS_SERVICE_ENVELOPE=kservev2``: one BYTES input per image (+ ``parameters``)."""

    name = "kservev2"

    def __init__(self, envelope: Any) -> None:
        self.envelope = envelope

    def request(self, data: Any, context: Any) -> Request:
        fields, refusal, params = {}, None, header(context, 0, PARAMS_HEADER)
        try:
            inputs = data if isinstance(data, list) else []
            for inp in inputs:
                name, datatype = inp.get("name"), inp.get("datatype")
                if datatype != "BYTES":
                    raise BadInput(f"input {name!r} has datatype {datatype}, expected BYTES (a base64 image, "
                                   f"or JSON parameters in {PARAMETERS_INPUT!r})")
                if name == PARAMETERS_INPUT:
                    if params:
                        raise BadParameter(f"parameters are given in the {PARAMETERS_INPUT!r} input and in the "
                                           f"{PARAMS_HEADER} header: use one")
                    text = inp.get("data")
                    params = text.decode(errors="replace") if isinstance(text, (bytes, bytearray)) else str(text)
                elif str(name) in fields:
                    raise BadInput(f"input {name!r} is given twice (one input per image, each its own name)")
                else:
                    fields[str(name)] = b64_image(inp.get("data"), f"input {name!r}")
            if not fields:
                raise BadInput("the request has no image input (BYTES, one base64 image per input)")
        except InputError as exc:
            refusal = exc
        return _base_request(context, fields, refusal, params)

    def output(self, response: Response, data: Any) -> list[Any]:
        body = json.loads(response.body)
        names = [inp.get("name") for inp in data] if isinstance(data, list) and data else [None]
        if response.status != 200:
            return [json.dumps(body)] * len(names)
        images = {img["field"]: img for img in body["images"]}
        request_level = {k: v for k, v in body.items() if k != "images"}
        return [json.dumps(request_level if n == PARAMETERS_INPUT else images[n]) for n in names]


ENVELOPES = {"kserve": V1, "kservev2": V2}


def detect(caller: FrameType | None) -> Envelope | None:
    """The envelope whose ``handle`` called the handler (``caller`` is that frame), or None.

    Raises :class:`LookupError` for an envelope camserve does not speak (``json``, ``body``).
    """
    owner = caller.f_locals.get("self") if caller is not None else None
    try:
        from ts.torch_handler.request_envelope.base import BaseEnvelope
    except ImportError:  # not inside a TorchServe worker
        return None
    if not isinstance(owner, BaseEnvelope):
        return None
    name = type(owner).__module__.rsplit(".", 1)[-1]
    if name not in ENVELOPES:
        raise LookupError(f"TorchServe request envelope {name!r} is not supported by camserve "
                          f"(supported: {', '.join(ENVELOPES)}; unset TS_SERVICE_ENVELOPE for camserve's own API)")
    return ENVELOPES[name](owner)
