"""SQLite audit sink (the default): one file, WAL mode, many writer processes.

``path/audit.sqlite`` holds ``records`` (seq, hash, prev_hash, indexed columns, body) and
``blobs`` (heatmap PNGs and input images, one row per content hash). WAL lets readers
(``camserve audit``) run while workers write; ``BEGIN IMMEDIATE`` takes the single write
lock before the chain head is read, so concurrent workers append one after another.
``synchronous=NORMAL`` survives a killed process (SIGKILL); ``fsync`` sets FULL, which
also survives power loss. The file is created with mode 0600 (SQLite gives its -wal and
-shm files the same mode).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator

from camserve.audit.records import COLUMNS, GENESIS, Filter, Stored, table_rows
from camserve.audit.sink import Blob, Sink, SinkError, owner_only_dir, touch_private

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY, hash TEXT NOT NULL, prev_hash TEXT NOT NULL,
    time TEXT NOT NULL, request_id TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    outcome TEXT NOT NULL, inputs TEXT NOT NULL, classes TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS records_time ON records (time);
CREATE INDEX IF NOT EXISTS records_request ON records (request_id);
CREATE INDEX IF NOT EXISTS records_model ON records (model, version);
CREATE TABLE IF NOT EXISTS blobs (sha256 TEXT PRIMARY KEY, kind TEXT NOT NULL, data BLOB NOT NULL);
"""


class SQLiteSink(Sink):
    name = "sqlite"

    def __init__(self, folder: str | Path, fsync: bool = False, busy_timeout_s: float = 30.0) -> None:
        self.folder = Path(folder)
        self.file = self.folder / "audit.sqlite"
        self.fsync = fsync
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()

    def describe(self) -> str:
        return f"sqlite {self.file}"

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                owner_only_dir(self.folder)
                touch_private(self.file)
                conn = sqlite3.connect(self.file, timeout=self.busy_timeout_s, isolation_level=None)
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {'FULL' if self.fsync else 'NORMAL'}")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in SCHEMA.split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:  # not after SQLite's own rollback (see append)
                        conn.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as exc:
                raise SinkError(f"cannot open the SQLite audit log {self.file}: {exc}") from None
            self._local.conn = conn
        return conn

    def append(self, records: list[dict[str, Any]], blobs: list[Blob] = ()) -> list[tuple[int, str]]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR IGNORE INTO blobs (sha256, kind, data) VALUES (?, ?, ?)", list(blobs))
                row = conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev = row if row else (0, GENESIS)
                rows, out = table_rows(records, seq, prev)
                conn.executemany(f"INSERT INTO records VALUES ({', '.join('?' * (4 + len(COLUMNS)))})", rows)
                conn.execute("COMMIT")
            except BaseException:
                # SQLite has already rolled back after some errors (SQLITE_FULL: disk full); a
                # second ROLLBACK would raise and hide the reason ("no transaction is active").
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self.close()
            raise SinkError(f"cannot write to the SQLite audit log {self.file}: {exc}") from None
        return out

    def rows(self, flt: Filter | None = None) -> Iterator[Stored]:
        flt = flt or Filter()
        if not self.file.exists():
            raise SinkError(f"no SQLite audit log at {self.file}")
        where, args = flt.sql("?")
        limit = f" LIMIT {int(flt.limit)}" if flt.limit is not None else ""
        sql = f"SELECT seq, hash, prev_hash, {', '.join(COLUMNS)}, body FROM records{where} ORDER BY seq{limit}"
        try:
            for row in self._conn().execute(sql, args):
                yield Stored(row[0], row[1], row[2], row[-1], dict(zip(COLUMNS, row[3:-1])))
        except sqlite3.Error as exc:
            raise SinkError(f"cannot read the SQLite audit log {self.file}: {exc}") from None

    def blob(self, sha256: str) -> bytes | None:
        row = self._conn().execute("SELECT data FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
        return bytes(row[0]) if row else None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass
            self._local.conn = None
