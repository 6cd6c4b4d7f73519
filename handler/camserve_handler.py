"""TorchServe handler for camserve models: thin glue between TorchServe and camserve.pipeline.service.

TorchServe loads this module and requires exactly one class in it, so every helper lives in
the installed ``camserve`` package. The handler creates the ONNX Runtime session itself
with a chosen thread count (TorchServe's BaseHandler would give every worker all cores),
answers each request of a batch on its own (status and content type per request) and
never lets an exception escape (that would fail the whole batch with 503).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from camserve.audit.service import make_service  # noqa: E402
from camserve.config import load_config  # noqa: E402
from camserve.pipeline.metrics import Recorder  # noqa: E402
from camserve.pipeline.runtime import default_providers, open_session  # noqa: E402
from camserve.pipeline.request import PARAMS_HEADER, Request, header  # noqa: E402
from camserve.serving.torchserve import envelopes  # noqa: E402

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class CamserveHandler:
    """Loads the exported graph from the model folder and serves batches through Service."""

    def __init__(self) -> None:
        self.service = None
        self.initialized = False

    def initialize(self, context) -> None:
        config = load_config()
        props = context.system_properties
        model = (getattr(context, "manifest", None) or {}).get("model", {})
        providers = PROVIDERS.get(config.runtime.providers) or default_providers()
        session = open_session(
            props["model_dir"],
            providers=providers,
            intra_op_threads=config.runtime.threads_for(config.server.workers),
            post_processing=config.runtime.post_processing,
        )
        name = model.get("modelName") or session.manifest.model_name
        version = str(model.get("modelVersion") or session.manifest.model_version)
        recorder = Recorder(getattr(context, "metrics", None), name, version, config.limits.max_batch_size)
        # Audited (config.audit): every answer leaves only after its record is committed.
        self.service = make_service(config, session, recorder, name=name, version=version,
                                    metrics_cache=getattr(context, "metrics", None))
        self.initialized = True

    def handle(self, data, context):
        try:
            envelope = envelopes.detect(sys._getframe(1))  # KServe's TorchServe runtime wraps handle
        except LookupError as exc:
            return self._answer(context, [self.service.error_response(Request({}), exc)])
        if envelope is not None:
            try:
                request = envelope.request(data, context)
            except Exception as exc:  # noqa: BLE001 - whatever the envelope hands over, a 400
                request = Request({}, context.get_request_id(0) or "", refusal=envelopes.BadInput(
                    f"the {envelope.name} request cannot be read ({type(exc).__name__}: {str(exc)[:200]})"))
            (response,) = self._serve([request])
            self._answer(context, [response])
            return envelope.output(response, data)
        requests = [
            Request(
                fields=dict(row or {}),
                request_id=context.get_request_id(i) or "",
                explain_route=str(context.get_request_header(i, "explain")) == "True",
                header_params=header(context, i, PARAMS_HEADER),
            )
            for i, row in enumerate(data or [])
        ]
        return self._answer(context, self._serve(requests))

    def _serve(self, requests):
        try:
            return self.service.handle(requests)
        except Exception as exc:  # noqa: BLE001 - a 503 for the batch would hide which request failed
            return [self.service.error_response(r, exc) for r in requests]

    @staticmethod
    def _answer(context, responses):
        """Status and content type per request; the bodies in batch order."""
        for i, response in enumerate(responses):
            context.set_response_status(response.status, "OK" if response.status < 400 else response.error_kind or "error", idx=i)
            context.set_response_content_type(i, response.content_type)
        return [r.body for r in responses]
