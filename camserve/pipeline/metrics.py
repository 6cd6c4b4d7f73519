"""Metric names and the TorchServe metrics configuration that declares them.

Route chosen: TorchServe's own metrics (``context.metrics`` in the worker, declared in the
``metrics_config`` YAML, ``metrics_mode=prometheus``), served by the frontend on the
metrics address. Why not prometheus-client: its HTTP server inside a worker binds a port,
which works for one worker only; the frontend already aggregates every worker of every
model on one endpoint, and TorchServe's own counters (``ts_inference_requests_total``, ...)
sit next to ours. An undeclared metric is dropped silently, so the names live here once
and both the YAML (:func:`metrics_config`) and the handler (:class:`Recorder`) use them.

Histograms with camserve's own buckets. TorchServe builds every histogram with the
Prometheus client's default buckets (0.005 .. 10 s, not configurable), which puts a fast
model's p95 on a bucket edge and every batch of more than 10 images in ``+Inf``. So each
camserve histogram ``NAME`` is declared as three TorchServe *counters* named exactly like a
histogram's series: ``NAME_bucket`` (extra dimension ``le``, cumulative), ``NAME_sum`` and
``NAME_count``. PromQL treats them as a histogram (``histogram_quantile`` over
``rate(NAME_bucket[5m])``); only the exposition's ``# TYPE`` line says counter. Latency
buckets run from 1 ms to 60 s (:data:`LATENCY_BUCKETS`), batch sizes from 1 to
``limits.max_batch_size`` (:func:`size_buckets`). Latencies are recorded in seconds.

Backend metrics carry no version label by themselves; every camserve metric has
``model_name`` and ``model_version`` dimensions (``Hostname`` is added by TorchServe).
Metric dimensions are passed through TorchServe's log protocol, so their values are
reduced to ``[A-Za-z0-9_.+-]``.
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.utils import floatToGoString

MODEL, VERSION, METHOD, KIND = "model_name", "model_version", "method", "kind"

REQUESTS = "camserve_requests_total"
ERRORS = "camserve_errors_total"
EXPLAIN_LATENCY = "camserve_explain_latency_seconds"
INFERENCE_LATENCY = "camserve_inference_latency_seconds"
PREPROCESS_LATENCY = "camserve_preprocess_latency_seconds"
ENCODE_LATENCY = "camserve_encode_latency_seconds"
BATCH_SIZE = "camserve_batch_size"
REQUEST_LATENCY = "camserve_request_latency_seconds"
DEGENERATE = "camserve_degenerate_maps_total"
FAITHFULNESS = "camserve_faithfulness"
FAITHFULNESS_SAMPLES = "camserve_faithfulness_samples_total"
METRIC, OUTCOME = "metric", "outcome"

#: (name, type, unit, dimensions, help) for every metric the handler records. "Per batch"
#: histograms get one observation per model call (group of alike requests) or server
#: batch; "per request" ones one per HTTP request.
METRICS: tuple[tuple[str, str, str, tuple[str, ...], str], ...] = (
    (REQUESTS, "counter", "count", (MODEL, VERSION), "Requests handled by the camserve handler (one per HTTP request)"),
    (ERRORS, "counter", "count", (MODEL, VERSION, KIND), "Requests refused or failed, by error kind"),
    (DEGENERATE, "counter", "count", (MODEL, VERSION, METHOD), "Maps served flagged degenerate (channel terms cancel)"),
    (REQUEST_LATENCY, "histogram", "seconds", (MODEL, VERSION), "Per request: the server batch's time in the worker"),
    (EXPLAIN_LATENCY, "histogram", "seconds", (MODEL, VERSION, METHOD), "Per model call and method: CAM computation"),
    (INFERENCE_LATENCY, "histogram", "seconds", (MODEL, VERSION), "Per model call: the ONNX Runtime call(s)"),
    (PREPROCESS_LATENCY, "histogram", "seconds", (MODEL, VERSION), "Per server batch: decode and preprocess"),
    (ENCODE_LATENCY, "histogram", "seconds", (MODEL, VERSION), "Per server batch: rendering and JSON encoding"),
    (BATCH_SIZE, "histogram", "count", (MODEL, VERSION), "Per model call: images in the ONNX Runtime call"),
    (FAITHFULNESS, "histogram", "score", (MODEL, VERSION, METRIC, METHOD),
     "Faithfulness metric values (camserve.faithfulness), asked per request or sampled"),
    (FAITHFULNESS_SAMPLES, "counter", "count", (MODEL, VERSION, OUTCOME),
     "Explained requests drawn for background faithfulness scoring: scored, dropped (queue full), failed"),
)
LE = "le"
#: Upper bounds (seconds) of the latency histograms: 1 ms .. 60 s, about 1.5-2x apart.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.04, 0.06, 0.1, 0.15, 0.25, 0.4, 0.6,
    1.0, 1.5, 2.5, 4.0, 6.0, 10.0, 15.0, 30.0, 60.0,
)


#: Upper bounds of the faithfulness histogram: probability changes in [-1, 1] (ROAD, confidence
#: change), drop in [0, 1], increase 0 or 1; finer near 0, where most values of a model lie.
SCORE_BUCKETS: tuple[float, ...] = (
    -1.0, -0.5, -0.25, -0.1, -0.05, -0.02, -0.01, -0.005, -0.001, 0.0,
    0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
)


def size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Batch-size bounds: 1..8 one by one, then powers of two, and ``max_batch_size`` itself."""
    bounds = {float(b) for b in range(1, min(8, max_batch_size) + 1)}
    b = 16
    while b < max_batch_size:
        bounds.add(float(b))
        b *= 2
    bounds.add(float(max_batch_size))
    return tuple(sorted(bounds))


