"""Audit test helpers: a real throw-away PostgreSQL server, sink factories, sample records.

The PostgreSQL server is the system's (``scripts/ensure_postgres.sh`` finds or installs it):
``initdb`` + ``pg_ctl`` in a temp folder on a free loopback port, run as the ``postgres``
user when the tests run as root (PostgreSQL refuses to run as root), stopped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
SINKS = ("sqlite", "jsonl", "postgres")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "ensure_postgres.sh")], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"no PostgreSQL server for the audit tests: {proc.stderr.strip()}")
    return Path(proc.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def postgres_server(base: Path) -> Iterator[str]:
    """Start PostgreSQL in ``base``; yields a DSN for database ``camserve``."""
    bindir = postgres_bin()
    data, sock = base / "pgdata", base / "pgsock"
    base.mkdir(parents=True, exist_ok=True)
    sock.mkdir(exist_ok=True)
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL will not run as root
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
        for parent in base.parents:  # the postgres user must reach the folder
            if parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o011)
    port = _free_port()
    run = lambda *cmd: subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "camserve", "--no-sync", "-E", "UTF8")
    log = base / "pg.log"
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start")
    try:
        dsn = f"postgresql://camserve@127.0.0.1:{port}/postgres"
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE camserve")
        yield f"postgresql://camserve@127.0.0.1:{port}/camserve"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)


def audit_config(kind: str, folder: Path, dsn: str = "", **extra: Any):
    """An AuditConfig for sink ``kind`` writing under ``folder`` (or to ``dsn``)."""
    from camserve.config import AuditConfig

    return AuditConfig(sink=kind, path=str(folder), dsn=dsn if kind == "postgres" else "", **extra)


def reset_postgres(dsn: str) -> None:
    """Empty the audit tables so each test starts a fresh chain."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS camserve_audit, camserve_audit_blobs")


def sample_record(i: int, *, request_id: str | None = None, outcome: str = "answered") -> dict[str, Any]:
    """A record as Service.record makes it (time as epoch seconds)."""
    rec: dict[str, Any] = {
        "time": 1_790_000_000.0 + i,
        "request_id": request_id or f"req-{i:05d}",
        "model": {"name": "tiny", "version": "1.0", "graph_sha256": "ab" * 32},
        "input_sha256": [f"{i:064x}"],
        "image_sizes": [[40, 30]],
        "outcome": outcome,
        "status": 200 if outcome == "answered" else 415,
    }
    if outcome == "answered":
        rec["images"] = [{"predictions": [{"index": i % 5, "label": f"c{i % 5}", "score": 0.5}],
                          "explanations": [{"method": "gradcam", "target": {"index": (i + 1) % 5, "label": "x", "score": 0.1},
                                            "summary": {"peak": [1, 2], "box_mass": 0.25, "entropy_bits": 3.5}}]}]
        rec["timings_ms"] = {"preprocess": 1.0, "inference": 2.0, "cam": 0.5, "encode": 0.25}
    else:
        rec["error"] = "not an image"
    return rec


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()
