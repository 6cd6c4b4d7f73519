"""``verify``: walk a log's hash chain and name every record that was edited, removed or moved.

For each stored record, in chain order, with ``prev`` the hash of the one before
(``GENESIS`` before the first)::

    SHA-256(body) == stored hash          else: the record was edited (body or hash)
    body.seq == stored seq == expected    else: a record before it was deleted or moved
    body.prev_hash == prev                else: the record before it was edited or deleted
    indexed columns == columns(body)      else: a column was edited (queries would lie)

The chain cannot show a deletion of the newest records (nothing comes after them to
break); compare the head's seq with an outside copy (``verify`` prints it) for that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from camserve.audit.records import GENESIS, Stored, columns, sha256_text
from camserve.audit.sink import Sink


@dataclass
class Problem:
    seq: int
    request_id: str
    where: str
    reason: str

    def __str__(self) -> str:
        at = f" ({self.where})" if self.where else ""
        return f"record seq {self.seq} request_id {self.request_id or '?'}{at}: {self.reason}"


@dataclass
class Report:
    records: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(rows: list[Stored] | object) -> Report:
    """Verify stored rows in chain order (see the module docstring)."""
    report = Report()
    prev, expected = GENESIS, 1
    for row in rows:  # type: ignore[attr-defined]
        report.records += 1
        reasons = []
        try:
            body = json.loads(row.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            reasons.append("the body is not a JSON object")
            body = {}
        if sha256_text(row.body) != row.hash:
            reasons.append("its hash does not match its content (the record was edited)")
        if row.seq != expected or body.get("seq") != row.seq:
            reasons.append(f"seq {body.get('seq', row.seq)} where {expected} was expected (a record was deleted, added or moved)")
        if body.get("prev_hash") != prev or row.prev_hash != body.get("prev_hash"):
            reasons.append("its link to the previous record is broken (the record before it was edited or deleted)")
        if body:
            derived = columns(body)
            changed = [k for k, v in derived.items() if row.cols.get(k) != v]
            if changed:
                reasons.append(f"column(s) {', '.join(changed)} differ from the record's content (edited in the database)")
        rid = str(body.get("request_id") or row.cols.get("request_id") or "")
        report.problems.extend(Problem(row.seq, rid, row.where, r) for r in reasons)
        prev, expected = row.hash, (row.seq if isinstance(row.seq, int) and row.seq > 0 else expected) + 1
        report.head_seq, report.head_hash = row.seq, row.hash
    return report


def verify(sink: Sink) -> Report:
    """Verify the whole chain of ``sink``."""
    report = check(sink.rows())
    report.warnings.extend(getattr(sink, "warnings", []))
    return report
