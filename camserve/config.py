"""Typed configuration: request limits, server settings and runtime threads in one place.

Every setting has a safe default (loopback only, token auth on, bounded inputs). Values are
layered, later wins::

    defaults  <  file (YAML/JSON, ``CAMSERVE_CONFIG``)  <  environment  <  explicit overrides

Environment variables are named ``CAMSERVE_<SECTION>_<FIELD>`` in upper case, e.g.
``CAMSERVE_LIMITS_MAX_PIXELS=40000000`` or ``CAMSERVE_SERVER_INFERENCE_PORT=8080``. The
same file and variables reach the TorchServe worker (``camserve serve`` passes them on), so
the CLI, the server config and the handler enforce the same limits.
"""

from __future__ import annotations

import json
import os
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from camserve.errors import CamserveError

ENV_PREFIX = "CAMSERVE_"
CONFIG_ENV = "CAMSERVE_CONFIG"


class ConfigError(CamserveError):
    """A configuration value that is missing, of the wrong type or out of range."""

    kind = "config_error"


@dataclass(frozen=True)
class Limits:
    """Bounds enforced before work is done on a request (issue 7: limits and safe defaults).

    ``max_pixels`` is checked against the header's width x height before any pixel is
    decoded, so a small file that declares a huge image (a decompression bomb) costs nothing.
    """

    max_body_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images_per_request: int = 16
    max_batch_size: int = 64
    max_targets: int = 10
    max_methods: int = 4
    #: Maps (images x targets x methods) whose faithfulness ``metrics`` one request may ask.
    max_metric_maps: int = 8

    def __post_init__(self) -> None:
        for f in fields(self):
            _positive(f"limits.{f.name}", getattr(self, f.name))


PORT_FIELDS = ("inference_port", "management_port", "metrics_port", "grpc_inference_port", "grpc_management_port",
               "health_port")


@dataclass(frozen=True)
class ServerConfig:
    """How ``camserve serve`` starts TorchServe. Port 0 means "pick a free port"."""

    host: str = "127.0.0.1"
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    token_auth: bool = True
    model_api: bool = False
    batch_size: int = 8
    max_batch_delay_ms: int = 10
    workers: int = 1
    response_timeout_s: int = 120
    startup_timeout_s: float = 180.0
    run_dir: str = "serve_run"
    model_store: str = "model_store"
    models: str = "all"
    java_heap: str = "256m"
    #: TorchServe's keys expire (its default 60 min; fractions allowed); renew with the API
    #: key (docs/serving.md). The health check renews the management key it uses itself.
    token_expiration_min: float = 1440.0
    #: The frontend's own body ceiling (``max_request_size``); 0 = twice
    #: ``limits.max_body_bytes`` plus 1 MiB. Bodies between the two reach the handler,
    #: which refuses them with the ``body_too_large`` JSON answer and an audit record;
    #: above it the frontend answers an empty 413 that no worker sees.
    max_request_bytes: int = 0
    #: Port of the health check that needs no token (``GET /ping``, ``/ready``); 0 = free.
    health_port: int = 8083

    def __post_init__(self) -> None:
        for name in PORT_FIELDS:
            port = getattr(self, name)
            if not isinstance(port, int) or not 0 <= port <= 65535:
                raise ConfigError(f"server.{name} must be a port number 0..65535, got {port!r}")
        if not isinstance(self.max_request_bytes, int) or self.max_request_bytes < 0:
            raise ConfigError(f"server.max_request_bytes must be >= 0, got {self.max_request_bytes!r}")
        if not isinstance(self.token_expiration_min, (int, float)) or not self.token_expiration_min > 0:
            raise ConfigError(f"server.token_expiration_min must be > 0, got {self.token_expiration_min!r}")
        for name in ("batch_size", "workers", "response_timeout_s"):
            _positive(f"server.{name}", getattr(self, name))
        if self.max_batch_delay_ms < 0:
            raise ConfigError(f"server.max_batch_delay_ms must be >= 0, got {self.max_batch_delay_ms}")
        if not self.host:
            raise ConfigError("server.host must not be empty")


