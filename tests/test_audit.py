"""The audit log in-process, on all three sinks: chain, concurrent writers, tampering, queries.

PostgreSQL is a real server from the system's packages, started once for this module.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sqlite3
import stat

import pytest

from _audit_fixture import SINKS, audit_config, postgres_server, reset_postgres, sample_record
from camserve.audit import Filter, SinkError, open_sink, verify
from camserve.audit.metrics import AuditMetrics
from camserve.audit.records import GENESIS, parse_time, prepare, seal, sha256_text
from camserve.audit.writer import AuditLog


@pytest.fixture(scope="module")
def pg_dsn(tmp_path_factory):
    with postgres_server(tmp_path_factory.mktemp("pg")) as dsn:
        yield dsn


@pytest.fixture(params=SINKS)
def sink_config(request, tmp_path):
    """An AuditConfig per sink kind, each on an empty log."""
    dsn = ""
    if request.param == "postgres":
        dsn = request.getfixturevalue("pg_dsn")
        reset_postgres(dsn)
    return audit_config(request.param, tmp_path / "audit", dsn)


def write(config, records, log_id="test"):
    sink = open_sink(config)
    try:
        return sink.append([prepare(r, log_id) for r in records])
    finally:
        sink.close()


def test_seal_is_canonical_and_chains():
    rec = prepare(sample_record(1), "w")
    body, digest = seal(rec, 1, GENESIS)
    assert digest == sha256_text(body) and json.loads(body)["prev_hash"] == GENESIS
    assert seal(dict(reversed(list(rec.items()))), 1, GENESIS) == (body, digest)  # key order does not matter
    assert seal(rec, 2, digest)[1] != digest
    assert json.loads(body)["time"] == "2026-09-21T14:13:21.000000Z"


def test_round_trip_filters_and_blobs(sink_config):
    records = [sample_record(i) for i in range(12)] + [sample_record(99, outcome="not_an_image")]
    placed = write(sink_config, records[:5]) + write(sink_config, records[5:])
    assert [seq for seq, _ in placed] == list(range(1, 14))
    sink = open_sink(sink_config)
    rows = list(sink.rows())
    assert [r.cols["request_id"] for r in rows] == [r["request_id"] for r in records]
    assert [r.hash for r in rows] == [h for _, h in placed]
    assert [r.cols["request_id"] for r in sink.rows(Filter(cls=3))] == ["req-00002", "req-00003", "req-00007", "req-00008"]
    assert [r.seq for r in sink.rows(Filter(outcome="not_an_image"))] == [13]
    assert [r.seq for r in sink.rows(Filter(input_sha256=f"{4:064x}"))] == [5]
    assert [r.seq for r in sink.rows(Filter(start=parse_time("2026-09-21T14:13:23Z"), end=parse_time("2026-09-21T14:13:25")))] == [4, 5]
    assert [r.seq for r in sink.rows(Filter(model="tiny", version="1.0", limit=2))] == [1, 2]
    assert list(sink.rows(Filter(version="2.0"))) == []
    sink.append([prepare(sample_record(200), "w")], [("cd" * 32, "heatmap", b"\x89PNG-a"), ("cd" * 32, "heatmap", b"\x89PNG-a")])
    sink.append([prepare(sample_record(201), "w")], [("cd" * 32, "heatmap", b"\x89PNG-a")])  # stored once per hash
    assert sink.blob("cd" * 32) == b"\x89PNG-a" and sink.blob("ef" * 32) is None
    report = verify(sink)
    assert report.ok and report.records == 15 and report.head_seq == 15, report.problems
    sink.close()


def _writer_process(config, worker: int, n: int, per_commit: int) -> None:
    sink = open_sink(config)
    for start in range(0, n, per_commit):
        sink.append([prepare(sample_record(worker * 1000 + i), f"w{worker}") for i in range(start, min(n, start + per_commit))])
    sink.close()


def test_concurrent_writer_processes_share_one_unbroken_chain(sink_config):
    """Four processes append at once: one total order, no fork, no lost or doubled record."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(sink_config, w, 60, 1 + w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    sink = open_sink(sink_config)
    rows = list(sink.rows())
    assert [r.seq for r in rows] == list(range(1, 241))
    assert sorted(r.cols["request_id"] for r in rows) == sorted(f"req-{w * 1000 + i:05d}" for w in range(4) for i in range(60))
    writers = [r.record()["writer"] for r in rows]
    assert len(set(writers)) == 4 and any(a != b for a, b in zip(writers, writers[1:]))
    assert verify(sink).ok
    sink.close()