#: Histograms whose observations can be negative: their ``NAME_sum`` would go down, which a
#: TorchServe (Prometheus Java client) counter refuses, so it is a gauge holding the running
#: total (``delta(NAME_sum[w]) / increase(NAME_count[w])`` is the window's mean).
SIGNED_HISTOGRAMS = frozenset({FAITHFULNESS})


def histogram_series(name: str) -> tuple[str, str, str]:
    """The counters standing for histogram ``name``: ``(NAME_bucket, NAME_sum, NAME_count)``."""
    return f"{name}_bucket", f"{name}_sum", f"{name}_count"


def declarations(metrics=None) -> list[tuple[str, str, str, list[str]]]:
    """``(name, TorchServe type, unit, dimensions)`` of every series to declare (histograms as counters)."""
    out = []
    for name, kind, unit, dims, _help in metrics if metrics is not None else METRICS:
        if kind == "histogram":
            bucket, total, count = histogram_series(name)
            out += [(bucket, "counter", "count", [*dims, LE]),
                    (total, "gauge" if name in SIGNED_HISTOGRAMS else "counter", unit, list(dims)),
                    (count, "counter", "count", list(dims))]
        else:
            out.append((name, kind, unit, list(dims)))
    return out

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")


def label(value: Any) -> str:
    """A dimension value safe for TorchServe's metric log lines."""
    return _UNSAFE.sub("_", str(value))[:64] or "_"


def metrics_config() -> dict[str, Any]:
    """TorchServe's default metrics YAML plus camserve's model metrics."""
    import ts

    default = Path(ts.__file__).parent / "configs" / "metrics.yaml"
    return declare(yaml.safe_load(default.read_text()), METRICS)


def declare(config: dict[str, Any], metrics) -> dict[str, Any]:
    """Add ``metrics`` (``(name, type, unit, dims, help)`` rows) to a TorchServe metrics YAML dict."""
    model_metrics = config.get("model_metrics") or {}
    config["model_metrics"] = model_metrics
    for name, kind, unit, dims in declarations(metrics):
        entries = [e for e in (model_metrics.get(kind) or []) if e.get("name") != name]
        entries.append({"name": name, "unit": unit, "dimensions": dims})
        model_metrics[kind] = entries
    return config


def write_metrics_config(path: str | Path) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(metrics_config(), sort_keys=False))
    return path


