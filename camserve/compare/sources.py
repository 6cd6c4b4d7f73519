"""Where the two sides' answers come from: a served model, an export directory, an audit log.

* :func:`parse_model_url` accepts ``http://HOST:PORT/predictions/NAME/VERSION`` (also
  ``/explanations/...``) and the short ``http://HOST:PORT/NAME/VERSION``; the version may
  be left out (the server's default version answers).
* :class:`HTTPSide` POSTs each image to ``/predictions/NAME/VERSION`` asking for the
  top-1 class's maps as float16 arrays (``target=top1&output=array``, plus ``metrics=...``
  when faithfulness figures are asked for); latency is the client's wall clock per
  request, so it includes the network, the server's queueing and any metrics.
* :class:`ExportSide` runs :func:`camserve.cam.explain` over a
  :class:`~camserve.pipeline.runtime.GraphSession`, one image per call (latency = that
  call; faithfulness metrics are computed after it and not counted).
* :func:`audit_answers` reads answered records of one ``NAME/VERSION`` keyed by input
  SHA-256; maps come from stored heatmaps (``store_heatmaps``), images from stored inputs.
"""

from __future__ import annotations

import mimetypes
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from camserve.errors import CamserveError, InputError
from camserve.compare.data import Answer, CompareError, top_predictions

ROUTES = ("predictions", "explanations")


def parse_model_url(url: str) -> tuple[str, str, str | None]:
    """``(base URL, model name, version or None)`` from either accepted URL form."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"model URL {url!r} must look like http://HOST:PORT/predictions/NAME/VERSION or http://HOST:PORT/NAME/VERSION")
    segs = [urllib.parse.unquote(s) for s in parts.path.split("/") if s]
    if segs and segs[0] in ROUTES:
        segs = segs[1:]
    if not 1 <= len(segs) <= 2:
        raise InputError(f"model URL {url!r} must name a model and optionally a version (NAME[/VERSION]), got path {parts.path!r}")
    return f"{parts.scheme}://{parts.netloc}", segs[0], segs[1] if len(segs) == 2 else None


def parse_model_ref(ref: str) -> tuple[str, str]:
    """``NAME/VERSION`` (audit mode) as a pair."""
    name, sep, version = ref.partition("/")
    if not sep or not name or not version or "/" in version:
        raise InputError(f"model {ref!r} must be NAME/VERSION (e.g. resnet50/1.0)")
    return name, version


class HTTPSide:
    """One served model version, asked one image at a time."""

    def __init__(self, url: str, token: str | None, methods: list[str], timeout: float = 120.0, topk: int = 5,
                 metrics: tuple[str, ...] = ()) -> None:
        from camserve.serving.client import explain_url

        self.url = url
        base, self.name, self.version = parse_model_url(url)
        self.endpoint = explain_url(base, self.name, self.version, route="predictions")
        self.token, self.methods, self.timeout, self.topk = token, methods, timeout, topk
        self.metrics = tuple(metrics)
        self.model: dict[str, Any] = {"name": self.name, "version": self.version, "url": url}

    def answer(self, name: str, data: bytes) -> Answer:
        from camserve.serving.client import post_image
        from camserve.pipeline.render import from_float16

        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        params = {"methods": ",".join(self.methods), "target": "top1", "output": "array"}
        if self.metrics:
            params["metrics"] = ",".join(self.metrics)
        start = time.perf_counter()
        try:
            body = post_image(self.endpoint, data, ctype if ctype.startswith("image/") else "application/octet-stream",
                              self.token, self.timeout, params)
        except CamserveError as exc:
            raise CompareError(f"{self.url} on {name}: {exc}") from None
        latency = (time.perf_counter() - start) * 1000.0
        try:
            self.model.update(body.get("model") or {})
            img = body["images"][0]
            if not img.get("predictions"):
                raise CompareError(f"{self.url} on {name}: the answer has no predictions (an embedding or sigmoid model?): "
                                   "camserve compare compares softmax classifiers")
            cams, entries = {}, {}
            for e in img.get("explanations", []):
                if e["method"] in self.methods and e["method"] not in cams:
                    cams[e["method"]] = from_float16(e["array"])[0]
                    entries[e["method"]] = e
            preds = img["predictions"][: self.topk]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise CompareError(f"{self.url} on {name}: answer is not camserve/1 with arrays ({exc!r})") from None
        missing = [m for m in self.methods if m not in cams]
        if missing or not preds:
            raise CompareError(f"{self.url} on {name}: the answer has no {', '.join(missing) or 'predictions'}")
        return Answer(predictions=preds, cams=cams, latency_ms=latency, metrics=self._metrics(entries, name))

    def _metrics(self, entries: dict[str, dict], name: str) -> dict[str, dict[str, float]]:
        """Each method's faithfulness figures from its explanation entry (none unless asked)."""
        from camserve.compare.faithfulness import from_explanation

        if not self.metrics:
            return {}
        return {m: from_explanation(e, self.metrics, f"{self.url} on {name}") for m, e in entries.items()}


