"""KServe front-end: a ``kserve.Model`` that is a thin adapter over camserve's one pipeline.

Everything a request goes through (limits, parameter parsing, decoding, ONNX Runtime, CAM
methods, rendering, audit, metrics) is :mod:`camserve.pipeline.service`, exactly as in the TorchServe
handler; this module only translates KServe's protocols to :class:`~camserve.pipeline.request.Request`
and the pipeline's answer back.

Open Inference Protocol v2 (``POST /v2/models/NAME/infer``):

* input ``image``, datatype ``BYTES``, shape ``[N]``: one element per image, the encoded file
  in base64 (KServe's REST server turns every BYTES element into text, so raw bytes cannot
  travel, even in the binary extension);
* request ``parameters``: ``methods``, ``target``, ``topk``, ``output``, ``aug_smooth``,
  ``eigen_smooth``, ``explain`` (as on TorchServe; explanations are on unless ``explain``
  is false or ``output=none``);
* outputs: ``answer`` BYTES ``[N]``, one JSON document per image (the TorchServe answer's
  ``images[i]``), and with ``output=array`` one ``cam_<method>`` FP32 ``[N, T, H, W]``.

v1: ``POST /v1/models/NAME:predict`` and ``:explain`` with ``{"instances": [{"image":
{"b64": ...}}], "parameters": {...}}`` answer ``{"predictions": [images[i], ...]}`` and
``{"explanations": [...]}`` (``:predict`` explains only when asked, like ``/predictions``).

A refused request (wrong datatype or shape, missing input, broken base64, not an image,
unknown parameter, oversized body) goes through the pipeline as a refusal, so it is
answered with the pipeline's 4xx JSON and audited like any other; :class:`Refused` carries
it to the HTTP layer (:mod:`camserve.serving.kserve.server` turns it into the response).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model

from camserve.errors import InputError
from camserve.pipeline.request import Request, Response
from camserve.serving.protocol import INPUT, BadInput, b64_image, client_parameters, v1_fields

ANSWER = "answer"


class Refused(Exception):
    """A pipeline answer with a 4xx/5xx status, on its way to the HTTP layer."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.body.decode(errors="replace")[:200])
        self.response = response


