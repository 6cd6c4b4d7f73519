"""Prometheus counters of the audit log: nothing is dropped without being counted.

In a TorchServe worker the counters go through ``context.metrics`` (declared in the
metrics YAML by :func:`declare`, served by the frontend's metrics address with every other
camserve metric); every process also keeps them in its own prometheus-client registry,
which the CLI, tests and benchmarks read in-process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from camserve.pipeline.metrics import KIND, MODEL, VERSION, label

WRITTEN = "camserve_audit_records_total"
QUEUE_FULL = "camserve_audit_queue_full_total"
SINK_FAILURES = "camserve_audit_sink_failures_total"
LOST = "camserve_audit_records_lost_total"

#: (name, type, unit, dimensions, help), as in :data:`camserve.pipeline.metrics.METRICS`.
AUDIT_METRICS: tuple[tuple[str, str, str, tuple[str, ...], str], ...] = (
    (WRITTEN, "counter", "count", (MODEL, VERSION), "Audit records committed to the sink"),
    (QUEUE_FULL, "counter", "count", (MODEL, VERSION), "Requests that found the audit queue full"),
    (SINK_FAILURES, "counter", "count", (MODEL, VERSION, KIND), "Failed audit sink writes, by sink"),
    (LOST, "counter", "count", (MODEL, VERSION), "Audit records lost (policy fail-open only)"),
)


def declare(config: dict[str, Any]) -> dict[str, Any]:
    """Add the audit counters to a TorchServe metrics YAML dict (``metrics.metrics_config()``)."""
    from camserve.pipeline.metrics import declare as declare_metrics

    return declare_metrics(config, AUDIT_METRICS)


def write_metrics_config(path: str | Path) -> Path:
    """:func:`camserve.pipeline.metrics.write_metrics_config` with the audit counters declared too."""
    import yaml

    from camserve.pipeline.metrics import metrics_config

    path = Path(path)
    path.write_text(yaml.safe_dump(declare(metrics_config()), sort_keys=False))
    return path


class AuditMetrics:
    """Counts audit events for one model version; recording never raises."""

    def __init__(self, model: str, version: str, cache: Any = None) -> None:
        self.model, self.version = label(model), label(version)
        self.cache = cache
        self.registry = CollectorRegistry()
        self._counters = {
            name: Counter(name.removesuffix("_total"), help_, [d for d in dims], registry=self.registry)
            for name, _kind, _unit, dims, help_ in AUDIT_METRICS
        }

    def _add(self, name: str, value: float = 1, *extra: str) -> None:
        dims = [self.model, self.version, *(label(e) for e in extra)]
        try:
            self._counters[name].labels(*dims).inc(value)
            if self.cache is not None:
                from ts.metrics.metric_type_enum import MetricTypes

                self.cache.get_metric(name, MetricTypes.COUNTER).add_or_update(value, dims)
        except Exception:  # noqa: BLE001 - a metric must never fail the request
            pass

    def written(self, n: int) -> None:
        self._add(WRITTEN, n)

    def queue_full(self) -> None:
        self._add(QUEUE_FULL)

    def sink_failure(self, sink: str) -> None:
        self._add(SINK_FAILURES, 1, sink)

    def lost(self, n: int) -> None:
        self._add(LOST, n)

    def value(self, name: str, **labels: str) -> float:
        """Current value of one counter, summed over label values not given (for tests)."""
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total
