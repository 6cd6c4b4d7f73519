"""The KServe model server process: ``python -m camserve.serving.kserve.server SPEC.json``.

``camserve kserve serve`` writes the spec (models, ports, host, workers, configuration) and
starts this module as its own process, since ``import kserve`` parses the process's command
line (its ``ModelServer`` flags) and its FastAPI app is a module global (one server per
process). :mod:`camserve.serving.kserve.rest` holds what camserve changes in kserve's server.

``workers > 1``: kserve binds the REST socket here and spawns that many processes that share
it, each receiving the models pickled; a :class:`~camserve.serving.kserve.model.CamserveModel`
pickles as its settings and loads its own session, audit writer and metrics in the worker.
This process then serves only gRPC (if enabled), so it loads the models only for that.
Counters of all processes are summed on every ``/metrics`` (:mod:`camserve.serving.kserve.prom`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
log = logging.getLogger("camserve.kserve")


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    sys.argv = [sys.argv[0]]  # kserve parses the command line at import: give it none of ours
    import kserve

    from camserve.config import load_config
    from camserve.serving.kserve import prom, rest
    from camserve.serving.kserve.model import CamserveModel

    config = load_config(spec.get("config_file"))
    rest.install(spec["host"], config.frontend_max_request_bytes)
    workers, grpc = int(spec.get("workers", 1)), bool(spec.get("grpc", True))
    if workers > 1:  # every process publishes its counters here; /metrics sums them
        prom.reset_share_dir(Path(spec["run_dir"]) / "metrics")
    models = []
    for m in spec["models"]:
        model = CamserveModel(m["name"], m["export_dir"], config, version=m.get("version"), base=spec["run_dir"],
                              workers=workers)
        if workers == 1 or grpc:
            model.load()
        else:  # the REST workers load their own copies; this process serves nothing
            model.ready = True
        models.append(model)
    log.info("camserve kserve: serving %s with %d worker(s)", ", ".join(f"{m.name} {m.version}" for m in models), workers)
    server = kserve.ModelServer(http_port=spec["http_port"], grpc_port=spec["grpc_port"], workers=workers,
                                enable_grpc=grpc, enable_docs_url=False)
    server.start(models)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