#: where CAM post-processing runs (``runtime.post_processing``): numpy on the host, the
#: device post-processing graphs (:mod:`camserve.cam.device`) in the session's execution
#: provider, or ``auto``: on the device when the graph runs on CUDA, else on the host
POST_PROCESSING = ("auto", "host", "device")


@dataclass(frozen=True)
class RuntimeConfig:
    """ONNX Runtime settings inside a worker. ``ort_threads`` 0 = cores / workers.

    ``post_processing``: where the CAM post-processing of the summing gradient methods runs
    (:mod:`camserve.cam.device`): ``host`` (numpy), ``device`` (an ONNX graph in the
    session's provider, on the outputs left where the graph ran) or ``auto`` (``device``
    on CUDA, where it saves the copies and numpy's time; ``host`` on CPUs, where both cost
    the same)."""

    ort_threads: int = 0
    providers: str = "auto"
    post_processing: str = "auto"

    def __post_init__(self) -> None:
        if self.ort_threads < 0:
            raise ConfigError(f"runtime.ort_threads must be >= 0, got {self.ort_threads}")
        if self.providers not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"runtime.providers must be auto, cpu or cuda, got {self.providers!r}")
        if self.post_processing not in POST_PROCESSING:
            raise ConfigError(f"runtime.post_processing must be auto, host or device, got {self.post_processing!r}")

    def threads_for(self, workers: int = 1) -> int:
        """Intra-op threads for one worker: explicit, else the cores shared between workers."""
        if self.ort_threads:
            return self.ort_threads
        return max(1, (os.cpu_count() or 1) // max(1, workers))


AUDIT_SINKS = ("sqlite", "jsonl", "postgres")
AUDIT_POLICIES = ("block", "fail-closed", "fail-open")


@dataclass(frozen=True)
class AuditConfig:
    """The audit log (``camserve.audit``): where records go and what happens when they cannot.

    ``path`` is a folder (SQLite file ``audit.sqlite``, JSON Lines files, stored blobs); a
    relative path is taken inside the server's run folder. ``dsn`` is the PostgreSQL
    connection string (sink ``postgres``). ``policy`` applies to a full queue or a failing
    sink: ``block`` waits up to ``timeout_s`` then answers 503, ``fail-closed`` answers 503
    at once, ``fail-open`` answers and counts the lost record.
    """

    enabled: bool = True
    sink: str = "sqlite"
    path: str = "audit"
    dsn: str = ""
    policy: str = "block"
    queue_size: int = 1024
    timeout_s: float = 30.0
    store_heatmaps: bool = False
    store_inputs: bool = False
    fsync: bool = False
    rotate_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.sink not in AUDIT_SINKS:
            raise ConfigError(f"audit.sink must be one of {', '.join(AUDIT_SINKS)}, got {self.sink!r}")
        if self.policy not in AUDIT_POLICIES:
            raise ConfigError(f"audit.policy must be one of {', '.join(AUDIT_POLICIES)}, got {self.policy!r}")
        if self.enabled and self.sink == "postgres" and not self.dsn:
            raise ConfigError("audit.sink postgres needs audit.dsn (e.g. postgresql://user@127.0.0.1:5432/camserve)")
        if not self.path:
            raise ConfigError("audit.path must not be empty")
        for name in ("queue_size", "rotate_bytes"):
            _positive(f"audit.{name}", getattr(self, name))
        if not self.timeout_s > 0:
            raise ConfigError(f"audit.timeout_s must be > 0, got {self.timeout_s!r}")


@dataclass(frozen=True)
class MetricsConfig:
    """Faithfulness scoring sampled on a live endpoint (:mod:`camserve.faithfulness.sampler`).

    A share ``sample_rate`` of explained requests (those that did not ask ``metrics``
    themselves) is scored with ``sample_metrics`` after the answer has left, in one
    low-priority background thread per worker; a draw that finds ``sample_queue`` requests
    already waiting is dropped and counted, so scoring never slows serving down.
    """

    sample_rate: float = 0.0
    sample_metrics: str = "road,drop,increase"
    sample_queue: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ConfigError(f"metrics.sample_rate must be in [0, 1], got {self.sample_rate!r}")
        _positive("metrics.sample_queue", self.sample_queue)
        from camserve.faithfulness import parse_metrics

        try:
            parse_metrics(self.sample_metrics)
        except CamserveError as exc:
            raise ConfigError(f"metrics.sample_metrics: {exc}") from None


@dataclass(frozen=True)
class Config:
    """The whole configuration; see the module docstring for how it is layered."""

    limits: Limits = field(default_factory=Limits)
    server: ServerConfig = field(default_factory=ServerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def frontend_max_request_bytes(self) -> int:
        """The body size above which TorchServe's frontend refuses before any handler runs.

        Above ``limits.max_body_bytes`` so that the handler, not the frontend, refuses (and
        audits) oversized bodies up to this ceiling; a multipart body's framing fits too.
        """
        if self.server.max_request_bytes:
            return max(self.server.max_request_bytes, self.limits.max_body_bytes)
        return 2 * self.limits.max_body_bytes + 1024 * 1024

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s: {f.name: getattr(getattr(self, s), f.name) for f in fields(getattr(self, s))} for s in _SECTIONS}

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> Config:
        """A copy with ``{section: {field: value}}`` applied (values converted and checked)."""
        sections = {}
        for name in _SECTIONS:
            current = getattr(self, name)
            values = dict(overrides.get(name, {}))
            known = {f.name: f for f in fields(current)}
            for key in values:
                if key not in known:
                    raise ConfigError(f"unknown setting {name}.{key} (known: {', '.join(sorted(known))})")
            hints = typing.get_type_hints(type(current))
            converted = {k: _convert(f"{name}.{k}", v, hints[k]) for k, v in values.items() if v is not None}
            sections[name] = replace(current, **converted) if converted else current
        for extra in set(overrides) - set(_SECTIONS):
            raise ConfigError(f"unknown configuration section {extra!r} (known: {', '.join(_SECTIONS)})")
        return Config(**sections)


_SECTIONS = ("limits", "server", "runtime", "audit", "metrics")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _convert(name: str, value: Any, hint: Any) -> Any:
    """Convert a string (env, CLI) or a parsed file value to the field's type."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(str(value).strip().replace("_", "")) if isinstance(value, str) else int(value)
        if hint is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be of type {hint.__name__}, got {value!r}") from None


def read_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read ``{section: {field: value}}`` from a YAML or JSON file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # yaml and json raise different types
        raise ConfigError(f"configuration file {path} is not valid: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"configuration file {path} must map sections (limits, server, runtime, audit) to settings")
    return data


def from_env(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Collect ``CAMSERVE_<SECTION>_<FIELD>`` variables into ``{section: {field: text}}``."""
    out: dict[str, dict[str, str]] = {}
    for section in _SECTIONS:
        prefix = f"{ENV_PREFIX}{section.upper()}_"
        for key, value in env.items():
            if key.startswith(prefix):
                out.setdefault(section, {})[key[len(prefix) :].lower()] = value
    return out


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Defaults, then ``path`` (or ``$CAMSERVE_CONFIG``), then the environment, then ``overrides``."""
    env = os.environ if env is None else env
    config = Config()
    path = path or env.get(CONFIG_ENV) or None
    if path:
        config = config.with_overrides(read_file(path))
    config = config.with_overrides(from_env(env))
    if overrides:
        config = config.with_overrides(overrides)
    return config


def to_env(config: Config) -> dict[str, str]:
    """The environment variables that reproduce ``config`` (handed to the worker)."""
    env = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            env[f"{ENV_PREFIX}{section.upper()}_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env
