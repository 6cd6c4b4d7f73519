"""Metric declarations: the TorchServe YAML declares every metric the handler records, and
the shipped Grafana dashboard uses exactly those names."""

from __future__ import annotations

import json
import re
from pathlib import Path

from camserve.pipeline.metrics import LATENCY_BUCKETS, METRICS, SIGNED_HISTOGRAMS, Recorder, dashboard, declarations, label, metrics_config, size_buckets

ROOT = Path(__file__).resolve().parent.parent
NAMES = {name for name, *_ in METRICS}
SERIES = {name: dims for name, _kind, _unit, dims in declarations()}


def test_yaml_declares_every_metric_and_keeps_torchserve_defaults():
    config = metrics_config()
    declared = {m["name"]: (kind, m["dimensions"]) for kind, ms in config["model_metrics"].items() for m in ms}
    for name, kind, _unit, dims, _help in METRICS:
        if kind == "histogram":  # TorchServe's histograms have fixed buckets: three counters instead
            assert declared[f"{name}_bucket"] == ("counter", [*dims, "le"])
            assert declared[f"{name}_count"] == ("counter", list(dims))
            # a sum that observations can lower (faithfulness scores) is a gauge: a counter must not go down
            assert declared[f"{name}_sum"] == ("gauge" if name in SIGNED_HISTOGRAMS else "counter", list(dims))
            assert name not in declared
        else:
            assert declared[name] == (kind, list(dims))
    assert "histogram" not in config["model_metrics"] or not any(
        m["name"].startswith("camserve_") for m in config["model_metrics"]["histogram"])
    assert any(m["name"] == "ts_inference_requests_total" for m in config["ts_metrics"]["counter"])


def test_dashboard_file_is_current_and_uses_only_declared_names():
    shipped = json.loads((ROOT / "grafana" / "camserve-dashboard.json").read_text())
    assert shipped == dashboard()
    exprs = " ".join(t["expr"] for p in shipped["panels"] for t in p["targets"])
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"\bcamserve_[a-z_]+", exprs)}
    assert used == NAMES  # every metric shown, none invented


class FakeMetric:
    def __init__(self, sink, name):
        self.sink, self.name = sink, name

    def add_or_update(self, value, dims):
        self.sink.append((self.name, value, dims))


class FakeCache:
    def __init__(self):
        self.seen = []

    def get_metric(self, name, _kind):
        if name not in SERIES:
            raise KeyError(name)
        return FakeMetric(self.seen, name)


def test_recorder_dimensions_match_declarations_and_never_raise():
    cache = FakeCache()
    rec = Recorder(cache, "my model", "1.0")
    rec.requests(2)
    rec.error("bad,kind:x")
    rec.explain("gradcam++", 0.01)
    rec.batch(3)
    rec.flush()
    for name, _value, values in cache.seen:
        assert len(values) == len(SERIES[name])
    assert cache.seen[1][2] == ["my_model", "1.0", "bad_kind_x"] and label("gradcam++") == "gradcam++"
    Recorder(None, "m", "v").requests(1)  # no cache: a no-op

    class Broken:
        def get_metric(self, *_a):
            raise RuntimeError("metrics backend down")

    broken = Recorder(Broken(), "m", "v")
    broken.explain("gradcam", 1.0)
    broken.flush()  # swallowed


def histogram(cache, name):
    """``{le: count}``, sum and count recorded for histogram ``name`` through the fake cache."""
    buckets, total, count = {}, 0.0, 0
    for series, value, dims in cache.seen:
        if series == f"{name}_bucket":
            buckets[dims[-1]] = buckets.get(dims[-1], 0) + value
        elif series == f"{name}_sum":
            total += value
        elif series == f"{name}_count":
            count += value
    return buckets, total, count


def test_histograms_use_their_own_buckets():
    """Latencies from 1 ms to 60 s, batch sizes 1 .. max_batch_size (not TorchServe's 5 ms .. 10 s)."""
    assert LATENCY_BUCKETS[0] == 0.001 and LATENCY_BUCKETS[-1] == 60.0
    assert all(b / a <= 2.0 for a, b in zip(LATENCY_BUCKETS, LATENCY_BUCKETS[1:]))
    cache = FakeCache()
    rec = Recorder(cache, "m", "1.0", max_batch_size=32)
    rec.inference(0.0012)
    rec.inference(42.0)
    assert not cache.seen  # histograms travel in the background flush, off the request path
    rec.flush()
    buckets, total, count = histogram(cache, "camserve_inference_latency_seconds")
    assert "0.001" not in buckets  # 1.2 ms is above the first bound
    assert buckets["0.002"] == 1 and buckets["60.0"] == 2 and buckets["+Inf"] == 2 and buckets["30.0"] == 1
    assert count == 2 and abs(total - 42.0012) < 1e-9
    assert size_buckets(32) == (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
    for size in (1, 7, 12, 32, 40):
        rec.batch(size)
    rec.flush()
    buckets, total, count = histogram(cache, "camserve_batch_size")
    assert buckets["1.0"] == 1 and buckets["7.0"] == 2 and buckets["8.0"] == 2 and buckets["16.0"] == 3
    assert buckets["32.0"] == 4 and buckets["+Inf"] == 5 and total == 92 and count == 5
    rec.request_latency(0.05, 8)  # per request: one observation per request of the server batch
    rec.flush()
    buckets, total, count = histogram(cache, "camserve_request_latency_seconds")
    assert count == 8 and buckets["0.06"] == 8 and "0.04" not in buckets and abs(total - 0.4) < 1e-9


def test_histograms_flush_in_the_background():
    """Deltas of many observations go out as one update per series, within flush_s."""
    import time

    cache = FakeCache()
    rec = Recorder(cache, "m", "1.0", flush_s=0.05)
    for _ in range(50):
        rec.inference(0.02)
    deadline = time.monotonic() + 10
    while not any(n == "camserve_inference_latency_seconds_count" for n, _v, _d in cache.seen) and time.monotonic() < deadline:
        time.sleep(0.01)
    buckets, total, count = histogram(cache, "camserve_inference_latency_seconds")
    assert count == 50 and buckets["0.025"] == 50 and buckets["+Inf"] == 50 and abs(total - 1.0) < 1e-9
    assert sum(1 for n, _v, d in cache.seen if n == "camserve_inference_latency_seconds_bucket" and d[-1] == "+Inf") == 1
