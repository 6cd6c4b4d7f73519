"""The per-worker audit writer: a bounded queue, one writer thread, and the failure policies.

The request thread only puts a server batch's records on the queue
(:meth:`AuditLog.submit_many`); the writer thread drains everything queued, renders stored
heatmaps, and appends it to the sink in ONE transaction (group commit). Before a server batch's answers leave, the handler waits
for that batch's records (:meth:`AuditLog.wait`): an answer is never sent without its
record committed, so a worker killed at any moment cannot have answered unrecorded
requests.

Policies, for a full queue or a failing sink (each event counted, see :mod:`.metrics`):

* ``block`` (default): wait for queue space; the writer retries a failing sink with
  back-off; a batch waits up to ``timeout_s``, then its requests get 503.
* ``fail-closed``: a full queue or a failed write answers 503 at once (no answer without a record).
* ``fail-open``: answer anyway; the record is counted as lost and logged at ERROR level.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from camserve.errors import CamserveError
from camserve.audit.metrics import AuditMetrics
from camserve.audit.records import prepare
from camserve.audit.sink import Blob, Sink

log = logging.getLogger("camserve.audit")

#: Records per sink transaction at most (bounds one commit's size and latency).
MAX_GROUP = 256


class AuditUnavailable(CamserveError):
    """No audit record could be written and the policy refuses to answer without one."""

    kind = "audit_unavailable"
    status = 503


class RecordQueue:
    """A FIFO of record groups bounded by the number of records it holds.

    ``put`` adds one server batch's tickets as a unit (a batch larger than the bound is
    let in alone, when the queue is empty); ``take`` returns everything queued, up to
    ``limit`` records, blocking while empty; after ``close`` it drains, then returns None.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: list[list[Ticket]] = []
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()

    def put(self, tickets: list[Ticket], timeout: float) -> bool:
        with self._cond:
            fits = lambda: self._count == 0 or self._count + len(tickets) <= self.maxsize  # noqa: E731
            if not self._cond.wait_for(fits, timeout):
                return False
            self._items.append(tickets)
            self._count += len(tickets)
            self._cond.notify_all()
            return True

    def take(self, limit: int) -> list[Ticket] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed)
            if not self._items:
                return None
            out: list[Ticket] = []
            while self._items and (not out or len(out) + len(self._items[0]) <= limit):
                out.extend(self._items.pop(0))
            self._count -= len(out)
            self._cond.notify_all()
            return out

    def qsize(self) -> int:
        with self._cond:
            return self._count

    def empty(self) -> bool:
        return self.qsize() == 0

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class Ticket:
    """One record on its way to the sink; ``done`` is set once it is committed or failed."""

    record: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    committed: bool = False
    error: str = ""
    abandoned: bool = False
    seq: int = 0


