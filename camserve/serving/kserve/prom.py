"""camserve's metrics in a prometheus-client registry, for front-ends other than TorchServe.

:class:`camserve.pipeline.metrics.Recorder` and :class:`camserve.audit.metrics.AuditMetrics` record
through a TorchServe-style cache (``get_metric(name, kind).add_or_update(value, dims)``).
:class:`PrometheusCache` is such a cache in-process: it keeps the counters' values and
exposes them from a prometheus-client collector with the *same series names and labels* as
TorchServe's endpoint: counters as ``NAME`` (``camserve_requests_total``), and each camserve
histogram (recorded as ``NAME_bucket{le}`` / ``NAME_sum`` / ``NAME_count`` counter updates)
as a real histogram family ``NAME``, whose exposition has exactly those three series. So
``grafana/camserve-dashboard.json`` reads either server unchanged.

With several server processes (``camserve kserve serve --workers N``) a scrape reaches one of
them, so each process also publishes its counters to a shared folder (``$CAMSERVE_METRICS_DIR``,
one JSON file per process, replaced atomically every :data:`PUBLISH_S`) and a scrape sums
every file with its own live values: counters of all processes, as Prometheus's own
multi-process mode does. A process that died keeps its file, so no counter goes backwards.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from camserve.pipeline.metrics import METRICS, histogram_series


def _all_metrics() -> tuple:
    from camserve.audit.metrics import AUDIT_METRICS

    return METRICS + AUDIT_METRICS


class _Series:
    """What ``get_metric`` returns: adds to one named series of the cache."""

    def __init__(self, cache: PrometheusCache, name: str, gauge: bool = False) -> None:
        self.cache, self.name, self.gauge = cache, name, gauge

    def add_or_update(self, value: float, dimension_values: list[str], request_id: str = "") -> None:
        """Counters add ``value``; gauges (a signed histogram's running ``_sum``) are set to it."""
        key = (self.name, tuple(dimension_values))
        with self.cache.lock:
            self.cache.values[key] = float(value) if self.gauge else self.cache.values.get(key, 0.0) + float(value)


#: Environment variable naming the folder where the processes of one server share counters.
SHARE_ENV = "CAMSERVE_METRICS_DIR"
#: Seconds between two publications of a process's counters (the lag of the others' values).
PUBLISH_S = 0.5


class PrometheusCache(Collector):
    """A process-wide store of camserve's counter updates, collected as Prometheus families."""

    def __init__(self, share_dir: str | Path | None = None) -> None:
        self.values: dict[tuple[str, tuple[str, ...]], float] = {}
        self.lock = threading.Lock()
        self.metrics = {name: (kind, tuple(dims), help_) for name, kind, _unit, dims, help_ in _all_metrics()}
        self.share_dir = Path(share_dir) if share_dir else None
        if self.share_dir is not None:
            self.publish()  # at once: the file also says that this process is up
            threading.Thread(target=self._publisher, name="camserve-metrics-publish", daemon=True).start()

    def get_metric(self, name: str, kind: Any = None) -> _Series:
        return _Series(self, name, gauge=str(getattr(kind, "name", kind)).upper().endswith("GAUGE"))

    def publish(self) -> None:
        """Write this process's counters to ``share_dir/<pid>.json`` (atomic replace)."""
        with self.lock:
            rows = [[name, list(dims), value] for (name, dims), value in self.values.items()]
        path = self.share_dir / f"{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows))
        os.replace(tmp, path)

    def _publisher(self) -> None:
        while True:
            time.sleep(PUBLISH_S)
            try:
                self.publish()
            except OSError:  # a full or vanished folder must not end the thread
                pass

    def snapshot(self) -> dict[tuple[str, tuple[str, ...]], float]:
        """This process's values, plus every other process's published ones."""
        with self.lock:
            total = dict(self.values)
        if self.share_dir is None:
            return total
        for path in self.share_dir.glob("*.json"):
            if path.stem == str(os.getpid()):
                continue
            try:
                rows = json.loads(path.read_text())
            except (OSError, ValueError):  # being replaced right now: its next version counts
                continue
            for name, dims, value in rows:
                key = (name, tuple(dims))
                total[key] = total.get(key, 0.0) + float(value)
        return total

    def collect(self) -> Iterator[Any]:
        snapshot = self.snapshot()
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


def reset_share_dir(path: str | Path) -> Path:
    """Empty ``path`` for a new server and name it in ``$CAMSERVE_METRICS_DIR`` for its processes."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[SHARE_ENV] = str(path)
    return path


def process_cache() -> PrometheusCache:
    """The one cache of this process, registered in prometheus-client's default registry."""
    global _CACHE
    with _CACHE_LOCK:
        if _CACHE is None:
            _CACHE = PrometheusCache(os.environ.get(SHARE_ENV) or None)
            REGISTRY.register(_CACHE)
        return _CACHE


