"""The service with its audit log attached: every request recorded before its answer leaves.

:class:`AuditedService` is :class:`camserve.pipeline.service.Service` whose per-request hook puts
the record aside; ``handle`` queues the batch's records as one unit on the worker's
:class:`~.writer.AuditLog` (one sink transaction) and waits for them before returning the
answers; a request whose record could not be
committed (policy ``block`` after ``timeout_s``, or ``fail-closed``) is answered 503
``audit_unavailable`` instead. With heatmap or input storage on, the record also carries
the CAM arrays and the input bytes (transient keys, stored as blobs by the writer thread).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

from camserve.pipeline.request import Request, Response
from camserve.pipeline.service import Service, _Item
from camserve.audit.metrics import AuditMetrics
from camserve.audit.sink import open_sink
from camserve.audit.writer import AuditLog, AuditUnavailable, Ticket

log = logging.getLogger("camserve.audit")


class AuditedService(Service):
    """A Service whose every answer has a committed audit record (see the module docstring)."""

    def __init__(self, *args: Any, audit: AuditLog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.audit = audit
        self.hooks.insert(0, self._collect)  # first, so hook calls line up with the batch's requests
        self._records: list[dict[str, Any]] = []

    def _collect(self, record: dict[str, Any]) -> None:
        self._records.append(record)

    def _body(self, item: _Item, result: dict[str, Any], n_requests: int, start: float) -> dict[str, Any]:
        body = super()._body(item, result, n_requests, start)
        item._audit_cams = result.get("cams")  # type: ignore[attr-defined]  # for stored heatmaps
        return body

    def record(self, item: _Item, body: dict[str, Any] | None) -> dict[str, Any]:
        record = super().record(item, body)
        parts: list[tuple[str, bytes]] | None = None
        if item.error is not None and len(item.sha256) == 0:  # refused before decoding: hash what was sent
            try:
                parts = item.request.parts()[0]
                record["input_sha256"] = [hashlib.sha256(data).hexdigest() for _, data in parts]
            except Exception:  # noqa: BLE001 - the request's own error is already recorded
                parts = None
        cams = getattr(item, "_audit_cams", None)
        if self.audit.store_heatmaps and cams and body is not None:
            record["cams"] = [{m: c[i] for m, c in cams.items()} for i in range(len(item.images))]
            # the answer's own PNGs (output=png, the default when explaining): no second encoding
            record["heatmap_pngs"] = [[e.get("png") for e in img.get("explanations", [])] for img in body["images"]]
        if self.audit.store_inputs and body is not None:
            try:
                parts = item.request.parts()[0]
                record["input_bytes"] = [data for name, data in parts if name in item.names]
            except Exception:  # noqa: BLE001 - parsed once already; the record goes without them
                log.error("audit: cannot keep the input bytes of request %s", item.request.request_id)
        return record

    def handle(self, requests: list[Request]) -> list[Response]:
        """Answer the batch; the answers leave once the batch's records are committed."""
        self._records = []
        responses = super().handle(requests)
        records, self._records = self._records, []
        if len(records) != len(requests) or any(r.get("request_id") != q.request_id for r, q in zip(records, requests)):
            log.error("audit: %d records do not line up with the %d requests of this batch", len(records), len(requests))
        try:
            tickets: list[Ticket] = self.audit.submit_many(records)
        except AuditUnavailable as exc:
            return [self.error_response(q, exc) for q in requests]
        for i, (ticket, ok) in enumerate(zip(tickets, self.audit.wait(tickets))):
            if not ok and i < len(requests) and ticket.record.get("request_id") == requests[i].request_id:
                why = ticket.error or f"not committed within {self.audit.timeout_s:g} s"
                responses[i] = self.error_response(
                    requests[i], AuditUnavailable(f"the audit record could not be written ({why}); policy {self.audit.policy}"))
        return responses


def make_service(config: Any, session: Any, recorder: Any = None, *, name: str | None = None, version: str | None = None,
                 metrics_cache: Any = None, base: str | os.PathLike | None = None) -> Service:
    """The worker's service: audited when ``config.audit.enabled`` (else a plain Service)."""
    on_device = getattr(session, "post", None) is not None  # runtime.post_processing (camserve.cam.device)
    logging.getLogger("camserve.runtime").info(
        "CAM post-processing: %s", f"ONNX graphs on the {session.device_type} device" if on_device else "numpy on the host")
    kwargs: dict[str, Any] = {"name": name, "version": version, "sampler": _sampler(config, session, recorder)}
    if not config.audit.enabled:
        return Service(session, config.limits, recorder, **kwargs)
    a = config.audit
    sink = open_sink(a, base or os.getcwd())
    name = name or session.manifest.model_name
    version = version or session.manifest.model_version
    audit = AuditLog(sink, AuditMetrics(name, version, metrics_cache), policy=a.policy, queue_size=a.queue_size,
                     timeout_s=a.timeout_s, store_heatmaps=a.store_heatmaps, store_inputs=a.store_inputs)
    log.info("audit log: %s, policy %s, queue %d", sink.describe(), a.policy, a.queue_size)
    service = AuditedService(session, config.limits, recorder, audit=audit, **kwargs)
    if service.sampler is not None:  # sampled scores are audited as records of their own
        service.sampler.on_scored = audit.submit
    return service


def _sampler(config: Any, session: Any, recorder: Any) -> Any:
    """The background faithfulness sampler when ``metrics.sample_rate`` > 0 (else None)."""
    m = getattr(config, "metrics", None)
    if m is None or not m.sample_rate:
        return None
    from camserve.faithfulness import parse_metrics
    from camserve.faithfulness.sampler import Sampler
    from camserve.pipeline.metrics import Recorder

    recorder = recorder or Recorder(None, session.manifest.model_name, session.manifest.model_version)
    log.info("faithfulness sampling: %.3g of explained requests, metrics %s, queue %d", m.sample_rate,
             m.sample_metrics, m.sample_queue)
    return Sampler(session, parse_metrics(m.sample_metrics), m.sample_rate, m.sample_queue, recorder)
