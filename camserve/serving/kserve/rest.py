"""What camserve changes in ``kserve.ModelServer`` (0.21), each for a stated reason.

* REST (and gRPC) bound to ``host`` (127.0.0.1 by default): kserve hard-codes 0.0.0.0/[::];
* camserve's refusals (:class:`camserve.serving.kserve.model.Refused`) answered with their own
  status (413, 415, 400, 503, ...) and JSON body ``{"error": message, "kind", "status",
  "schema", "request_id", "model"}``: ``error`` as a string is what KServe's and Triton's
  clients read, the rest is camserve's envelope;
* bodies over the frontend ceiling (twice ``limits.max_body_bytes`` + 1 MiB, as on
  TorchServe) refused with a 413 before they are read; between ``max_body_bytes`` and the
  ceiling the pipeline refuses and audits them (base64 costs 4/3, so the ceiling leaves
  room for an encoded body at the limit).

The classes are module-level because ``--workers N`` makes kserve pickle the REST server (and
the models) into N spawned processes: a pickled object's class must be importable by name.
Import this module only after ``sys.argv`` was emptied (``import kserve`` parses it).
"""

from __future__ import annotations

import json
from typing import Any

import kserve.model_server as model_server
import kserve.protocol.rest.multiprocess.server as multiprocess_server
from fastapi.responses import JSONResponse
from kserve.protocol.grpc import server as grpc_server
from kserve.protocol.rest.server import RESTServer

from camserve.serving.kserve.model import Refused

#: Set by :func:`install` in the server process; copied into each REST server instance, so a
#: spawned worker (which re-imports this module) gets them with the pickled instance.
_SETTINGS: dict[str, Any] = {"host": "127.0.0.1", "ceiling": 0}


async def refused(_request: Any, exc: Refused) -> JSONResponse:
    body = json.loads(exc.response.body)
    error = body.pop("error", {}) or {}
    return JSONResponse(status_code=exc.response.status,
                        content={"error": error.get("message", ""), "kind": error.get("kind"),
                                 "status": exc.response.status, **body})


class CamserveRESTServer(RESTServer):
    """kserve's REST server on ``host``, with camserve's refusals and body ceiling."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = _SETTINGS["host"]
        self.ceiling = _SETTINGS["ceiling"]

    def _add_exception_handlers(self, app: Any) -> None:
        app.add_exception_handler(Refused, refused)
        super()._add_exception_handlers(app)

    def _add_middlewares(self, app: Any) -> None:
        super()._add_middlewares(app)
        ceiling = self.ceiling

        @app.middleware("http")
        async def body_ceiling(request: Any, call_next: Any) -> Any:
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > ceiling:
                return JSONResponse(status_code=413, content={
                    "error": f"the body has {size} bytes, more than the server's ceiling of {ceiling}",
                    "kind": "body_too_large", "status": 413})
            return await call_next(request)


class _BoundGrpc:
    """A grpc.aio server whose listening address is ``host`` instead of ``[::]``."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(f"{_SETTINGS['host']}:{address.rsplit(':', 1)[1]}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _Aio:
    def __getattr__(self, name: str) -> Any:
        from grpc import aio

        return getattr(aio, name)

    @staticmethod
    def server(*args: Any, **kwargs: Any) -> Any:
        from grpc import aio

        return _BoundGrpc(aio.server(*args, **kwargs))


def install(host: str, ceiling: int) -> None:
    """Make kserve build camserve's REST server (single- and multi-process) and bind gRPC to ``host``."""
    _SETTINGS.update(host=host, ceiling=ceiling)
    model_server.RESTServer = CamserveRESTServer
    multiprocess_server.RESTServer = CamserveRESTServer
    grpc_server.aio = _Aio()
