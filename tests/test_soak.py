"""Soak: a real TorchServe (tiny CNN, 2 workers, SQLite audit) under 1,600 mixed requests at concurrency 32.

The driver is ``bench/soak.py`` (the same code ``python bench/soak.py`` runs with more
requests). One run per module; each test checks one requirement of its figures: no 5xx for
good input, every answer well-formed, worker RSS after the run within 10% of after the
warm-up, descriptors of the frontend and the workers stable, every answer audited (same
request ids, nothing lost) and ``camserve audit verify`` passing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from _server_fixture import http, tiny_export

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import soak  # noqa: E402  (bench/soak.py)

REQUESTS = 1600
CONCURRENCY = 32


@pytest.fixture(scope="module")
def soaked(tmp_path_factory):
    """(instance, audit config, figures) of one soak run; the server is always stopped."""
    from camserve.serving.torchserve.server import _alive, stop

    work = tmp_path_factory.mktemp("soak")
    try:
        instance, audit = soak.start_server(work, tiny_export(tmp_path_factory.getbasetemp()), workers=2)
        figures = soak.soak(instance, audit, requests=REQUESTS, concurrency=CONCURRENCY)
        print("\n" + soak.render(figures, soak.checks(figures)))
        yield instance, audit, figures
    finally:
        if (work / "run" / "state.json").is_file():
            stop(work / "run")
    pids = [instance.pid, *map(int, figures["memory_kb"]["before"])]
    assert not any(_alive(p) for p in pids)


def test_every_request_answered_without_5xx_for_good_input(soaked):
    _instance, _audit, f = soaked
    assert f["requests"] == f["answers"] == REQUESTS
    assert f["good_5xx"] == 0 and "no_answer" not in f["errors_by_kind"], f["problem_examples"]
    assert not any(s.startswith("5") for s in f["status"]), f["status"]
    # the mix really contained every bad kind, each answered with its own error
    assert set(f["errors_by_kind"]) == {"not_an_image", "image_too_large", "bad_parameter"}
    assert f["status"]["200"] > REQUESTS // 2


def test_every_answer_is_well_formed(soaked):
    _instance, _audit, f = soaked
    assert f["problems"] == 0, f["problem_examples"]
    assert f["warmup"]["problems"] == 0


def test_worker_memory_is_flat(soaked):
    _instance, _audit, f = soaked
    before, after = f["memory_kb"]["before"], f["memory_kb"]["after"]
    assert len(before) == 2 and set(after) == set(before)  # the same two workers, none restarted
    for pid, kb in before.items():
        assert after[pid] <= 1.10 * kb, f"worker {pid}: RSS {kb} kB after warm-up, {after[pid]} kB after {REQUESTS} requests"


def test_descriptors_are_stable(soaked):
    _instance, _audit, f = soaked
    fds = f["fds"]
    assert fds["frontend"]["after"] <= fds["frontend"]["before"] + soak.FD_MARGIN["frontend"], fds
    for pid, w in fds["workers"].items():
        assert abs(w["after"] - w["before"]) <= soak.FD_MARGIN["worker"], (pid, w)


def test_every_answer_is_audited(soaked, capsys):
    from camserve.cli import main

    instance, audit, f = soaked
    rec = f["records"]
    assert rec["lost"] == 0 and rec["unanswered"] == 0 and rec["duplicates"] == 0, rec
    assert rec["written"] == rec["answered"] == REQUESTS
    assert rec["verify_ok"]
    assert main(["audit", "verify", "--run-dir", str(instance.run_dir)]) == 0  # the real CLI on the server's log
    assert "FAILED" not in capsys.readouterr().out
    from camserve.pipeline.metrics import parse_prometheus

    status, _, text = http("GET", f"{instance.metrics_url}/metrics")
    samples = parse_prometheus(text.decode())
    lost = [v for (name, _), v in samples.items() if name == "camserve_audit_records_lost_total"]
    assert status == 200 and sum(lost) == 0


def test_all_checks_of_the_driver_pass(soaked):
    _instance, _audit, f = soaked
    failed = [name for name, ok in soak.checks(f).items() if not ok]
    assert failed == [], soak.render(f, soak.checks(f))


def test_judge_names_malformed_answers():
    """The driver's judgement can fail: wrong status, no JSON, wrong error kind, missing images."""
    job = soak.Job("png", "/explanations/tiny", b"x", "image/png", None, 200, images=2)
    good = {"schema": "camserve/1", "request_id": "r1", "model": {},
            "images": [{"predictions": [1], "explanations": [1]}] * 2}
    assert soak.judge(soak.Outcome(job, 200, "application/json", good)) is None
    assert "status 503" in soak.judge(soak.Outcome(job, 503, "application/json", good))
    assert "not a JSON object" in soak.judge(soak.Outcome(job, 200, "text/plain", None))
    assert "expected 2" in soak.judge(soak.Outcome(job, 200, "application/json", {**good, "images": good["images"][:1]}))
    assert "request_id" in soak.judge(soak.Outcome(job, 200, "application/json", {**good, "request_id": ""}))
    bad = soak.Job("empty", "/explanations/tiny", b"", "image/png", None, 415, "not_an_image")
    err = {"schema": "camserve/1", "request_id": "r2", "model": {}, "error": {"kind": "bad_parameter", "status": 415, "message": "m"}}
    assert "expected kind not_an_image" in soak.judge(soak.Outcome(bad, 415, "application/json", err))
    kinds = {j.kind for j in soak.mix(26, "tiny")}
    assert len(kinds) == len(soak.catalogue("tiny", 0)) == 13
