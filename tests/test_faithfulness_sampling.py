"""Issue 14: faithfulness sampled on a live endpoint, after the answer, never in its way."""

from __future__ import annotations

import json
import threading
import time

import pytest

from _server_fixture import png_bytes, sample_image, tiny_export
from camserve.config import load_config
from camserve.faithfulness.sampler import Job, Sampler
from camserve.pipeline.request import Request
from camserve.pipeline.runtime import GraphSession
from camserve.pipeline.service import Service


class Counts:
    """A recorder stand-in that keeps sample outcomes and observed scores."""

    def __init__(self) -> None:
        self.samples: dict[str, int] = {}
        self.scores: list[tuple[str, str, float]] = []

    def sample(self, outcome: str, n: int = 1) -> None:
        self.samples[outcome] = self.samples.get(outcome, 0) + n

    def faithfulness(self, method: str, metric: str, value: float) -> None:
        self.scores.append((method, metric, value))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return GraphSession(tiny_export(tmp_path_factory.getbasetemp()), intra_op_threads=1)


def poll(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def request(rid: str, params: str, seed: int = 1) -> Request:
    return Request({"body": png_bytes(sample_image(seed))}, rid, explain_route=True, header_params=params)


def test_sampled_scores_equal_the_on_demand_ones_and_arrive_after_the_answer(session):
    scored: list[dict] = []
    counts = Counts()
    sampler = Sampler(session, ("drop", "road"), 1.0, 4, counts, on_scored=scored.append, seed=0)
    service = Service(session, sampler=sampler)
    (answer,) = service.handle([request("sampled", "methods=gradcam,layercam")])
    body = json.loads(answer.body)
    assert answer.status == 200 and "metrics" not in body["images"][0]["explanations"][0]  # not in the answer
    poll(lambda: scored)
    (record,) = scored
    assert record["request_id"] == "sampled" and record["outcome"] == "faithfulness"
    assert record["model"] == body["model"] and len(record["input_sha256"]) == 1
    # the same request asking for the metrics itself gets the same figures
    (asked,) = service.handle([request("asked", "methods=gradcam,layercam&metrics=drop,road")])
    by_method = {e["method"]: e["metrics"] for e in json.loads(asked.body)["images"][0]["explanations"]}
    assert len(scored) == 1  # a request that asked for metrics is not sampled again
    for entry in record["faithfulness"]:
        for name, value in by_method[entry["method"]].items():
            assert entry["metrics"][name] == pytest.approx(value, abs=1e-4), (entry["method"], name)
    assert counts.samples == {"scored": 1}
    assert {(m, k) for m, k, _ in counts.scores} >= {("gradcam", "road"), ("layercam", "drop")}
    sampler.close()


def test_a_full_queue_drops_the_sample_and_the_answers_do_not_wait(session):
    release = threading.Event()
    counts = Counts()
    sampler = Sampler(session, ("drop",), 1.0, 1, counts, seed=0)
    started = threading.Event()
    real = sampler._score

    def slow(job):
        started.set()
        release.wait(60)
        real(job)

    sampler._score = slow
    service = Service(session, sampler=sampler)
    statuses = [service.handle([request("r0", "methods=gradcam", seed=0)])[0].status]
    assert started.wait(30)  # the first is being scored (blocked) ...
    statuses += [service.handle([request("r1", "methods=gradcam", seed=1)])[0].status]  # ... the second waits
    statuses += [service.handle([request("r2", "methods=gradcam", seed=5)])[0].status]  # and this one finds it full
    assert statuses == [200, 200, 200] and counts.samples == {"dropped": 1}
    release.set()
    poll(lambda: counts.samples.get("scored") == 2)
    sampler.close()


def test_sample_rate_draws_about_that_share(session):
    sampler = Sampler(session, ("drop",), 0.1, 4, Counts(), seed=3)
    drawn = sum(sampler.draw() for _ in range(5000))
    assert 400 < drawn < 600
    assert not any(Sampler(session, ("drop",), 0.0, 4, Counts()).draw() for _ in range(100))


def test_config_turns_on_audited_sampling(session, tmp_path):
    from camserve.audit import open_sink, verify
    from camserve.audit.service import make_service

    config = load_config(env={"CAMSERVE_METRICS_SAMPLE_RATE": "1", "CAMSERVE_METRICS_SAMPLE_METRICS": "drop,increase",
                              "CAMSERVE_AUDIT_SINK": "jsonl", "CAMSERVE_AUDIT_PATH": str(tmp_path / "audit")})
    service = make_service(config, session, base=tmp_path)
    assert service.sampler is not None and service.sampler.metrics == ("drop", "increase")
    (answer,) = service.handle([request("audited", "methods=gradcam")])
    assert answer.status == 200
    sink = open_sink(config.audit, tmp_path)

    def records():
        return [r.record() for r in sink.rows()]

    poll(lambda: any(r["outcome"] == "faithfulness" for r in records()))
    kinds = {r["outcome"]: r for r in records()}
    assert kinds["answered"]["request_id"] == kinds["faithfulness"]["request_id"] == "audited"
    assert set(kinds["faithfulness"]["faithfulness"][0]["metrics"]) == {"drop", "increase"}
    assert verify(sink).ok  # the extra record is part of the hash chain
    service.sampler.close()
    service.audit.close()


def test_bad_sampling_config_is_refused_naming_the_value():
    from camserve.config import ConfigError

    with pytest.raises(ConfigError, match="sample_rate"):
        load_config(env={"CAMSERVE_METRICS_SAMPLE_RATE": "1.5"})
    with pytest.raises(ConfigError, match="'roadd'"):
        load_config(env={"CAMSERVE_METRICS_SAMPLE_METRICS": "roadd"})
