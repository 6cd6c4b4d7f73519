"""The audited service in-process: records per request, stored heatmaps/inputs, policies, CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import threading

import numpy as np
import pytest

from _audit_fixture import audit_config, sample_record, wait_until
from _server_fixture import png_bytes, sample_image, tiny_export
from camserve.audit import open_sink, verify
from camserve.audit.metrics import AuditMetrics
from camserve.audit.service import AuditedService, make_service
from camserve.audit.sink import Sink, SinkError
from camserve.audit.writer import AuditLog, AuditUnavailable
from camserve.cli import main
from camserve.config import load_config
from camserve.pipeline.request import Request
from camserve.pipeline.runtime import GraphSession
from camserve.pipeline.service import Service


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return GraphSession(tiny_export(tmp_path_factory.getbasetemp()), intra_op_threads=1)


def answers(service, requests):
    return [(r.status, json.loads(r.body)) for r in service.handle(requests)]


def test_every_request_recorded_with_heatmaps_and_inputs_once(session, tmp_path, capsys):
    folder = tmp_path / "audit"
    config = load_config(env={}, overrides={"audit": {"path": str(folder), "store_heatmaps": True, "store_inputs": True}})
    service = make_service(config, session)
    assert isinstance(service, AuditedService)
    rgb = sample_image(3, (40, 52))
    good = png_bytes(rgb)
    params = "methods=gradcam,layercam&target=topk&topk=2&output=summary"
    reqs = [Request({"body": good}, "r-1", True, params), Request({"body": b"not an image"}, "r-2", True),
            Request({"body": good}, "r-3", True, params)]
    out = answers(service, reqs)
    assert [s for s, _ in out] == [200, 415, 200]
    service.audit.close()
    sink = open_sink(config.audit)
    rows = list(sink.rows())
    recs = [r.record() for r in rows]
    assert [r["request_id"] for r in recs] == ["r-1", "r-2", "r-3"] == [a["request_id"] for _, a in out]
    ok, bad = recs[0], recs[1]
    assert ok["outcome"] == "answered" and bad["outcome"] == "not_an_image" and bad["status"] == 415
    assert bad["input_sha256"] == [hashlib.sha256(b"not an image").hexdigest()]  # refused input still identified
    assert ok["input_sha256"] == [hashlib.sha256(good).hexdigest()] and ok["image_sizes"] == [[52, 40]]
    assert ok["model"] == out[0][1]["model"] and ok["time"].endswith("Z")
    assert ok["images"][0]["predictions"] == out[0][1]["images"][0]["predictions"]
    shas = [e["heatmap_sha256"] for e in ok["images"][0]["explanations"]]
    assert len(shas) == 4 and [e["heatmap_sha256"] for e in recs[2]["images"][0]["explanations"]] == shas
    assert [(e["method"], e["summary"]) for e in ok["images"][0]["explanations"]] == \
        [(e["method"], e["summary"]) for e in out[0][1]["images"][0]["explanations"]]
    # the stored PNG is the answer's png form of that map, stored once per content hash
    png_answer = answers(make_service(load_config(env={}, overrides={"audit": {"enabled": False}}), session),
                         [Request({"body": good}, "p", True, params.replace("summary", "png"))])[0][1]
    import base64

    assert [hashlib.sha256(base64.b64decode(e["png"])).hexdigest() for e in png_answer["images"][0]["explanations"]] == shas
    conn = __import__("sqlite3").connect(folder / "audit.sqlite")
    kinds = dict(conn.execute("SELECT kind, count(*) FROM blobs GROUP BY kind").fetchall())
    assert kinds == {"heatmap": len(set(shas)), "input": 1}
    assert verify(sink).ok

    # the CLI reads it back
    base = ["--path", str(folder)]
    assert main(["audit", "list", *base, "--outcome", "answered"]) == 0
    listed = capsys.readouterr().out
    assert "r-1" in listed and "r-3" in listed and "r-2" not in listed
    assert main(["audit", "show", "r-1", *base, "--out-dir", str(tmp_path / "show")]) == 0
    shown = capsys.readouterr().out
    assert json.loads(shown)["request_id"] == "r-1"
    overlays = sorted((tmp_path / "show").glob("r-1.0.*.overlay.png"))
    assert len(overlays) == 4
    from camserve.pipeline.render import decode_image

    assert decode_image(overlays[0].read_bytes()).shape[:2] == rgb.shape[:2]  # blended on the stored input
    assert main(["audit", "export", *base, "--format", "csv", "--out", str(tmp_path / "a.csv")]) == 0
    table = list(csv.DictReader(open(tmp_path / "a.csv")))
    assert [r["request_id"] for r in table] == ["r-1", "r-2", "r-3"] and table[1]["outcome"] == "not_an_image"
    top = out[0][1]["images"][0]["predictions"][0]["index"]
    assert main(["audit", "export", *base, "--class", str(top), "--out", str(tmp_path / "a.jsonl")]) == 0
    assert [json.loads(line)["request_id"] for line in open(tmp_path / "a.jsonl")] == ["r-1", "r-3"]
    assert main(["audit", "verify", *base]) == 0
    conn.execute("UPDATE records SET body = replace(body, '\"status\":415', '\"status\":200') WHERE seq = 2")
    conn.commit()
    assert main(["audit", "verify", *base]) == 1
    assert "FAILED: record seq 2 request_id r-2" in capsys.readouterr().out


class FlakySink(Sink):
    """Fails while ``down`` is set; blocks in append while ``gate`` is cleared."""

    name = "flaky"

    def __init__(self) -> None:
        self.down = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.stored: list[dict] = []

    def append(self, records, blobs=()):
        self.gate.wait()
        if self.down.is_set():
            raise SinkError("the sink is down")
        self.stored.extend(records)
        return [(len(self.stored) - len(records) + i + 1, "h") for i in range(len(records))]

    def rows(self, flt=None):
        return iter(())

    def blob(self, sha256):
        return None


def audited(session, policy, timeout_s=5.0, queue_size=16):
    sink = FlakySink()
    metrics = AuditMetrics("tiny", "1.0")
    log = AuditLog(sink, metrics, policy=policy, timeout_s=timeout_s, queue_size=queue_size, retry_s=lambda n: 0.05)
    return AuditedService(session, audit=log), sink, metrics


def good_request(rid):
    return Request({"body": png_bytes(sample_image(5))}, rid, False)


@pytest.mark.parametrize("policy", ["block", "fail-closed", "fail-open"])
def test_sink_down_follows_the_policy(session, policy):
    service, sink, metrics = audited(session, policy, timeout_s=1.0)
    sink.down.set()
    (status, body), = answers(service, [good_request("a")])
    failures = metrics.value("camserve_audit_sink_failures_total", kind="flaky")
    if policy == "fail-open":
        assert status == 200 and metrics.value("camserve_audit_records_lost_total") == 1 and failures == 1
    else:
        assert status == 503 and body["error"]["kind"] == "audit_unavailable" and "policy " + policy in body["error"]["message"]
        assert failures >= (3 if policy == "block" else 1)  # block kept retrying until the batch gave up
    assert sink.stored == []
    sink.down.clear()
    assert [s for s, _ in answers(service, [good_request("b")])] == [200]
    assert [r["request_id"] for r in sink.stored] == ["b"]  # the refused request's record is not written later
    service.audit.close()


def test_block_waits_for_the_sink_to_come_back(session):
    service, sink, metrics = audited(session, "block", timeout_s=20.0)
    sink.down.set()
    threading.Timer(0.5, sink.down.clear).start()
    assert [s for s, _ in answers(service, [good_request("a"), good_request("b")])] == [200, 200]
    assert [r["request_id"] for r in sink.stored] == ["a", "b"] and metrics.value("camserve_audit_sink_failures_total") >= 1
    service.audit.close()


@pytest.mark.parametrize("policy", ["block", "fail-closed", "fail-open"])
def test_full_queue_follows_the_policy(policy):
    sink = FlakySink()
    sink.gate.clear()  # the writer is stuck in its first append
    metrics = AuditMetrics("tiny", "1.0")
    log = AuditLog(sink, metrics, policy=policy, timeout_s=0.3, queue_size=2)
    first = log.submit(sample_record(0))
    assert wait_until(lambda: log.queue.empty())  # the writer took it and hangs
    queued = [log.submit(sample_record(i)) for i in (1, 2)]
    if policy == "fail-open":
        lost = log.submit(sample_record(3))
        assert lost.done.is_set() and not lost.committed and metrics.value("camserve_audit_records_lost_total") == 1
    else:
        with pytest.raises(AuditUnavailable, match="queue"):
            log.submit(sample_record(3))
    assert metrics.value("camserve_audit_queue_full_total") == 1
    sink.gate.set()
    assert log.wait([first, *queued]) == [True, True, True]
    log.close()
    assert [r["request_id"] for r in sink.stored] == ["req-00000", "req-00001", "req-00002"]


def test_audit_off_is_the_plain_service(session):
    service = make_service(load_config(env={}, overrides={"audit": {"enabled": False}}), session)
    assert type(service) is Service and np.all([s == 200 for s, _ in answers(service, [good_request("x")])])


def test_config_validates_the_audit_section():
    from camserve.config import ConfigError

    with pytest.raises(ConfigError, match="audit.policy"):
        load_config(env={"CAMSERVE_AUDIT_POLICY": "sometimes"})
    with pytest.raises(ConfigError, match="audit.dsn"):
        load_config(env={"CAMSERVE_AUDIT_SINK": "postgres"})
    assert audit_config("jsonl", "/x").sink == "jsonl"
