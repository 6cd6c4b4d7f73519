"""Metric names and the TorchServe metrics configuration that declares them.

Route chosen: TorchServe's own metrics (``context.metrics`` in the worker, declared in the
``metrics_config`` YAML, ``metrics_mode=prometheus``), served by the frontend on the
metrics address. Why not prometheus-client: its HTTP server inside a worker binds a port,
which works for one worker only; the frontend already aggregates every worker of every
model on one endpoint, and TorchServe's own counters (``ts_inference_requests_total``, ...)
sit next to ours. An undeclared metric is dropped silently, so the names live here once
and both the YAML (:func:`metrics_config`) and the handler (:class:`Recorder`) use them.

Histograms use the Prometheus client's default buckets (0.005 .. 10), so latencies are
recorded in seconds. Backend metrics carry no version label by themselves; every camserve
metric has ``model_name`` and ``model_version`` dimensions (``Hostname`` is added by
TorchServe). Metric dimensions are passed through TorchServe's log protocol, so their
values are reduced to ``[A-Za-z0-9_.+-]``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MODEL, VERSION, METHOD, KIND = "model_name", "model_version", "method", "kind"

REQUESTS = "camserve_requests_total"
ERRORS = "camserve_errors_total"
EXPLAIN_LATENCY = "camserve_explain_latency_seconds"
INFERENCE_LATENCY = "camserve_inference_latency_seconds"
PREPROCESS_LATENCY = "camserve_preprocess_latency_seconds"
ENCODE_LATENCY = "camserve_encode_latency_seconds"
BATCH_SIZE = "camserve_batch_size"

#: (name, type, unit, dimensions, help) for every metric the handler records.
METRICS: tuple[tuple[str, str, str, tuple[str, ...], str], ...] = (
    (REQUESTS, "counter", "count", (MODEL, VERSION), "Requests handled by the camserve handler (one per HTTP request)"),
    (ERRORS, "counter", "count", (MODEL, VERSION, KIND), "Requests refused or failed, by error kind"),
    (EXPLAIN_LATENCY, "histogram", "seconds", (MODEL, VERSION, METHOD), "CAM computation per batch and method"),
    (INFERENCE_LATENCY, "histogram", "seconds", (MODEL, VERSION), "The ONNX Runtime call per batch"),
    (PREPROCESS_LATENCY, "histogram", "seconds", (MODEL, VERSION), "Decode and preprocess per batch"),
    (ENCODE_LATENCY, "histogram", "seconds", (MODEL, VERSION), "Rendering and JSON encoding per batch"),
    (BATCH_SIZE, "histogram", "count", (MODEL, VERSION), "Images per ONNX Runtime call"),
)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")


def label(value: Any) -> str:
    """A dimension value safe for TorchServe's metric log lines."""
    return _UNSAFE.sub("_", str(value))[:64] or "_"


def metrics_config() -> dict[str, Any]:
    """TorchServe's default metrics YAML plus camserve's model metrics."""
    import ts

    default = Path(ts.__file__).parent / "configs" / "metrics.yaml"
    config = yaml.safe_load(default.read_text())
    model_metrics = config.setdefault("model_metrics", {}) or {}
    config["model_metrics"] = model_metrics
    for name, kind, unit, dims, _help in METRICS:
        entries = model_metrics.setdefault(kind, []) or []
        model_metrics[kind] = [e for e in entries if e.get("name") != name]
        model_metrics[kind].append({"name": name, "unit": unit, "dimensions": list(dims)})
    return config


def write_metrics_config(path: str | Path) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(metrics_config(), sort_keys=False))
    return path


