"""Audit records: what is stored per request, its canonical text and the hash chain.

A record is the service's per-request dict (``Service.record``) reduced to JSON values
(UTC time as ISO text, numpy arrays removed) plus its place in the log::

    body = canonical JSON of {..., "seq": n, "prev_hash": hash of record n-1 ("0" * 64 for n = 1)}
    hash = SHA-256(body)

so changing any byte of a record changes its hash, and deleting or reordering records
breaks the ``prev_hash`` link of the record after. Canonical JSON (sorted keys, no spaces,
UTF-8) is stored verbatim, so hashes are recomputed from the exact stored text.
The indexed columns (time, request id, model, ...) are copies of body fields for queries;
:func:`columns` derives them, and ``verify`` checks that they still match the body.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterator, Iterable

GENESIS = "0" * 64
#: Keys the service may add that are not JSON (arrays, bytes): kept out of the stored body.
TRANSIENT = ("cams", "heatmap_pngs", "input_bytes")


def canonical(obj: Any) -> str:
    """Deterministic JSON text: sorted keys, no whitespace, non-ASCII kept as UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def utc_iso(seconds: float) -> str:
    """``2026-11-26T04:50:00.123456Z``: sortable as text, always UTC."""
    return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> str:
    """A user's time bound (ISO date or date-time, naive = UTC) as the stored text form."""
    try:
        value = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        from camserve.errors import InputError

        raise InputError(f"time {text!r} is not an ISO date or date-time (e.g. 2026-11-26T04:50:00)") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    return utc_iso(value.timestamp())


def prepare(record: dict[str, Any], log_id: str) -> dict[str, Any]:
    """The service's record as stored JSON (without seq and prev_hash, set when sealed)."""
    out = {k: v for k, v in record.items() if k not in TRANSIENT}
    t = out.get("time")
    out["time"] = utc_iso(float(t)) if isinstance(t, (int, float)) else str(t)
    out["writer"] = log_id
    return out


def seal(record: dict[str, Any], seq: int, prev_hash: str) -> tuple[str, str]:
    """(body text, hash) of ``record`` as entry ``seq`` after ``prev_hash``."""
    body = canonical({**record, "seq": seq, "prev_hash": prev_hash})
    return body, sha256_text(body)


def classes_of(record: dict[str, Any]) -> list[int]:
    """Classes a record is about: each image's top prediction and every explained target."""
    out: list[int] = []
    for image in record.get("images") or []:
        preds = image.get("predictions") or []
        if preds:
            out.append(int(preds[0]["index"]))
        # a detector's explanation covers its detections (target {"detections": n}, no index)
        out.extend(int(e["target"]["index"]) for e in image.get("explanations") or [] if "index" in e["target"])
    return sorted(set(out))


def chain(records: list[dict[str, Any]], seq: int, prev: str) -> Iterator[tuple[int, str, str, str]]:
    """Seal ``records`` in order after entry ``seq`` whose hash is ``prev``.

    Yields ``(seq, prev_hash, body, hash)`` per record; every sink appends through this.
    """
    for record in records:
        seq += 1
        body, digest = seal(record, seq, prev)
        yield seq, prev, body, digest
        prev = digest


#: The indexed columns of the table sinks, stored after (seq, hash, prev_hash), before body.
COLUMNS = ("time", "request_id", "model", "version", "outcome", "inputs", "classes")


def table_rows(records: list[dict[str, Any]], seq: int, prev: str) -> tuple[list[tuple], list[tuple[int, str]]]:
    """Rows ``(seq, hash, prev_hash, *COLUMNS, body)`` and the ``(seq, hash)`` of each."""
    rows, out = [], []
    for (n, prev_hash, body, digest), record in zip(chain(records, seq, prev), records):
        cols = columns(record)
        rows.append((n, digest, prev_hash, *(cols[c] for c in COLUMNS), body))
        out.append((n, digest))
    return rows, out


def columns(record: dict[str, Any]) -> dict[str, Any]:
    """The indexed columns of a record (all derived from its body)."""
    model = record.get("model") or {}
    return {
        "time": record.get("time", ""),
        "request_id": record.get("request_id", ""),
        "model": model.get("name", ""),
        "version": model.get("version", ""),
        "outcome": record.get("outcome", ""),
        "inputs": "," + ",".join(record.get("input_sha256") or []) + ",",
        "classes": "," + ",".join(str(c) for c in classes_of(record)) + ",",
    }


@dataclass(frozen=True)
class Stored:
    """One stored record as read back: its columns and exact body text."""

    seq: int
    hash: str
    prev_hash: str
    body: str
    cols: dict[str, Any]
    where: str = ""  # file:line for JSON Lines, empty for databases

    def record(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass(frozen=True)
class Filter:
    """Record filters of ``camserve audit list|show|export`` (all optional, combined with AND).

    Times are stored-form text (see :func:`parse_time`); ``start`` inclusive, ``end`` exclusive.
    """

    start: str | None = None
    end: str | None = None
    model: str | None = None
    version: str | None = None
    cls: int | None = None
    request_id: str | None = None
    input_sha256: str | None = None
    outcome: str | None = None
    limit: int | None = None

    def matches(self, cols: dict[str, Any]) -> bool:
        return (
            (self.start is None or cols["time"] >= self.start)
            and (self.end is None or cols["time"] < self.end)
            and (self.model is None or cols["model"] == self.model)
            and (self.version is None or cols["version"] == self.version)
            and (self.cls is None or f",{self.cls}," in cols["classes"])
            and (self.request_id is None or cols["request_id"] == self.request_id)
            and (self.input_sha256 is None or f",{self.input_sha256}," in cols["inputs"])
            and (self.outcome is None or cols["outcome"] == self.outcome)
        )

    def sql(self, mark: str = "?") -> tuple[str, list[Any]]:
        """A WHERE clause (``mark`` is the driver's placeholder) and its parameters."""
        terms, args = [], []
        for cond, value in (
            ("time >= {}", self.start),
            ("time < {}", self.end),
            ("model = {}", self.model),
            ("version = {}", self.version),
            ("classes LIKE {}", None if self.cls is None else f"%,{self.cls},%"),
            ("request_id = {}", self.request_id),
            ("inputs LIKE {}", None if self.input_sha256 is None else f"%,{self.input_sha256},%"),
            ("outcome = {}", self.outcome),
        ):
            if value is not None:
                terms.append(cond.format(mark))
                args.append(value)
        return (" WHERE " + " AND ".join(terms)) if terms else "", args


def limited(rows: Iterable[Stored], flt: Filter) -> Iterable[Stored]:
    """Apply ``flt`` in Python (for sinks without a query language) and its limit."""
    n = 0
    for row in rows:
        if flt.limit is not None and n >= flt.limit:
            return
        if flt.matches(row.cols):
            n += 1
            yield row
