"""Metric declarations: the TorchServe YAML declares every metric the handler records, and
the shipped Grafana dashboard uses exactly those names."""

from __future__ import annotations

import json
import re
from pathlib import Path

from camserve.metrics import METRICS, Recorder, dashboard, label, metrics_config

ROOT = Path(__file__).resolve().parent.parent
NAMES = {name for name, *_ in METRICS}


def test_yaml_declares_every_metric_and_keeps_torchserve_defaults():
    config = metrics_config()
    declared = {m["name"]: (kind, m["dimensions"]) for kind, ms in config["model_metrics"].items() for m in ms}
    for name, kind, _unit, dims, _help in METRICS:
        assert declared[name] == (kind, list(dims))
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
        if name not in NAMES:
            raise KeyError(name)
        return FakeMetric(self.seen, name)


def test_recorder_dimensions_match_declarations_and_never_raise():
    cache = FakeCache()
    rec = Recorder(cache, "my model", "1.0")
    rec.requests(2)
    rec.error("bad,kind:x")
    rec.explain("gradcam++", 0.01)
    rec.batch(3)
    dims = {name: d for name, *_x, d in [(n, None, d) for n, _t, _u, d, _h in METRICS]}
    for name, _value, values in cache.seen:
        assert len(values) == len(dims[name])
    assert cache.seen[1][2] == ["my_model", "1.0", "bad_kind_x"] and label("gradcam++") == "gradcam++"
    Recorder(None, "m", "v").requests(1)  # no cache: a no-op

    class Broken:
        def get_metric(self, *_a):
            raise RuntimeError("metrics backend down")

    Recorder(Broken(), "m", "v").explain("gradcam", 1.0)  # swallowed
