"""Issue 14 on a real TorchServe: metrics on demand, and sampled in the background of a live
endpoint into ``/metrics`` and the audit log."""

from __future__ import annotations

import json
import time

import pytest

from _server_fixture import http, png_bytes, sample_image, tiny_export
from camserve.audit import open_sink, verify
from camserve.config import PORT_FIELDS, load_config
from camserve.pipeline.metrics import parse_prometheus

pytestmark = [pytest.mark.server]


@pytest.fixture(scope="module")
def sampling_server(tmp_path_factory):
    """One worker, every explained request drawn for background scoring (drop, road)."""
    from camserve.serving.torchserve.archive import build_archive
    from camserve.serving.torchserve.server import start, stop

    base = tmp_path_factory.mktemp("faith-server")
    store = base / "model_store"
    store.mkdir()
    build_archive(tiny_export(tmp_path_factory.getbasetemp()), name="tiny", version="1.0", model_store=store)
    config = load_config(env={}, overrides={
        "server": {p: 0 for p in PORT_FIELDS},
        "runtime": {"ort_threads": 1},
        "audit": {"sink": "sqlite", "path": str(base / "audit")},
        "metrics": {"sample_rate": 1.0, "sample_metrics": "drop,road"},
    })
    run_dir = base / "run"
    try:
        yield start(config, run_dir=run_dir, model_store=store), config
    finally:
        stop(run_dir)


def post(instance, body: bytes, params: str) -> tuple[int, dict]:
    status, _, answer = http("POST", f"{instance.inference_url}/explanations/tiny", body,
                             {"Content-Type": "image/png", "X-Camserve-Params": params,
                              "Authorization": f"Bearer {instance.key('inference')}"})
    return status, json.loads(answer)


def scrape(instance) -> dict:
    status, _, text = http("GET", f"{instance.metrics_url}/metrics")
    assert status == 200
    return parse_prometheus(text.decode())


def poll(fetch, predicate, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if predicate(value):
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def series(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and labels.items() <= dict(lab).items())


def test_metrics_asked_per_request_are_answered_and_observed(sampling_server):
    instance, _ = sampling_server
    status, body = post(instance, png_bytes(sample_image(3)), "methods=gradcam&metrics=road,drop")
    assert status == 200, body
    metrics = body["images"][0]["explanations"][0]["metrics"]
    assert set(metrics) == {"road", "road_morf", "road_lerf", "drop"} and metrics["drop"] >= 0
    assert body["timings_ms"]["metrics"] > 0
    poll(lambda: scrape(instance),
         lambda s: series(s, "camserve_faithfulness_count", metric="road", method="gradcam", model_name="tiny") >= 1)
    status, body = post(instance, png_bytes(sample_image(3)), "metrics=fidelity")
    assert status == 400 and "'fidelity'" in body["error"]["message"]


def test_sampled_requests_are_scored_after_the_answer_into_metrics_and_audit(sampling_server):
    instance, config = sampling_server
    status, body = post(instance, png_bytes(sample_image(7)), "methods=gradcam,layercam")
    assert status == 200 and "metrics" not in body["images"][0]["explanations"][0]
    request_id = body["request_id"]
    poll(lambda: scrape(instance), lambda s: series(s, "camserve_faithfulness_samples_total", outcome="scored") >= 1)
    samples = poll(lambda: scrape(instance),
                   lambda s: series(s, "camserve_faithfulness_count", metric="drop", method="layercam") >= 1)
    assert series(samples, "camserve_faithfulness_bucket", metric="drop", method="layercam", le="+Inf") >= 1
    samples = poll(lambda: scrape(instance), lambda s: any(n == "camserve_faithfulness_sum" for n, _ in s))  # a gauge

    def faithfulness_records():
        sink = open_sink(config.audit)
        try:
            return [r.record() for r in sink.rows() if r.cols["outcome"] == "faithfulness"]
        finally:
            sink.close()

    records = poll(faithfulness_records, lambda rs: any(r["request_id"] == request_id for r in rs))
    (record,) = [r for r in records if r["request_id"] == request_id]
    assert {e["method"] for e in record["faithfulness"]} == {"gradcam", "layercam"}
    assert all(set(e["metrics"]) == {"drop", "road", "road_morf", "road_lerf"} for e in record["faithfulness"])
    sink = open_sink(config.audit)
    try:
        assert verify(sink).ok
    finally:
        sink.close()
