"""The generated ``config.properties`` of a camserve TorchServe, and the ports it names.

Every address is loopback unless configured otherwise, every port is checked free before
the start (a gRPC clash would kill the server after it), and each archive becomes a model
entry whose highest version is the default.
"""

from __future__ import annotations

import json
import re
import socket
import zipfile
from pathlib import Path
from typing import Any

from camserve.config import PORT_FIELDS, Config
from camserve.serving.torchserve.instance import ServerError, free_port


def version_key(version: str) -> tuple:
    """Sort key: numeric parts compare as numbers ("1.10" > "1.9")."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-_]", version))


def mar_identity(path: Path) -> tuple[str, str]:
    """(model name, version) from an archive's MAR-INF/MANIFEST.json."""
    try:
        with zipfile.ZipFile(path) as zf:
            model = json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]
        return model["modelName"], str(model.get("modelVersion") or "1.0")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ServerError(f"{path} is not a readable model archive: {exc}") from None


def resolve_ports(config: Config) -> Config:
    """Replace every port 0 with a free loopback port."""
    ports = {name: free_port() for name in PORT_FIELDS if getattr(config.server, name) == 0}
    return config.with_overrides({"server": ports}) if ports else config


def check_ports(config: Config, inference_host: str | None = None) -> None:
    """Refuse ports already taken, before starting: a gRPC clash would kill the server later."""
    s = config.server
    for name in PORT_FIELDS:
        host = inference_host if name in ("inference_port", "health_port") and inference_host else s.host
        with socket.socket() as sock:
            try:
                sock.bind((host, getattr(s, name)))
            except OSError as exc:
                raise ServerError(
                    f"{name.replace('_', ' ')} {getattr(s, name)} on {host} is not available ({exc.strerror}); "
                    f"choose another with --{name.replace('_', '-')} (0 = a free one)"
                ) from None


def model_entries(mars: list[Path], *, workers: int, batch_size: int, max_batch_delay_ms: int,
                  response_timeout_s: int) -> dict[str, dict[str, Any]]:
    """``{name: {version: settings}}`` of the archives, as config.properties lists models;
    the highest version of each name is the default (it answers ``/predictions/NAME``)."""
    models: dict[str, dict[str, Any]] = {}
    for mar in mars:
        name, version = mar_identity(mar)
        models.setdefault(name, {})[version] = {
            "marName": mar.name,
            "minWorkers": workers,
            "maxWorkers": workers,
            "batchSize": batch_size,
            "maxBatchDelay": max_batch_delay_ms,
            "responseTimeout": response_timeout_s,
        }
    for versions in models.values():
        versions[max(versions, key=version_key)]["defaultVersion"] = True
    return models


def limit_properties(config: Config) -> dict[str, Any]:
    """The properties every camserve TorchServe shares: body and response ceilings, timeout,
    camserve's own metrics only, no per-model pip installs."""
    return {
        "max_request_size": config.frontend_max_request_bytes,
        "max_response_size": max(config.limits.max_body_bytes, 64 * 1024 * 1024),
        "default_response_timeout": config.server.response_timeout_s,
        "install_py_dep_per_model": "false",
        "disable_system_metrics": "true",
    }


def properties(config: Config, run_dir: Path, model_store: Path, mars: list[Path], inference_host: str | None) -> str:
    """The generated ``config.properties`` text."""
    s = config.server
    host = s.host
    models = model_entries(mars, workers=s.workers, batch_size=min(s.batch_size, config.limits.max_batch_size),
                           max_batch_delay_ms=s.max_batch_delay_ms, response_timeout_s=s.response_timeout_s)
    lines = {
        "inference_address": f"http://{inference_host or host}:{s.inference_port}",
        "management_address": f"http://{host}:{s.management_port}",
        "metrics_address": f"http://{host}:{s.metrics_port}",
        "grpc_inference_address": host,
        "grpc_management_address": host,
        "grpc_inference_port": s.grpc_inference_port,
        "grpc_management_port": s.grpc_management_port,
        "model_store": model_store,
        "load_models": ",".join(m.name for m in mars),
        "models": json.dumps(models, separators=(",", ":")),
        "disable_token_authorization": str(not s.token_auth).lower(),
        "token_expiration_min": s.token_expiration_min,
        "enable_model_api": str(s.model_api).lower(),
        "metrics_mode": "prometheus",
        "metrics_config": run_dir / "metrics.yaml",
        "vmargs": f"-Xmx{s.java_heap} -XX:-UsePerfData -Djava.io.tmpdir={run_dir / 'tmp'}",
        **limit_properties(config),
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())