class AuditLog:
    """Bounded queue + writer thread in front of one :class:`~.sink.Sink` (see the module docstring)."""

    def __init__(self, sink: Sink, metrics: AuditMetrics, *, policy: str = "block", queue_size: int = 1024,
                 timeout_s: float = 30.0, store_heatmaps: bool = False, store_inputs: bool = False,
                 log_id: str | None = None, retry_s: Callable[[int], float] = lambda n: min(2.0, 0.05 * 2**n)) -> None:
        self.sink = sink
        self.metrics = metrics
        self.policy = policy
        self.timeout_s = timeout_s
        self.store_heatmaps = store_heatmaps
        self.store_inputs = store_inputs
        self.log_id = log_id or f"{socket.gethostname()}:{os.getpid()}"
        self.retry_s = retry_s
        self.queue = RecordQueue(queue_size)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="camserve-audit-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # ------------------------------------------------------------ request side ---

    def submit(self, record: dict[str, Any]) -> Ticket:
        """Queue one record (see :meth:`submit_many`)."""
        return self.submit_many([record])[0]

    def submit_many(self, records: list[dict[str, Any]]) -> list[Ticket]:
        """Queue a server batch's records as one unit (one sink transaction).

        A full queue is counted and handled by the policy: ``block`` waits up to
        ``timeout_s``, ``fail-closed`` raises :class:`AuditUnavailable` at once (so does
        ``block`` after waiting), ``fail-open`` returns the tickets already failed (lost).
        """
        tickets = [Ticket(r) for r in records]
        if not tickets or self.queue.put(tickets, timeout=0):
            return tickets
        self.metrics.queue_full()
        if self.policy == "block":
            if self.queue.put(tickets, timeout=self.timeout_s):
                return tickets
            raise AuditUnavailable(f"the audit queue stayed full for {self.timeout_s:g} s (sink {self.sink.describe()})")
        if self.policy == "fail-closed":
            raise AuditUnavailable(f"the audit queue is full ({self.queue.maxsize} records waiting); policy fail-closed refuses to answer")
        self._lose(tickets, "the audit queue is full")
        return tickets

    def wait(self, tickets: list[Ticket]) -> list[bool]:
        """Wait for ``tickets``; True where the answer may leave (committed, or fail-open)."""
        deadline = time.monotonic() + self.timeout_s
        out = []
        for t in tickets:
            if not t.done.wait(max(0.0, deadline - time.monotonic())):
                t.abandoned = True  # the writer skips it if it has not started on it yet
                if self.policy != "fail-open":
                    log.error("audit record for request %s not committed within %.1f s: answering 503",
                              t.record.get("request_id"), self.timeout_s)
            out.append(t.committed or self.policy == "fail-open")
        return out

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued and stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        self.queue.close()
        self._thread.join(timeout)
        self.sink.close()

    # -------------------------------------------------------------- writer side ---

    def _run(self) -> None:
        while True:
            group = self.queue.take(MAX_GROUP)
            if group is None:
                self.sink.close()  # the writer thread's own connection
                return
            self._write(group)

    def _write(self, group: list[Ticket]) -> None:
        attempt = 0
        while True:
            group = [t for t in group if not t.abandoned or self.policy == "fail-open"]
            if not group:
                return
            try:
                records, blobs = self._materialize(group)
                placed = self.sink.append(records, blobs)
            except Exception as exc:  # noqa: BLE001 - any sink failure goes through the policy
                self.metrics.sink_failure(self.sink.name)
                if self.policy == "block" and not self._closed:
                    log.warning("audit sink %s failed (%s); retrying %d record(s)", self.sink.describe(), exc, len(group))
                    time.sleep(self.retry_s(attempt))
                    attempt += 1
                    continue
                if self.policy == "fail-open":
                    self._lose(group, f"the audit sink failed: {exc}")
                else:
                    log.error("audit sink %s failed (%s): %d request(s) answered 503", self.sink.describe(), exc, len(group))
                    for t in group:
                        t.error = str(exc)
                        t.done.set()
                return
            self.metrics.written(len(group))
            for t, (seq, _digest) in zip(group, placed):
                t.committed, t.seq = True, seq
                t.done.set()
            return

    def _lose(self, tickets: list[Ticket], why: str) -> None:
        self.metrics.lost(len(tickets))
        ids = ", ".join(str(t.record.get("request_id")) for t in tickets[:10])
        log.error("AUDIT RECORDS LOST (policy fail-open): %d record(s), %s; request ids: %s", len(tickets), why, ids)
        for t in tickets:
            t.error = why
            t.done.set()

    def _materialize(self, group: list[Ticket]) -> tuple[list[dict[str, Any]], list[Blob]]:
        """Stored JSON per ticket, and the blobs (heatmap PNGs, inputs) they name."""
        records, blobs = [], {}
        for t in group:
            raw = t.record
            rec = prepare(raw, self.log_id)
            if self.store_heatmaps and raw.get("cams") and rec.get("images"):
                rec["images"] = heatmap_refs(rec["images"], raw["cams"], blobs, raw.get("heatmap_pngs"))
            if self.store_inputs and raw.get("input_bytes"):
                for data in raw["input_bytes"]:
                    blobs.setdefault(hashlib.sha256(data).hexdigest(), ("input", data))
                rec["inputs_stored"] = True
            records.append(rec)
        return records, [(sha, kind, data) for sha, (kind, data) in blobs.items()]


def heatmap_refs(images: list[dict[str, Any]], cams: list[dict[str, Any]], blobs: dict[str, tuple[str, bytes]],
                 pngs: list[list[str | None]] | None = None) -> list[dict[str, Any]]:
    """Copies of the record's images whose explanations name their heatmap PNG by SHA-256.

    ``cams[i][method]`` is image i's ``[T, h, w]`` maps of that method, in the order of the
    explanation entries (method-major, then target). The PNG is the answer's ``png`` form:
    grayscale, pixel = round(255 * cam), at the model's resolution; ``pngs[i][j]`` (base64)
    is that PNG already encoded for the answer, used as is when given.
    """
    import base64

    from camserve.pipeline import render

    out = []
    for i, (img, maps) in enumerate(zip(images, cams)):
        count: dict[str, int] = {}
        explanations = []
        for j, e in enumerate(img.get("explanations") or []):
            t = count.get(e["method"], 0)
            count[e["method"]] = t + 1
            stack = maps.get(e["method"])
            given = pngs[i][j] if pngs and i < len(pngs) and j < len(pngs[i]) else None
            if given:
                png = base64.b64decode(given)
            elif stack is None or t >= len(stack):
                explanations.append(e)
                continue
            else:
                png = render.heatmap_png(render.check_cams(stack[t][None]))[0]
            sha = hashlib.sha256(png).hexdigest()
            blobs.setdefault(sha, ("heatmap", png))
            explanations.append({**e, "heatmap_sha256": sha})
        out.append({**img, "explanations": explanations})
    return out