class Recorder:
    """Records camserve metrics through a TorchServe ``context.metrics`` cache.

    Any failure to record is swallowed: metrics must never fail a request.
    """

    def __init__(self, cache: Any, model: str, version: str) -> None:
        self.cache = cache
        self.model, self.version = label(model), label(version)
        self._types: dict[str, Any] = {}
        if cache is not None:
            from ts.metrics.metric_type_enum import MetricTypes

            self._types = {"counter": MetricTypes.COUNTER, "histogram": MetricTypes.HISTOGRAM}

    def _add(self, name: str, kind: str, value: float, *extra: str) -> None:
        if self.cache is None:
            return
        try:
            metric = self.cache.get_metric(name, self._types[kind])
            metric.add_or_update(value, [self.model, self.version, *(label(e) for e in extra)])
        except Exception:  # noqa: BLE001 - a metric must never fail the request
            pass

    def requests(self, n: int) -> None:
        self._add(REQUESTS, "counter", n)

    def error(self, kind: str) -> None:
        self._add(ERRORS, "counter", 1, kind)

    def explain(self, method: str, seconds: float) -> None:
        self._add(EXPLAIN_LATENCY, "histogram", seconds, method)

    def inference(self, seconds: float) -> None:
        self._add(INFERENCE_LATENCY, "histogram", seconds)

    def preprocess(self, seconds: float) -> None:
        self._add(PREPROCESS_LATENCY, "histogram", seconds)

    def encode(self, seconds: float) -> None:
        self._add(ENCODE_LATENCY, "histogram", seconds)

    def batch(self, size: int) -> None:
        self._add(BATCH_SIZE, "histogram", size)


def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse a Prometheus text exposition into ``{(name, sorted labels): value}`` (for tests, bench)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def dashboard() -> dict[str, Any]:
    """A Grafana dashboard over exactly the metric names above (``grafana/camserve-dashboard.json``).

    Regenerate the file with ``python -m camserve.metrics > grafana/camserve-dashboard.json``.
    """
    sel = '{model_name=~"$model", model_version=~"$version"}'

    def quantiles(metric: str, by: str) -> list[dict[str, str]]:
        return [
            {"expr": f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{sel}[5m])))",
             "legendFormat": f"p{int(q * 100)} {{{{{by.replace(', ', '}} {{')}}}}}"}
            for q in (0.5, 0.95)
        ]

    panels = [
        ("Explanation latency by method (s)", quantiles(EXPLAIN_LATENCY, "model_version, method"), "s"),
        ("Inference latency per batch (s)", quantiles(INFERENCE_LATENCY, "model_version"), "s"),
        ("Preprocess latency per batch (s)", quantiles(PREPROCESS_LATENCY, "model_version"), "s"),
        ("Encode latency per batch (s)", quantiles(ENCODE_LATENCY, "model_version"), "s"),
        ("Requests per second", [{"expr": f"sum by (model_version) (rate({REQUESTS}{sel}[5m]))", "legendFormat": "{{model_version}}"}], "reqps"),
        ("Errors per second by kind", [{"expr": f"sum by (kind) (rate({ERRORS}{sel}[5m]))", "legendFormat": "{{kind}}"}], "reqps"),
        ("Mean images per ONNX Runtime call", [{"expr": f"sum(rate({BATCH_SIZE}_sum{sel}[5m])) / sum(rate({BATCH_SIZE}_count{sel}[5m]))", "legendFormat": "batch"}], "short"),
    ]

    def variable(name: str, label_name: str) -> dict[str, Any]:
        return {"name": name, "type": "query", "datasource": "${datasource}", "includeAll": True, "multi": True,
                "query": f"label_values({REQUESTS}, {label_name})", "refresh": 2}

    return {
        "title": "camserve",
        "uid": "camserve",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus"},
            variable("model", "model_name"),
            variable("version", "model_version"),
        ]},
        "panels": [
            {"id": i + 1, "type": "timeseries", "title": title, "datasource": "${datasource}",
             "gridPos": {"x": 12 * (i % 2), "y": 8 * (i // 2), "w": 12, "h": 8},
             "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
             "targets": [dict(t, refId=chr(65 + j)) for j, t in enumerate(targets)]}
            for i, (title, targets, unit) in enumerate(panels)
        ],
    }


if __name__ == "__main__":
    import json

    print(json.dumps(dashboard(), indent=2))
