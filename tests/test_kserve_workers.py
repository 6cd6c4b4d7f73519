"""``camserve kserve serve --workers N``: N REST processes on one port, one set of metrics, one audit chain."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import importlib.util
import json
import os
import signal
import time

import pytest

from _server_fixture import http, png_bytes, sample_image, tiny_export

if importlib.util.find_spec("kserve") is None:  # not imported here: kserve parses the command line at import
    pytest.skip("camserve[kserve] is not installed", allow_module_level=True)
pytestmark = pytest.mark.server


def worker_counts(run_dir) -> dict[str, float]:
    """Requests counted by each process, from the files the processes publish."""
    counts = {}
    for path in (run_dir / "metrics").glob("*.json"):
        try:
            rows = json.loads(path.read_text())
        except ValueError:
            continue
        counts[path.stem] = sum(v for name, _dims, v in rows if name == "camserve_requests_total")
    return counts


def test_two_workers_share_the_port_the_metrics_and_the_audit_chain(tmp_path):
    import psutil

    from camserve.cli import kserve as kserve_cli
    from camserve.cli import main
    from camserve.pipeline.metrics import parse_prometheus

    export = tiny_export(tmp_path.parent)
    run = tmp_path / "ks_run"
    state = kserve_cli.start([str(export)], run_dir=run, http_port=0, grpc=False, workers=2)
    try:
        parent = psutil.Process(state["pid"])
        workers = [p for p in parent.children() if "spawn" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in parent.children()]
        body = json.dumps({"instances": [{"image": {"b64": base64.b64encode(png_bytes(sample_image(5))).decode()}}]}).encode()

        def predict(_: int) -> int:
            return http("POST", f"{state['url']}/v1/models/tiny:predict", body, {"Content-Type": "application/json"})[0]

        # The kernel hands each connection to whichever worker accepts first; on a busy machine
        # one may take a whole burst, so bursts go on until both have answered (or 120 s).
        sent, deadline = 0, time.monotonic() + 120
        while True:
            with cf.ThreadPoolExecutor(8) as pool:
                assert set(pool.map(predict, range(40))) == {200}
            sent += 40
            time.sleep(0.6)  # one publication of every process's counters
            if sum(1 for c in worker_counts(run).values() if c > 0) == 2 or time.monotonic() > deadline:
                break
        deadline = time.monotonic() + 30
        while True:  # every process publishes twice a second; a scrape sums them
            samples = parse_prometheus(http("GET", f"{state['url']}/metrics")[2].decode())
            total = sum(v for (name, _labels), v in samples.items() if name == "camserve_requests_total")
            counts = worker_counts(run)
            if total == sent and sum(counts.values()) == sent or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert total == sent and sum(counts.values()) == sent, (sent, total, counts)
        assert sum(1 for c in counts.values() if c > 0) == 2, counts  # both workers answered

        # a worker that dies is replaced by kserve; the port keeps answering
        os.kill(workers[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while len([p for p in parent.children() if p.pid != workers[0].pid and "spawn" in " ".join(p.cmdline())]) < 2:
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.5)
        with cf.ThreadPoolExecutor(4) as pool:
            assert set(pool.map(predict, range(20))) == {200}
    finally:
        kserve_cli.stop(run)
    # one record per answer, one hash chain over every process's records
    from camserve.audit import open_sink
    from camserve.config import AuditConfig

    sink = open_sink(AuditConfig(path=str(run / "audit")))
    try:
        assert len(list(sink.rows())) == sent + 20
    finally:
        sink.close()
    assert main(["audit", "verify", "--run-dir", str(run)]) == 0