class CamserveModel(Model):
    """One exported model served by KServe's ModelServer (see the module docstring)."""

    def __init__(self, name: str, export_dir: str | Path, config: Any, version: str | None = None,
                 base: str | Path | None = None, workers: int = 1) -> None:
        super().__init__(name)
        self.export_dir, self.config, self.base = Path(export_dir), config, base
        #: Processes serving this model on the host: ONNX Runtime threads are shared out among them.
        self.workers = workers
        self.version = version
        self.service: Any = None
        #: One pipeline call at a time, as in a TorchServe worker (the audited service keeps
        #: per-batch state); ONNX Runtime uses the threads of runtime.ort_threads.
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Settings only: ``--workers N`` pickles the model into each worker process, which
        loads its own session, audit writer and metrics (:meth:`__setstate__`)."""
        return {**self.__dict__, "service": None, "_lock": None, "ready": False}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self.load()

    def load(self) -> bool:
        from camserve.audit.service import make_service
        from camserve.pipeline.metrics import Recorder
        from camserve.serving.kserve.prom import process_cache
        from camserve.pipeline.runtime import default_providers, open_session

        providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
        session = open_session(self.export_dir, providers=providers.get(self.config.runtime.providers) or default_providers(),
                               intra_op_threads=self.config.runtime.threads_for(self.workers),
                               post_processing=self.config.runtime.post_processing)
        self.version = self.version or session.manifest.model_version
        cache = process_cache()
        recorder = Recorder(cache, self.name, self.version, self.config.limits.max_batch_size)
        self.service = make_service(self.config, session, recorder, name=self.name, version=self.version,
                                    metrics_cache=cache, base=self.base)
        self.ready = True
        return True

    # ----------------------------------------------------------------- metadata ---

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        h, w = self.service.manifest.input_size if self.service else (-1, -1)
        outputs = [{"name": ANSWER, "datatype": "BYTES", "shape": [-1]}]
        # only the methods this export can answer (not those needing an extra or head graph it lacks)
        methods = [m for m in self.service.methods if m not in self.service.unavailable] if self.service else ()
        return outputs + [{"name": f"cam_{m}", "datatype": "FP32", "shape": [-1, -1, h, w]} for m in methods]

    # ------------------------------------------------------------------- routes ---

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        if isinstance(payload, InferRequest):
            return await asyncio.to_thread(self._infer_v2, payload)
        return await asyncio.to_thread(self._infer_v1, payload, False)

    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        return await asyncio.to_thread(self._infer_v1, payload, True)

    def _serve(self, request: Request) -> Response:
        with self._lock:
            (response,) = self.service.handle([request])
        if response.status != 200:
            raise Refused(response)
        return response

    def _infer_v2(self, payload: InferRequest) -> InferResponse:
        request_id = payload.id or str(uuid.uuid4())
        fields, refusal = {}, None
        try:
            fields = v2_fields(payload)
            params = client_parameters(payload.parameters or {})
        except InputError as exc:
            refusal, params = exc, {}
        request = Request(fields, request_id, explain_route=True, refusal=refusal, images_only=True,
                          header_params=json.dumps(params) if params else None)
        response = self._serve(request)
        images = json.loads(response.body)["images"]
        outputs = [InferOutput(ANSWER, [len(images)], "BYTES",
                               data=np.array([json.dumps(img) for img in images], dtype=np.object_))]
        for method, maps in (response.cams or {}).items():
            stacked = np.stack([np.asarray(m, dtype=np.float32) for m in maps])
            outputs.append(InferOutput(f"cam_{method}", list(stacked.shape), "FP32", data=stacked))
        return InferResponse(request_id, self.name, outputs, model_version=self.version,
                             use_binary_outputs=payload.use_binary_outputs, requested_outputs=payload.request_outputs)

    def _infer_v1(self, payload: Any, explain: bool) -> dict[str, Any]:
        fields, refusal, params = {}, None, {}
        try:
            fields, params = v1_fields(payload)
        except InputError as exc:
            refusal = exc
        request = Request(fields, str(uuid.uuid4()), explain_route=explain, refusal=refusal, images_only=True,
                          header_params=json.dumps(params) if params else None)
        images = json.loads(self._serve(request).body)["images"]
        return {"explanations" if explain else "predictions": images}


# ------------------------------------------------------------------ translation ---


def v2_fields(payload: InferRequest) -> dict[str, bytes]:
    """``{"image_i": bytes}`` from a v2 request's ``image`` input (checked: name, datatype, shape)."""
    names = [i.name for i in payload.inputs]
    unknown = [n for n in names if n != INPUT]
    if unknown:
        raise BadInput(f"unknown input {unknown[0]!r} (this model takes one input, {INPUT!r}, BYTES [N])")
    if INPUT not in names:
        raise BadInput(f"missing input {INPUT!r} (BYTES [N], one base64 image per element)")
    (inp,) = [i for i in payload.inputs if i.name == INPUT]
    if inp.datatype != "BYTES":
        raise BadInput(f"input {INPUT!r} has datatype {inp.datatype}, expected BYTES (base64 images)")
    shape = list(inp.shape)
    data = inp.data if isinstance(inp.data, list) else list(np.asarray(inp.data, dtype=object).reshape(-1))
    if len(shape) != 1 or shape[0] != len(data) or not data:
        raise BadInput(f"input {INPUT!r} has shape {shape} with {len(data)} elements, expected [N] with N >= 1")
    return {f"image_{i}": b64_image(x, f"input {INPUT!r} element {i}") for i, x in enumerate(data)}
