"""The audit log behind a real TorchServe with 2 workers, on SQLite, JSON Lines and PostgreSQL.

Per sink (one server each, reused by the module's tests): 2,000 requests from 16 concurrent
clients give exactly 2,000 records whose request ids are the answers'; a worker killed with
SIGKILL mid-load loses no answered request's record and the chain still verifies; an edited
record is named by ``camserve audit verify``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from _audit_fixture import SINKS, postgres_server
from _server_fixture import http as http_call, png_bytes, sample_image, tiny_export
from camserve.audit import open_sink, verify
from camserve.cli import main
from camserve.config import load_config
from camserve.config import PORT_FIELDS

pytestmark = [pytest.mark.server, pytest.mark.slow]

PORTS = PORT_FIELDS  # every port camserve serve opens, all free ones in tests
CLIENTS = 16
PARAMS = "output=summary&methods=gradcam"


@pytest.fixture(scope="module", params=SINKS)
def audited_server(request, tmp_path_factory):
    """A 2-worker TorchServe whose audit log is on the parametrized sink."""
    from camserve.serving.torchserve.archive import build_archive
    from camserve.serving.torchserve.server import Instance, start, stop

    kind = request.param
    base = tmp_path_factory.mktemp(f"audit-{kind}")
    export = tiny_export(tmp_path_factory.getbasetemp())
    store = base / "model_store"
    store.mkdir()
    build_archive(export, name="tiny", version="1.0", model_store=store, workers=2, batch_size=8, max_batch_delay_ms=5)
    with (postgres_server(base / "pg") if kind == "postgres" else _nothing()) as dsn:
        audit = {"sink": kind, "path": str(base / "audit"), "dsn": dsn or ""}
        config = load_config(env={}, overrides={
            "server": {**{p: 0 for p in PORTS}, "workers": 2, "batch_size": 8, "max_batch_delay_ms": 5},
            "runtime": {"ort_threads": 1},
            "audit": audit,
        })
        run_dir = base / "run"
        try:
            instance = start(config, run_dir=run_dir, model_store=store)
            yield instance, config.audit, ["--sink", kind, "--path", audit["path"], "--dsn", audit["dsn"]]
        finally:
            if (run_dir / "state.json").exists():
                stop(run_dir)
            assert not Instance.load(run_dir).pid or not _running(Instance.load(run_dir).pid)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _running(pid):
    from camserve.serving.torchserve.server import _alive

    return _alive(pid)


def bodies():
    return [png_bytes(sample_image(s, (36 + 4 * (s % 5), 44))) for s in range(8)]


def load(instance, n, clients=CLIENTS, on_answer=None):
    """``n`` requests from ``clients`` threads (keep-alive connections); [(status, answer or None)]."""
    url = urlsplit(instance.inference_url)
    token = instance.key("inference")
    data = bodies()
    counter = iter(range(n))
    lock = threading.Lock()
    out = []

    def client(_):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                conn.close()
                return
            headers = {"Content-Type": "image/png", "Authorization": f"Bearer {token}", "X-Camserve-Params": PARAMS}
            try:
                conn.request("POST", "/explanations/tiny", body=data[i % len(data)], headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
                status, raw = 0, b""
            try:
                answer = json.loads(raw) if raw else None
            except ValueError:
                answer = None
            with lock:
                out.append((status, answer))
                if on_answer:
                    on_answer(len(out))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return out


def records(config):
    from camserve.audit import SinkError

    sink = open_sink(config)
    try:
        return [row.record() for row in sink.rows()]
    except SinkError:  # no log yet: the first record creates it
        if config.sink == "postgres":
            raise
        return []
    finally:
        sink.close()


def worker_pids(instance):
    status, _, body = http_call("GET", f"{instance.management_url}/models/tiny",
                                headers={"Authorization": f"Bearer {instance.key('management')}"})
    assert status == 200
    return [w["pid"] for w in json.loads(body)[0]["workers"] if w.get("status") == "READY"]


def test_2000_requests_from_16_clients_give_2000_chained_records(audited_server):
    instance, config, _ = audited_server
    before = len(records(config))
    start = time.perf_counter()
    out = load(instance, 2000)
    seconds = time.perf_counter() - start
    print(f"\n{config.sink}: 2000 audited requests in {seconds:.1f} s ({2000 / seconds:.0f}/s)")
    assert [s for s, _ in out] == [200] * 2000
    answered = [a["request_id"] for _, a in out]
    assert len(set(answered)) == 2000
    recs = records(config)[before:]
    assert len(recs) == 2000
    assert sorted(r["request_id"] for r in recs) == sorted(answered)
    assert {r["outcome"] for r in recs} == {"answered"} and len({r["writer"] for r in recs}) == 2  # both workers wrote
    by_id = {a["request_id"]: a for _, a in out}
    for r in recs[:50]:
        assert r["images"][0]["explanations"][0]["summary"] == by_id[r["request_id"]]["images"][0]["explanations"][0]["summary"]
    report = verify(open_sink(config))
    assert report.ok and report.records == before + 2000, report.problems[:3]
    # the workers' audit counters reach TorchServe's metrics endpoint
    from camserve.pipeline.metrics import parse_prometheus

    def written() -> tuple[int, dict]:
        status, _, text = http_call("GET", f"{instance.metrics_url}/metrics")
        assert status == 200
        samples = parse_prometheus(text.decode())
        return sum(v for (name, labels), v in samples.items()
                   if name == "camserve_audit_records_total" and dict(labels).get("model_name") == "tiny"), samples

    deadline = time.monotonic() + 30  # counters travel through the workers' stdout: poll
    while (count_samples := written())[0] < 2000 and time.monotonic() < deadline:
        time.sleep(0.2)
    count, samples = count_samples
    assert count >= 2000
    assert not any(name == "camserve_audit_records_lost_total" and v > 0 for (name, _), v in samples.items())


def test_worker_killed_mid_load_loses_no_answered_record(audited_server):
    instance, config, _ = audited_server
    pids = worker_pids(instance)
    assert len(pids) == 2
    killed = threading.Event()

    def kill_once(answers_so_far):
        if answers_so_far == 150 and not killed.is_set():
            killed.set()
            os.kill(pids[0], signal.SIGKILL)

    out = load(instance, 600, on_answer=kill_once)
    assert killed.is_set()
    answered = [a["request_id"] for s, a in out if s == 200]
    failed = [s for s, _ in out if s != 200]
    assert len(answered) >= 300 and all(s >= 500 or s == 0 for s in failed)  # only the killed worker's batch fails
    stored = {r["request_id"] for r in records(config)}
    missing = [rid for rid in answered if rid not in stored]
    assert missing == []  # every answer a client received has its record
    assert verify(open_sink(config)).ok
    # the server recovers: two READY workers again (a new pid), and new answers are recorded
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (len(worker_pids(instance)) == 2 and pids[0] not in worker_pids(instance)):
        time.sleep(1)
    assert len(worker_pids(instance)) == 2 and pids[0] not in worker_pids(instance)
    after = load(instance, 32)
    assert [s for s, _ in after] == [200] * 32
    stored = {r["request_id"] for r in records(config)}
    assert all(a["request_id"] in stored for _, a in after)
    assert verify(open_sink(config)).ok


def test_an_edited_record_is_named_by_verify(audited_server, capsys):
    instance, config, where = audited_server
    assert main(["audit", "verify", *where]) == 0
    target = records(config)[41]  # seq 42
    if config.sink == "jsonl":
        path = os.path.join(config.path, "audit.jsonl")
        lines = open(path).read().splitlines(keepends=True)
        assert '"seq":42,' in lines[41]
        lines[41] = lines[41].replace('"outcome":"answered"', '"outcome":"not_an_image"', 1)
        open(path, "w").writelines(lines)
    elif config.sink == "sqlite":
        import sqlite3

        conn = sqlite3.connect(os.path.join(config.path, "audit.sqlite"))
        conn.execute("UPDATE records SET body = replace(body, '\"outcome\":\"answered\"', '\"outcome\":\"not_an_image\"') WHERE seq = 42")
        conn.commit()
        conn.close()
    else:
        import psycopg

        with psycopg.connect(config.dsn, autocommit=True) as conn:
            conn.execute("UPDATE camserve_audit SET body = replace(body, '\"outcome\":\"answered\"', '\"outcome\":\"not_an_image\"') WHERE seq = 42")
    capsys.readouterr()
    assert main(["audit", "verify", *where]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED:")]
    assert failed and all(f"record seq 42 request_id {target['request_id']}" in line for line in failed), failed