class Recorder:
    """Records camserve metrics through a TorchServe ``context.metrics`` cache.

    Plain counters are sent at once. Histogram observations only add to in-memory deltas of
    their bucket, sum and count counters, which a background thread sends every
    ``flush_s`` seconds: each counter update is one log line from the worker to the
    frontend, and a histogram observation touches up to 25 bucket counters, so sending them
    per batch would cost the request path milliseconds (``bench/bench_metrics.py``). Lines
    per second are bounded by the number of series, whatever the request rate; histograms
    reach ``/metrics`` up to ``flush_s`` after their answer. Any failure to record is
    swallowed: metrics must never fail a request.
    """

    def __init__(self, cache: Any, model: str, version: str, max_batch_size: int = 64, flush_s: float = 1.0) -> None:
        self.cache = cache
        self.model, self.version = label(model), label(version)
        self.flush_s = flush_s
        self._types: dict[str, Any] = {}
        self._buckets = {name: LATENCY_BUCKETS for name, kind, unit, *_ in METRICS if kind == "histogram" and unit == "seconds"}
        self._buckets[BATCH_SIZE] = size_buckets(max_batch_size)
        self._buckets[FAITHFULNESS] = SCORE_BUCKETS
        #: ``le`` label values per histogram, formatted as prometheus-client formats them.
        self._le = {name: [floatToGoString(b) for b in (*bounds, float("inf"))] for name, bounds in self._buckets.items()}
        self._pending: dict[tuple[str, tuple[str, ...]], float] = {}
        #: running totals of the signed histograms' ``_sum`` gauges, and which changed
        self._totals: dict[tuple[str, tuple[str, ...]], float] = {}
        self._changed: set[tuple[str, tuple[str, ...]]] = set()
        self._lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        if cache is not None:
            from ts.metrics.metric_type_enum import MetricTypes

            self._types = {"counter": MetricTypes.COUNTER, "gauge": MetricTypes.GAUGE}

    def _add(self, name: str, value: float, *extra: str, kind: str = "counter") -> None:
        if self.cache is None:
            return
        try:
            metric = self.cache.get_metric(name, self._types[kind])
            metric.add_or_update(value, [self.model, self.version, *(label(e) for e in extra)])
        except Exception:  # noqa: BLE001 - a metric must never fail the request
            pass

    def _observe(self, name: str, value: float, *extra: str, times: int = 1) -> None:
        """``times`` observations of ``value``: the buckets at or above it, the sum and the count."""
        if self.cache is None:
            return
        bucket, total, count = histogram_series(name)
        extra = tuple(label(e) for e in extra)
        first = bisect.bisect_left(self._buckets[name], value)  # the first bucket with value <= le
        with self._lock:
            pending = self._pending
            for le in self._le[name][first:]:
                key = (bucket, (*extra, le))
                pending[key] = pending.get(key, 0) + times
            if name in SIGNED_HISTOGRAMS:
                self._totals[(total, extra)] = self._totals.get((total, extra), 0.0) + value * times
                self._changed.add((total, extra))
            else:
                pending[(total, extra)] = pending.get((total, extra), 0.0) + value * times
            pending[(count, extra)] = pending.get((count, extra), 0) + times
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="camserve-metrics", daemon=True)
                self._flusher.start()

    def flush(self) -> None:
        """Send the histogram deltas recorded since the last flush (the background thread's job)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            gauges = {key: self._totals[key] for key in self._changed}
            self._changed = set()
        for (name, extra), value in pending.items():
            self._add(name, value, *extra)
        for (name, extra), value in gauges.items():
            self._add(name, value, *extra, kind="gauge")

    def _flush_loop(self) -> None:
        while True:
            time.sleep(self.flush_s)
            self.flush()

    def requests(self, n: int) -> None:
        self._add(REQUESTS, n)

    def error(self, kind: str) -> None:
        self._add(ERRORS, 1, kind)

    def degenerate(self, method: str, n: int = 1) -> None:
        self._add(DEGENERATE, n, method)

    def request_latency(self, seconds: float, n: int) -> None:
        self._observe(REQUEST_LATENCY, seconds, times=n)

    def explain(self, method: str, seconds: float) -> None:
        self._observe(EXPLAIN_LATENCY, seconds, method)

    def inference(self, seconds: float) -> None:
        self._observe(INFERENCE_LATENCY, seconds)

    def preprocess(self, seconds: float) -> None:
        self._observe(PREPROCESS_LATENCY, seconds)

    def encode(self, seconds: float) -> None:
        self._observe(ENCODE_LATENCY, seconds)

    def batch(self, size: int) -> None:
        self._observe(BATCH_SIZE, size)

    def faithfulness(self, method: str, metric: str, value: float) -> None:
        self._observe(FAITHFULNESS, value, metric, method)

    def sample(self, outcome: str, n: int = 1) -> None:
        """A request drawn for background scoring: ``scored``, ``dropped`` or ``failed``."""
        self._add(FAITHFULNESS_SAMPLES, n, outcome)


def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse a Prometheus text exposition into ``{(name, sorted labels): value}`` (for tests, bench).

    Sample names are kept as exposed (what a Prometheus server stores): the client
    library's family parser would append ``_total`` to every counter sample, which would
    hide the ``NAME_bucket`` / ``NAME_sum`` / ``NAME_count`` counters camserve exposes.
    """
    from prometheus_client.parser import _parse_sample

    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            sample = _parse_sample(line)
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def dashboard() -> dict[str, Any]:
    """A Grafana dashboard over exactly the metric names above (``grafana/camserve-dashboard.json``).

    Regenerate the file with ``python -m camserve.pipeline.metrics > grafana/camserve-dashboard.json``.
    """
    sel = '{model_name=~"$model", model_version=~"$version"}'

    def quantiles(metric: str, by: str) -> list[dict[str, str]]:
        return [
            {"expr": f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{sel}[5m])))",
             "legendFormat": f"p{int(q * 100)} {{{{{by.replace(', ', '}} {{')}}}}}"}
            for q in (0.5, 0.95)
        ]

    panels = [
        ("Request latency in the worker, per request (s)", quantiles(REQUEST_LATENCY, "model_version"), "s"),
        ("CAM computation per model call, by method (s)", quantiles(EXPLAIN_LATENCY, "model_version, method"), "s"),
        ("Inference per model call (s)", quantiles(INFERENCE_LATENCY, "model_version"), "s"),
        ("Preprocess per server batch (s)", quantiles(PREPROCESS_LATENCY, "model_version"), "s"),
        ("Encode per server batch (s)", quantiles(ENCODE_LATENCY, "model_version"), "s"),
        ("Requests per second", [{"expr": f"sum by (model_version) (rate({REQUESTS}{sel}[5m]))", "legendFormat": "{{model_version}}"}], "reqps"),
        ("Errors per second by kind", [{"expr": f"sum by (kind) (rate({ERRORS}{sel}[5m]))", "legendFormat": "{{kind}}"}], "reqps"),
        ("Images per ONNX Runtime call (mean, p50, p95)",
         [{"expr": f"sum(rate({BATCH_SIZE}_sum{sel}[5m])) / sum(rate({BATCH_SIZE}_count{sel}[5m]))", "legendFormat": "mean"},
          *quantiles(BATCH_SIZE, "model_version")], "short"),
        ("Faithfulness: median ROADCombined by method (higher = more faithful)",
         [{"expr": f'histogram_quantile(0.5, sum by (le, method) (rate({FAITHFULNESS}_bucket{{model_name=~"$model", '
                   f'model_version=~"$version", metric="road"}}[15m])))', "legendFormat": "{{method}}"}], "short"),
        ("Faithfulness samples per second by outcome",
         [{"expr": f"sum by (outcome) (rate({FAITHFULNESS_SAMPLES}{sel}[5m]))", "legendFormat": "{{outcome}}"}], "short"),
        ("Degenerate maps per second by method", [{"expr": f"sum by (method) (rate({DEGENERATE}{sel}[5m]))", "legendFormat": "{{method}}"}], "short"),
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
