"""camserve's metrics in a prometheus-client registry, for front-ends other than TorchServe.

:class:`camserve.pipeline.metrics.Recorder` and :class:`camserve.audit.metrics.AuditMetrics` record
through a TorchServe-style cache (``get_metric(name, kind).add_or_update(value, dims)``).
:class:`PrometheusCache` is such a cache in-process: it keeps the counters' values and
exposes them from a prometheus-client collector with the *same series names and labels* as
TorchServe's endpoint: counters as ``NAME`` (``camserve_requests_total``), and each camserve
histogram (recorded as ``NAME_bucket{le}`` / ``NAME_sum`` / ``NAME_count`` counter updates)
as a real histogram family ``NAME``, whose exposition has exactly those three series. So
``grafana/camserve-dashboard.json`` reads either server unchanged.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from camserve.pipeline.metrics import METRICS, histogram_series


def _all_metrics() -> tuple:
    from camserve.audit.metrics import AUDIT_METRICS

    return METRICS + AUDIT_METRICS


class _Series:
    """What ``get_metric`` returns: adds to one named series of the cache."""

    def __init__(self, cache: PrometheusCache, name: str) -> None:
        self.cache, self.name = cache, name

    def add_or_update(self, value: float, dimension_values: list[str], request_id: str = "") -> None:
        key = (self.name, tuple(dimension_values))
        with self.cache.lock:
            self.cache.values[key] = self.cache.values.get(key, 0.0) + float(value)


class PrometheusCache(Collector):
    """A process-wide store of camserve's counter updates, collected as Prometheus families."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, tuple[str, ...]], float] = {}
        self.lock = threading.Lock()
        self.metrics = {name: (kind, tuple(dims), help_) for name, kind, _unit, dims, help_ in _all_metrics()}

    def get_metric(self, name: str, kind: Any = None) -> _Series:
        return _Series(self, name)

    def collect(self) -> Iterator[Any]:
        with self.lock:
            snapshot = dict(self.values)
        by_name: dict[str, list[tuple[tuple[str, ...], float]]] = {}
        for (name, dims), value in snapshot.items():
            by_name.setdefault(name, []).append((dims, value))
        for name, (kind, dims, help_) in self.metrics.items():
            if kind == "counter":
                family = CounterMetricFamily(name, help_, labels=list(dims))
                for values, value in by_name.get(name, []):
                    family.add_metric(list(values), value)
                yield family
            else:
                yield _histogram(name, dims, help_, by_name)


def _histogram(name: str, dims: tuple[str, ...], help_: str, by_name: dict) -> HistogramMetricFamily:
    """A histogram family from the cumulative ``NAME_bucket{le}`` and ``NAME_sum`` counters."""
    bucket, total, _count = histogram_series(name)
    family = HistogramMetricFamily(name, help_, labels=list(dims))
    buckets: dict[tuple[str, ...], dict[str, float]] = {}
    for values, value in by_name.get(bucket, []):
        buckets.setdefault(values[:-1], {})[values[-1]] = value
    sums = dict(by_name.get(total, []))
    for values, by_le in buckets.items():
        ordered = sorted(by_le.items(), key=lambda kv: float(kv[0]))
        family.add_metric(list(values), ordered, sums.get(values, 0.0))
    return family


_CACHE: PrometheusCache | None = None
_CACHE_LOCK = threading.Lock()


def process_cache() -> PrometheusCache:
    """The one cache of this process, registered in prometheus-client's default registry."""
    global _CACHE
    with _CACHE_LOCK:
        if _CACHE is None:
            _CACHE = PrometheusCache()
            REGISTRY.register(_CACHE)
        return _CACHE


