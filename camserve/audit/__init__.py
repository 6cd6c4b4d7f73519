"""The audit log: every served prediction and its explanation, durable, hash-chained, queryable.

* :mod:`.records` -- what a record holds, its canonical text and the hash chain;
* :mod:`.sink` -- the backend interface; :mod:`.sqlite_sink` (default), :mod:`.jsonl_sink`,
  :mod:`.postgres_sink`;
* :mod:`.writer` -- the per-worker bounded queue, writer thread and failure policies;
* :mod:`.service` -- the audited service the TorchServe handler runs;
* :mod:`.verify` -- chain verification; :mod:`.cli` -- ``camserve audit list|show|export|verify``.
"""

from camserve.audit.records import Filter, Stored
from camserve.audit.sink import Sink, SinkError, open_sink
from camserve.audit.verify import Report, verify
from camserve.audit.writer import AuditLog, AuditUnavailable

__all__ = ["AuditLog", "AuditUnavailable", "Filter", "Report", "Sink", "SinkError", "Stored", "open_sink", "verify"]
