"""PostgreSQL audit sink: one chain shared by every worker of every server of a fleet.

Tables ``camserve_audit`` (records) and ``camserve_audit_blobs`` (heatmaps and inputs, one
row per content hash). Each append runs in one transaction that first takes a
transaction-scoped advisory lock, so the chain head read next is the true head for every
writer on every host; the lock is released by COMMIT or by the server when a killed
worker's connection drops (its transaction then rolls back whole). The body is stored as
``text``, not ``jsonb``, because jsonb re-serialises and would change the hashed bytes.
Driver: psycopg 3 (``pip install "psycopg[binary]"``).
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

from camserve.audit.records import COLUMNS, GENESIS, Filter, Stored, table_rows
from camserve.audit.sink import Blob, Sink, SinkError

#: Advisory lock key (any constant shared by every camserve writer): "camserve" in ASCII.
LOCK_KEY = 0x63616D7365727665 & 0x7FFFFFFFFFFFFFFF
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS camserve_audit (
        seq BIGINT PRIMARY KEY, hash TEXT NOT NULL, prev_hash TEXT NOT NULL,
        time TEXT NOT NULL, request_id TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
        outcome TEXT NOT NULL, inputs TEXT NOT NULL, classes TEXT NOT NULL, body TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS camserve_audit_time ON camserve_audit (time)",
    "CREATE INDEX IF NOT EXISTS camserve_audit_request ON camserve_audit (request_id)",
    "CREATE INDEX IF NOT EXISTS camserve_audit_model ON camserve_audit (model, version)",
    "CREATE TABLE IF NOT EXISTS camserve_audit_blobs (sha256 TEXT PRIMARY KEY, kind TEXT NOT NULL, data BYTEA NOT NULL)",
)


def _redact(dsn: str) -> str:
    import re

    return re.sub(r"(password=)\S+|(://[^:/@]+:)[^@]+@", lambda m: (m.group(1) or m.group(2)) + "***" + ("" if m.group(1) else "@"), dsn)


class PostgresSink(Sink):
    name = "postgres"

    def __init__(self, dsn: str, connect_timeout_s: int = 10) -> None:
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self._local = threading.local()

    def describe(self) -> str:
        return f"postgres {_redact(self.dsn)}"

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            return conn
        try:
            import psycopg
        except ImportError:
            raise SinkError('the postgres audit sink needs psycopg 3: pip install "psycopg[binary]"') from None
        try:
            conn = psycopg.connect(self.dsn, connect_timeout=self.connect_timeout_s, autocommit=True)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))  # concurrent CREATEs collide
                for stmt in SCHEMA:
                    conn.execute(stmt)
        except psycopg.Error as exc:
            raise SinkError(f"cannot open the PostgreSQL audit log {_redact(self.dsn)}: {str(exc).strip()}") from None
        self._local.conn = conn
        return conn

    def append(self, records: list[dict[str, Any]], blobs: list[Blob] = ()) -> list[tuple[int, str]]:
        import psycopg

        conn = self._conn()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
                with conn.cursor() as cur:
                    if blobs:
                        cur.executemany(
                            "INSERT INTO camserve_audit_blobs (sha256, kind, data) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                            list(blobs),
                        )
                    row = cur.execute("SELECT seq, hash FROM camserve_audit ORDER BY seq DESC LIMIT 1").fetchone()
                    seq, prev = row if row else (0, GENESIS)
                    rows, out = table_rows(records, seq, prev)
                    cur.executemany(f"INSERT INTO camserve_audit VALUES ({', '.join(['%s'] * (4 + len(COLUMNS)))})", rows)
        except psycopg.Error as exc:
            self.close()
            raise SinkError(f"cannot write to the PostgreSQL audit log {_redact(self.dsn)}: {str(exc).strip()}") from None
        return out

    def rows(self, flt: Filter | None = None) -> Iterator[Stored]:
        import psycopg

        flt = flt or Filter()
        where, args = flt.sql("%s")
        limit = f" LIMIT {int(flt.limit)}" if flt.limit is not None else ""
        sql = f"SELECT seq, hash, prev_hash, {', '.join(COLUMNS)}, body FROM camserve_audit{where} ORDER BY seq{limit}"
        conn = self._conn()
        try:
            with conn.transaction(), conn.cursor(name="camserve_audit_rows") as cur:  # server-side: streams
                cur.execute(sql, args)
                for row in cur:
                    yield Stored(int(row[0]), row[1], row[2], row[-1], dict(zip(COLUMNS, row[3:-1])))
        except psycopg.Error as exc:
            self.close()
            raise SinkError(f"cannot read the PostgreSQL audit log: {str(exc).strip()}") from None

    def blob(self, sha256: str) -> bytes | None:
        conn = self._conn()
        with conn.transaction():
            row = conn.execute("SELECT data FROM camserve_audit_blobs WHERE sha256 = %s", (sha256,)).fetchone()
        return bytes(row[0]) if row else None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
            self._local.conn = None
