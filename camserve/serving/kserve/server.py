"""The KServe model server process: ``python -m camserve.serving.kserve.server SPEC.json``.

``camserve kserve serve`` writes the spec (models, ports, host, configuration) and starts
this module as its own process, since ``import kserve`` parses the process's command line
(its ``ModelServer`` flags) and its FastAPI app is a module global (one server per process).

What this adds to ``kserve.ModelServer`` (0.21), each for a stated reason:

* REST (and gRPC) bound to ``host`` (127.0.0.1 by default): kserve hard-codes 0.0.0.0/[::];
* camserve's refusals (:class:`camserve.serving.kserve.model.Refused`) answered with their own
  status (413, 415, 400, 503, ...) and JSON body ``{"error": message, "kind", "status",
  "schema", "request_id", "model"}``: ``error`` as a string is what KServe's and Triton's
  clients read, the rest is camserve's envelope;
* bodies over the frontend ceiling (twice ``limits.max_body_bytes`` + 1 MiB, as on
  TorchServe) refused with a 413 before they are read; between ``max_body_bytes`` and the
  ceiling the pipeline refuses and audits them (base64 costs 4/3, so the ceiling leaves
  room for an encoded body at the limit).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
log = logging.getLogger("camserve.kserve")


def _loopback_patches(host: str, ceiling: int) -> None:
    """Bind REST and gRPC to ``host``; map camserve refusals and oversized bodies to JSON 4xx."""
    import kserve.model_server as model_server
    from fastapi.responses import JSONResponse
    from kserve.protocol.grpc import server as grpc_server
    from kserve.protocol.rest.server import RESTServer

    from camserve.serving.kserve.model import Refused

    async def refused(_request: Any, exc: Refused) -> JSONResponse:
        body = json.loads(exc.response.body)
        error = body.pop("error", {}) or {}
        return JSONResponse(status_code=exc.response.status,
                            content={"error": error.get("message", ""), "kind": error.get("kind"),
                                     "status": exc.response.status, **body})

    class Server(RESTServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.config.host = host

        def _add_exception_handlers(self, app: Any) -> None:
            app.add_exception_handler(Refused, refused)
            super()._add_exception_handlers(app)

        def _add_middlewares(self, app: Any) -> None:
            super()._add_middlewares(app)

            @app.middleware("http")
            async def body_ceiling(request: Any, call_next: Any) -> Any:
                size = request.headers.get("content-length")
                if size is not None and size.isdigit() and int(size) > ceiling:
                    return JSONResponse(status_code=413, content={
                        "error": f"the body has {size} bytes, more than the server's ceiling of {ceiling}",
                        "kind": "body_too_large", "status": 413})
                return await call_next(request)

    class _Bound:
        """A grpc.aio server whose listening address is ``host`` instead of ``[::]``."""

        def __init__(self, server: Any) -> None:
            self._server = server

        def add_insecure_port(self, address: str) -> int:
            return self._server.add_insecure_port(f"{host}:{address.rsplit(':', 1)[1]}")

        def __getattr__(self, name: str) -> Any:
            return getattr(self._server, name)

    class _Aio:
        def __getattr__(self, name: str) -> Any:
            from grpc import aio

            return getattr(aio, name)

        @staticmethod
        def server(*args: Any, **kwargs: Any) -> Any:
            from grpc import aio

            return _Bound(aio.server(*args, **kwargs))

    model_server.RESTServer = Server
    grpc_server.aio = _Aio()


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    sys.argv = [sys.argv[0]]  # kserve parses the command line at import: give it none of ours
    import kserve

    from camserve.config import load_config
    from camserve.serving.kserve.model import CamserveModel

    config = load_config(spec.get("config_file"))
    _loopback_patches(spec["host"], config.frontend_max_request_bytes)
    models = []
    for m in spec["models"]:
        model = CamserveModel(m["name"], m["export_dir"], config, version=m.get("version"), base=spec["run_dir"])
        model.load()
        models.append(model)
    log.info("camserve kserve: serving %s", ", ".join(f"{m.name} {m.version}" for m in models))
    server = kserve.ModelServer(http_port=spec["http_port"], grpc_port=spec["grpc_port"], workers=1,
                                enable_grpc=spec.get("grpc", True), enable_docs_url=False)
    server.start(models)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