class ExportSide:
    """One export directory, run in process (no server)."""

    def __init__(self, directory: str | Path, methods: list[str], threads: int = 1, topk: int = 5,
                 metrics: tuple[str, ...] = ()) -> None:
        from camserve.pipeline.runtime import GraphSession

        if not Path(directory).is_dir():
            raise InputError(f"export folder {directory} does not exist")
        self.session = GraphSession(directory, intra_op_threads=threads)
        m = self.session.manifest
        if m.kind != "classifier" or m.output_activation != "softmax":
            raise InputError(f"camserve compare compares softmax classifiers; {directory} holds a "
                             f"{m.output_activation if m.kind == 'classifier' else m.kind} model")
        self.methods, self.topk, self.metrics = methods, topk, tuple(metrics)
        self.model = {"name": m.model_name, "version": m.model_version, "graph_sha256": m.graph_sha256,
                      "export_dir": str(directory)}

    def answer(self, rgb: np.ndarray) -> Answer:
        from camserve import cam
        from camserve.pipeline import imageio

        m = self.session.manifest
        start = time.perf_counter()
        batch = imageio.preprocess([rgb], m.input_size, m.mean, m.std, m.channel_order)
        out = cam.explain(self.session, batch, [cam.TopK(1)], self.methods)
        latency = (time.perf_counter() - start) * 1000.0
        preds = top_predictions(out.logits, m.labels, self.topk)[0]
        cams = {k: v[0][0] for k, v in out.cams.items()}
        scores = {}
        if self.metrics:
            from camserve.compare.faithfulness import score_export

            scores = score_export(self.session, batch, out.logits[:1], cams, int(out.classes[0][0]), self.metrics)
        return Answer(predictions=preds, cams=cams, latency_ms=latency, metrics=scores)


def open_audit(path: str) -> Any:
    """A sink for ``--audit``: a PostgreSQL DSN, a SQLite file, or a log folder (SQLite or JSON Lines)."""
    if path.startswith(("postgresql://", "postgres://")):
        from camserve.audit.postgres_sink import PostgresSink

        return PostgresSink(path)
    p = Path(path)
    if p.is_file():
        from camserve.audit.sqlite_sink import SQLiteSink

        sink = SQLiteSink(p.parent)
        sink.file = p  # any file name: the sink opens self.file
        return sink
    if p.is_dir() and (p / "audit.sqlite").is_file():
        from camserve.audit.sqlite_sink import SQLiteSink

        return SQLiteSink(p)
    if p.is_dir() and any(p.glob("audit*.jsonl")):
        from camserve.audit.jsonl_sink import JSONLSink

        return JSONLSink(p)
    raise InputError(f"audit log {path} does not exist (a SQLite file, an audit folder or a PostgreSQL DSN)")


def audit_answers(sink: Any, ref: str, methods: list[str], topk: int = 5) -> tuple[dict[str, Answer], dict[str, bytes], dict]:
    """``({input sha256: Answer}, {sha256: stored input bytes}, model)`` of one NAME/VERSION.

    The latest answered record wins when an input was sent several times. A record's
    latency is its ``timings_ms`` total, shared by the images of a multi-image request.
    """
    from camserve.audit.records import Filter
    from camserve.compare.progress import bar

    name, version = parse_model_ref(ref)
    answers: dict[str, Answer] = {}
    inputs: dict[str, bytes] = {}
    model: dict[str, Any] = {"name": name, "version": version}
    try:
        rows = list(sink.rows(Filter(model=name, version=version, outcome="answered")))
    except CamserveError as exc:
        raise CompareError(f"cannot read the audit log: {exc}") from None
    with bar(len(rows), f"reading {ref}", unit="rec") as progress:
        for row in rows:
            _add_record(sink, row.record(), methods, topk, answers, inputs, model)
            progress.update()
    if not rows:
        raise CompareError(f"the audit log {sink.describe()} has no answered request of {name}/{version}")
    return answers, inputs, model


def _add_record(sink: Any, rec: dict[str, Any], methods: list[str], topk: int, answers: dict[str, Answer],
                inputs: dict[str, bytes], model: dict[str, Any]) -> None:
    """Fold one answered audit record into ``answers`` / ``inputs`` / ``model`` (later records win)."""
    from camserve.pipeline.render import decode_image

    model.update(rec.get("model") or {})
    shas = rec.get("input_sha256") or []
    latency = float(sum((rec.get("timings_ms") or {}).values()))
    for i, img in enumerate(rec.get("images") or []):
        if i >= len(shas) or not img.get("predictions"):
            continue
        top = int(img["predictions"][0]["index"])
        cams: dict[str, np.ndarray | None] = {}
        peaks: dict[str, tuple[int, int]] = {}
        for e in img.get("explanations") or []:
            m = e.get("method")
            if m not in methods or m in cams or e["target"].get("index") != top:
                continue
            png = sink.blob(e["heatmap_sha256"]) if e.get("heatmap_sha256") else None
            cams[m] = decode_image(png, grayscale=True).astype(np.float32) / 255.0 if png else None
            if (e.get("summary") or {}).get("peak") is not None:
                peaks[m] = tuple(int(v) for v in e["summary"]["peak"])
        if any(m not in cams for m in methods):
            continue  # this record did not explain the top class with every method asked for
        answers[shas[i]] = Answer(predictions=img["predictions"][:topk], cams=cams, latency_ms=latency, peaks=peaks)
        if rec.get("inputs_stored") and shas[i] not in inputs:
            data = sink.blob(shas[i])
            if data:
                inputs[shas[i]] = data
