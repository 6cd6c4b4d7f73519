"""Two KServe replicas auditing to one real PostgreSQL: one chain, nothing lost, through a SIGKILL.

A client spreads 1,000 v2 requests at concurrency 16 over both replicas; one replica is
SIGKILLed midway and started again. Every answer a client received has exactly one record,
and ``camserve audit verify`` finds the one chain intact.
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from _audit_fixture import postgres_server, reset_postgres
from _server_fixture import png_bytes, sample_image, tiny_export

if importlib.util.find_spec("kserve") is None:  # not imported here: kserve parses the command line at import
    pytest.skip("camserve[kserve] is not installed", allow_module_level=True)
pytestmark = [pytest.mark.server, pytest.mark.slow]
REQUESTS, CLIENTS, KILL_AT = 1000, 16, 300


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """(dsn, [(run_dir, state)] x 2): the tiny model on two KServe servers sharing one audit DSN."""
    from camserve.cli import kserve as kserve_cli

    base = tmp_path_factory.mktemp("replicas")
    export = tiny_export(tmp_path_factory.getbasetemp())
    with postgres_server(base / "pg") as dsn:
        reset_postgres(dsn)
        config = base / "camserve.yaml"
        config.write_text(json.dumps({"audit": {"sink": "postgres", "dsn": dsn}, "runtime": {"ort_threads": 1}}))
        runs = [base / "a", base / "b"]
        try:
            states = [kserve_cli.start([str(export)], run_dir=r, http_port=0, grpc=False, config_file=str(config)) for r in runs]
            yield dsn, config, export, list(zip(runs, states))
        finally:
            for r in runs:
                kserve_cli.stop(r)


def v2_request(i: int) -> bytes:
    image = base64.b64encode(png_bytes(sample_image(i % 7))).decode()
    return json.dumps({"id": f"req-{i}", "parameters": {"methods": "gradcam", "output": "summary"},
                       "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]}).encode()


def test_two_replicas_one_chain_through_a_sigkill(replicas):
    import psutil

    from camserve.cli import kserve as kserve_cli
    from camserve.audit import open_sink, verify
    from camserve.config import AuditConfig

    dsn, config, export, pairs = replicas
    ports = [int(state["url"].rsplit(":", 1)[1]) for _, state in pairs]
    counter = iter(range(REQUESTS))
    lock = threading.Lock()
    received: list[tuple[int, int, str, bool]] = []  # (replica, status, id of a 200 answer, after the restart)
    restarted = threading.Event()

    failures: list[BaseException] = []

    def kill_and_restart() -> None:
        run_dir, state = pairs[0]
        try:
            victim = psutil.Process(state["pid"])
            victim.kill()  # SIGKILL: no graceful shutdown, in-flight requests lost
            victim.wait(30)  # gone (and reaped) before the restart looks for a running server
            kserve_cli.start([str(export)], run_dir=run_dir, http_port=ports[0], grpc=False, config_file=str(config))
        except BaseException as exc:  # noqa: BLE001 - reported by the test, not lost in a thread
            failures.append(exc)
        finally:
            restarted.set()  # the clients wait for it either way

    def client(_: int) -> None:
        conns: dict[int, http.client.HTTPConnection] = {}
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            replica = i % 2
            conn = conns.get(replica) or http.client.HTTPConnection("127.0.0.1", ports[replica], timeout=120)
            conns[replica] = conn
            try:
                conn.request("POST", "/v2/models/tiny/infer", body=v2_request(i), headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                status, body = resp.status, resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conns.pop(replica)
                status, body = 0, b""
                if replica == 0:  # the killed replica: go on once it is back, so it serves again
                    restarted.wait(120)
            answer_id = json.loads(body).get("id", "") if status == 200 else ""
            with lock:
                received.append((replica, status, answer_id, restarted.is_set()))
                if len(received) == KILL_AT:
                    threading.Thread(target=kill_and_restart, daemon=True).start()

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    assert restarted.wait(120) and not failures, f"the killed replica did not come back: {failures}"
    answered = [rid for _, status, rid, _ in received if status == 200]
    assert len(received) == REQUESTS and len(answered) >= REQUESTS // 2
    assert all(status in (0, 200) for _, status, _, _ in received)  # failures only from the kill
    assert any(r == 0 and s == 200 and after for r, s, _, after in received), "no answer from the restarted replica"
    sink = open_sink(AuditConfig(sink="postgres", dsn=dsn))
    try:
        ids = [row.record()["request_id"] for row in sink.rows()]
        report = verify(sink)
    finally:
        sink.close()
    counts = {rid: 0 for rid in answered}
    for rid in ids:
        if rid in counts:
            counts[rid] += 1
    assert sorted(set(counts.values())) == [1], {k: v for k, v in counts.items() if v != 1}
    assert report.ok, report.problems[:3]
