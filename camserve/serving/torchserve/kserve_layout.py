"""``camserve archive --kserve-layout DIR``: the storage layout of KServe's TorchServe runtime.

KServe's TorchServe runtime downloads ``storageUri`` to ``/mnt/models`` and runs
``torchserve --start --model-store /mnt/models/model-store --ts-config
/mnt/models/config/config.properties`` with ``TS_SERVICE_ENVELOPE`` set from the
InferenceService's protocol (``kserve`` for v1, ``kservev2`` for v2). This module writes::

    DIR/model-store/NAME.mar        batch size 1 (the envelopes answer one request per batch)
    DIR/config/config.properties    every archive in model-store, as KServe's runtime reads it
    DIR/config/metrics.yaml         camserve's metrics, declared for TorchServe's Prometheus mode

Archiving a second model into the same DIR adds it: the properties are rewritten from every
``.mar`` in ``model-store``. The properties bind 0.0.0.0 (inside a pod) and turn token
authorization off (KServe's own samples do; on KServe, auth belongs to the ingress / mesh),
and set ``enable_envvars_config=true`` so TorchServe honours ``TS_SERVICE_ENVELOPE``.
"""

from __future__ import annotations

import json
from pathlib import Path

from camserve.config import Config, load_config

#: Where KServe's storage initializer puts ``storageUri`` inside the predictor container.
MOUNT = "/mnt/models"
#: Ports of KServe's TorchServe runtime (the container port is 8085; gRPC 7070).
PORTS = {"inference": 8085, "management": 8081, "metrics": 8082, "grpc_inference": 7070, "grpc_management": 7071}


def layout_properties(layout: Path, *, mount: str = MOUNT, host: str = "0.0.0.0",
                      ports: dict[str, int] | None = None, config: Config | None = None) -> str:
    """``config.properties`` for every archive in ``layout/model-store`` (paths under ``mount``)."""
    from camserve.serving.torchserve.properties import limit_properties, model_entries

    config = config or load_config()
    ports = {**PORTS, **(ports or {})}
    models = model_entries(sorted((layout / "model-store").glob("*.mar")), workers=1, batch_size=1,
                           max_batch_delay_ms=0, response_timeout_s=config.server.response_timeout_s)
    snapshot = {"name": "startup.cfg", "modelCount": sum(len(v) for v in models.values()), "models": models}
    lines = {
        "inference_address": f"http://{host}:{ports['inference']}",
        "management_address": f"http://{host}:{ports['management']}",
        "metrics_address": f"http://{host}:{ports['metrics']}",
        "grpc_inference_address": host,
        "grpc_management_address": host,
        "grpc_inference_port": ports["grpc_inference"],
        "grpc_management_port": ports["grpc_management"],
        "enable_envvars_config": "true",
        "disable_token_authorization": "true",
        "enable_model_api": "true",
        "enable_metrics_api": "true",
        "metrics_mode": "prometheus",
        "metrics_config": f"{mount}/config/metrics.yaml",
        "model_store": f"{mount}/model-store",
        "model_snapshot": json.dumps(snapshot, separators=(",", ":")),
        **limit_properties(config),
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def write_layout(layout: str | Path, export_dir: str | Path, *, name: str, version: str, force: bool = False) -> Path:
    """Archive ``export_dir`` into ``layout`` (see the module docstring); returns the .mar path."""
    from camserve.audit.metrics import write_metrics_config
    from camserve.serving.torchserve.archive import build_archive

    layout = Path(layout)
    mar = build_archive(export_dir, name=name, version=version, model_store=layout / "model-store",
                        batch_size=1, max_batch_delay_ms=0, workers=1, force=force)
    (layout / "config").mkdir(parents=True, exist_ok=True)
    write_metrics_config(layout / "config" / "metrics.yaml")
    (layout / "config" / "config.properties").write_text(layout_properties(layout))
    return mar