def _tamper(config, dsn, seq: int, how: str) -> None:
    """Change the stored record ``seq`` the way someone with database access would."""
    if config.sink == "jsonl":
        path = os.path.join(config.path, "audit.jsonl")
        lines = open(path).read().splitlines(keepends=True)
        if how == "edit":
            lines[seq - 1] = lines[seq - 1].replace('"outcome":"answered"', '"outcome":"refused"')
        else:
            del lines[seq - 1]
        open(path, "w").writelines(lines)
        return
    if config.sink == "sqlite":
        conn = sqlite3.connect(os.path.join(config.path, "audit.sqlite"))
        mark, table = "?", "records"
    else:
        import psycopg

        conn = psycopg.connect(dsn)
        mark, table = "%s", "camserve_audit"
    if how == "edit":
        conn.execute(f"UPDATE {table} SET body = replace(body, '\"score\":0.5', '\"score\":0.9') WHERE seq = {mark}", (seq,))
    elif how == "column":
        conn.execute(f"UPDATE {table} SET request_id = 'forged' WHERE seq = {mark}", (seq,))
    else:
        conn.execute(f"DELETE FROM {table} WHERE seq = {mark}", (seq,))
    conn.commit()
    conn.close()


@pytest.mark.parametrize("how", ["edit", "column", "delete"])
def test_verify_names_the_tampered_record(sink_config, how):
    if how == "column" and sink_config.sink == "jsonl":
        pytest.skip("a JSON Lines record has no columns apart from its body")
    write(sink_config, [sample_record(i) for i in range(10)])
    _tamper(sink_config, sink_config.dsn, 6, how)
    report = verify(open_sink(sink_config))
    named = {p.seq for p in report.problems}
    if how == "delete":  # the record after the gap is named, with the reason
        assert named == {7} and "deleted" in report.problems[0].reason
    else:
        assert named == {6}, [str(p) for p in report.problems]
        assert report.problems[0].request_id in ("req-00005", "forged")
    assert not report.ok


def test_sqlite_and_jsonl_files_are_owner_only(tmp_path):
    for kind in ("sqlite", "jsonl"):
        cfg = audit_config(kind, tmp_path / kind)
        write(cfg, [sample_record(1)])
        assert stat.S_IMODE(os.stat(cfg.path).st_mode) == 0o700
        for path in os.listdir(cfg.path):
            full = os.path.join(cfg.path, path)
            if os.path.isfile(full):
                assert stat.S_IMODE(os.stat(full).st_mode) == 0o600, full


def test_jsonl_rotates_and_repairs_a_torn_tail(tmp_path):
    cfg = audit_config("jsonl", tmp_path / "j", rotate_bytes=3000)
    for i in range(0, 30, 3):
        write(cfg, [sample_record(j) for j in range(i, i + 3)])
    files = sorted(os.listdir(cfg.path))
    assert len([f for f in files if f.startswith("audit.0")]) >= 3 and "audit.jsonl" in files
    with open(os.path.join(cfg.path, "audit.jsonl"), "a") as f:
        f.write('{"request_id":"half-writ')  # a writer killed mid-line: never acknowledged
    report = verify(open_sink(cfg))
    assert report.ok and report.records == 30 and any("unfinished" in w for w in report.warnings)
    write(cfg, [sample_record(30)])  # the next writer drops the torn tail and goes on
    report = verify(open_sink(cfg))
    assert report.ok and report.records == 31 and not report.warnings


def test_postgres_down_is_a_clear_sink_error():
    sink = open_sink(audit_config("postgres", "/tmp", "postgresql://camserve@127.0.0.1:1/camserve"))
    with pytest.raises(SinkError, match="PostgreSQL audit log"):
        sink.append([prepare(sample_record(1), "w")])


def test_writer_group_commits_and_counts(sink_config):
    metrics = AuditMetrics("tiny", "1.0")
    log = AuditLog(open_sink(sink_config), metrics, queue_size=64)
    tickets = [log.submit(sample_record(i)) for i in range(40)]
    assert log.wait(tickets) == [True] * 40
    assert sorted(t.seq for t in tickets) == list(range(1, 41))
    assert metrics.value("camserve_audit_records_total", model_name="tiny") == 40
    log.close()
    assert verify(open_sink(sink_config)).records == 40
