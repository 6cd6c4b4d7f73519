"""The sink interface every audit backend implements, and the factory that picks one.

A sink stores records in one hash chain per log (database or JSON Lines folder). Several
writers (TorchServe workers, even several servers on one PostgreSQL) append to the same
chain: each :meth:`Sink.append` runs under the backend's exclusive write lock (SQLite
``BEGIN IMMEDIATE``, a PostgreSQL advisory transaction lock, ``flock`` on the JSON Lines
folder), reads the previous record's hash *inside* that lock, seals its records after it
and commits, so the chain is one total order with no forks whatever the concurrency.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

from camserve.errors import CamserveError
from camserve.audit.records import Filter, Stored


class SinkError(CamserveError):
    """The audit backend cannot be opened, written or read."""

    kind = "audit_sink_error"
    status = 503


#: (sha256, kind, bytes): a stored heatmap PNG or input image, kept once per content hash.
Blob = tuple[str, str, bytes]


class Sink(ABC):
    """Where audit records go. Implementations: SQLite, JSON Lines, PostgreSQL."""

    name = "sink"

    @abstractmethod
    def append(self, records: list[dict[str, Any]], blobs: list[Blob] = ()) -> list[tuple[int, str]]:
        """Seal ``records`` after the chain's head and store them with ``blobs`` at once.

        Blobs are stored before (or with) the records that name them. Returns each
        record's ``(seq, hash)``. Raises :class:`SinkError`; then nothing was committed.
        """

    @abstractmethod
    def rows(self, flt: Filter | None = None) -> Iterator[Stored]:
        """Stored records matching ``flt``, in chain order."""

    @abstractmethod
    def blob(self, sha256: str) -> bytes | None:
        """A stored blob by content hash, or None."""

    def close(self) -> None:
        """Release connections and files (the sink may be used again: it reopens)."""

    def describe(self) -> str:
        return self.name


def owner_only_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700): audit data is readable by its owner only."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(path, 0o700)
    except OSError:
        pass
    return path


def touch_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (before a library opens it)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass


def open_sink(audit: Any, base: str | Path | None = None) -> Sink:
    """The sink configured by an :class:`~camserve.config.AuditConfig` (``path`` relative to ``base``)."""
    path = Path(audit.path)
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    if audit.sink == "sqlite":
        from camserve.audit.sqlite_sink import SQLiteSink

        return SQLiteSink(path, fsync=audit.fsync)
    if audit.sink == "jsonl":
        from camserve.audit.jsonl_sink import JSONLSink

        return JSONLSink(path, rotate_bytes=audit.rotate_bytes, fsync=audit.fsync)
    if audit.sink == "postgres":
        from camserve.audit.postgres_sink import PostgresSink

        return PostgresSink(audit.dsn)
    raise SinkError(f"unknown audit sink {audit.sink!r}")
