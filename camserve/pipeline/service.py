"""The request pipeline behind the TorchServe handler, free of TorchServe itself.

One call of :meth:`Service.handle` serves one server batch (a list of HTTP requests)::

    parse parameters -> decode + preprocess every image -> ONE cam.explain call per group
    -> predictions, CAMs in the asked forms -> versioned JSON, one answer per request

Requests of a batch that share their explanation options (methods, aug_smooth,
eigen_smooth) form one group, so a batch of alike requests costs exactly one ONNX Runtime
call (prediction-only images likewise share one forward run). A request that fails
(bad bytes, bad parameter, too large) gets a 4xx JSON error naming the problem and drops out
before the model runs; its neighbours get full answers.

Answer schema ``camserve/1`` (docs/serving.md has a real example)::

    {"schema": "camserve/1", "request_id": str,
     "model": {"name", "version", "graph_sha256"},
     "images": [{"field", "width", "height",
                 "predictions": [{"index", "label", "score"}],          # top 5, softmax
                 "explanations": [{"method", "target": {"index", "label", "score"},
                                   "summary": {...}, "png"?: base64, "overlay"?: base64,
                                   "array"?: {"data", "shape", "dtype"}}]}],
     "timings_ms": {"preprocess", "inference", "cam", "encode"},
     "batch": {"requests": requests in the server batch, "images": images in the model call}}
    error: {"schema": "camserve/1", "request_id", "model": {...},
            "error": {"kind", "status", "message"}}
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from camserve import heads
from camserve.cam import parallel
from camserve.concepts import load as load_concepts
from camserve.pipeline import detection, embedding, imageio, segmentation
from camserve.config import Limits
from camserve.errors import CamserveError
from camserve.pipeline.metrics import Recorder
from camserve.pipeline.params import BadParameter, RequestParams, merge_sources, parse_params
from camserve.pipeline.answer import Answers
from camserve.pipeline.scoring import score_explanation
from camserve.pipeline.request import BodyTooLarge, Request, Response, TooManyImages, header_source

SCHEMA = "camserve/1"
TOP_PREDICTIONS = 5


@dataclass
class _Item:
    request: Request
    params: RequestParams | None = None
    names: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    rows: slice = field(default_factory=lambda: slice(0, 0))
    error: Exception | None = None
    preprocess_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    batch: int = 0
    sha256: list[str] = field(default_factory=list)
    #: embedding models: the decoded ``concept`` part and its SHA-256 (:mod:`.embedding`)
    concept_image: np.ndarray | None = None
    concept_sha256: str = ""
    #: segmentation models: the client mask per image at the input size (:mod:`.segmentation`)
    regions: np.ndarray | None = None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Service(Answers):
    """Serves batches of requests with one graph session (see the module docstring)."""

    def __init__(self, session: Any, limits: Limits | None = None, recorder: Recorder | None = None,
                 explain: Callable[..., Any] | None = None, name: str | None = None, version: str | None = None,
                 hooks: list[Callable[[dict[str, Any]], None]] | None = None, sampler: Any = None) -> None:
        from camserve import cam

        self.session = session
        self.manifest = session.manifest
        self.name = name or self.manifest.model_name
        self.version = version or self.manifest.model_version
        self.limits = limits or Limits()
        self.recorder = recorder or Recorder(None, self.name, self.version, self.limits.max_batch_size)
        self.explain = explain or cam.explain
        self.methods = tuple(cam.available_methods())
        #: Methods this export cannot run: AblationCAM needs the head graph.
        self.unavailable = {
            name: "it needs the head graph (re-export with head=True)"
            for name in self.methods
            if cam.get_method(name).source in ("ablation", "dff") and not self.manifest.head_graph_file
        }
        for name in self.methods:  # FullGrad, ShapleyCAM, guided: an extra graph of the export
            extra = cam.get_method(name).extra
            if extra and extra not in self.manifest.extras:
                self.unavailable[name] = f"it needs the {extra!r} graph (re-export with camserve export --extras {extra})"
        if getattr(self.manifest, "detection", False):  # EigenCAM; gradient methods of box scores with the extra
            self.unavailable = detection.unavailable(self.methods, getattr(session, "box_score", None) is not None)
        self.labels = list(self.manifest.labels)
        #: An embedding model's registered concepts (``camserve concepts add``).
        self.concepts = load_concepts(session.directory) if getattr(self.manifest, "embedding", False) else {}
        #: Called once per request with :meth:`record` (the audit log's entry point). A hook
        #: that raises a CamserveError turns that request's answer into that error
        #: (e.g. 503 when no record can be written and the policy is fail-closed).
        self.hooks = list(hooks or [])
        #: Background faithfulness scoring of a share of explained requests
        #: (:class:`camserve.faithfulness.sampler.Sampler`; None: off).
        self.sampler = sampler

    # ------------------------------------------------------------------ stages ---

    def _parse(self, item: _Item) -> None:
        if item.request.refusal is not None:
            raise item.request.refusal
        size = sum(len(v) for v in item.request.fields.values() if isinstance(v, (bytes, bytearray, memoryview, str)))
        if size > self.limits.max_body_bytes:
            raise BodyTooLarge(f"the request carries {size} bytes, more than the limit of {self.limits.max_body_bytes}")
        parts, query, json_field = item.request.parts()
        parts, concept_bytes = embedding.split_parts(parts)
        parts, mask_bytes = segmentation.split_parts(parts)
        try:
            raw = merge_sources(merge_sources(query, header_source(item.request.header_params)), json_field)
            item.params = parse_params(
                raw,
                num_classes=heads.num_targets(self.manifest),
                known_methods=self.methods,
                explain_default=item.request.explain_route,
                max_targets=self.limits.max_targets,
                max_methods=self.limits.max_methods,
                **(detection.PARAM_DEFAULTS if getattr(self.manifest, "detection", False) else {}),
            )
        except CamserveError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a client sends, a parse failure is a 400
            raise BadParameter(f"the parameters cannot be parsed ({type(exc).__name__}: {str(exc)[:200]})") from None
        self._check_head_params(item.params)
        embedding.check(item.params, self.manifest, self.concepts, concept_bytes is not None, self.name)
        segmentation.check(item.params, self.manifest, mask_bytes is not None, self.name,
                           bool(getattr(self.session, "has_region", False)))
        if concept_bytes is not None and item.params.explain:
            try:
                item.concept_image = imageio.decode(concept_bytes, self.limits.max_pixels)
            except CamserveError as exc:
                raise type(exc)(f"concept image: {exc}") from None
            item.concept_sha256 = hashlib.sha256(concept_bytes).hexdigest()
        for method in item.params.methods if item.params.explain else ():
            if method in self.unavailable:
                raise BadParameter(f"method {method!r} is not available for model {self.name!r}: {self.unavailable[method]}")
        if not parts:
            raise imageio.NotAnImage("the request has no image: send image bytes as the body or as multipart parts")
        if len(parts) > self.limits.max_images_per_request:
            raise TooManyImages(f"the request has {len(parts)} images, more than the limit of {self.limits.max_images_per_request}")
        start = time.perf_counter()
        for name, data in parts:
            try:
                item.images.append(imageio.decode(data, self.limits.max_pixels))
            except CamserveError as exc:
                raise type(exc)(f"image {name!r}: {exc}") from None
            item.names.append(name)
            item.sha256.append(hashlib.sha256(data).hexdigest())
        if item.params.explain:  # a segmentation request's client mask, at the model's input size
            mask = None
            if mask_bytes is not None:
                try:
                    mask = imageio.decode(mask_bytes, self.limits.max_pixels)
                except CamserveError as exc:
                    raise type(exc)(f"mask: {exc}") from None
            item.regions = segmentation.regions(item.params, mask, list(zip(item.names, item.images)),
                                                tuple(self.manifest.input_size))
        item.preprocess_s = time.perf_counter() - start
        if item.params.explain and item.params.metrics:
            maps = len(item.images) * item.params.n_targets * len(item.params.methods)
            if maps > self.limits.max_metric_maps:
                raise BadParameter(f"parameter metrics asks to score {maps} maps ({len(item.images)} images x "
                                   f"{item.params.n_targets} targets x {len(item.params.methods)} methods), more than "
                                   f"the limit of {self.limits.max_metric_maps}")

    def _check_head_params(self, params: RequestParams) -> None:
        """``threshold`` and ``score`` that the model's head cannot honour are 400s."""
        m = self.manifest
        if getattr(m, "detection", False):
            return detection.check_params(params, self.name)
        if params.metrics and getattr(m, "segmentation", False):
            raise BadParameter(f"parameter metrics is not defined for segmentation model {self.name!r} (no class probability "
                               "to perturb)")
        if params.explain and getattr(m, "segmentation", False):
            others = [n for n in params.methods if self._source(n) not in ("gradients", "activations")]
            if others or params.score != "logit":
                raise BadParameter(f"segmentation model {self.name!r} is explained by gradient and activation methods "
                                   f"with score=logit, not {', '.join(others) or 'score=' + params.score}")
        if params.threshold is not None and m.output_activation != "sigmoid":
            raise BadParameter(f"parameter threshold applies to sigmoid heads; model {self.name!r} has a {m.output_activation} head")
        if params.score == "binary" and not m.binary:
            raise BadParameter(f"parameter score=binary needs a one-output sigmoid head; model {self.name!r} has "
                               f"{m.num_outputs} {m.output_activation} outputs")
        if params.score == "softmax" and m.binary:
            raise BadParameter(f"parameter score=softmax is not defined for model {self.name!r}'s one-output head (use binary)")
        if params.explain and params.score != "logit":
            others = [n for n in params.methods if self._source(n) not in ("gradients", "activations")]
            if others:
                raise BadParameter(f"parameter score={params.score} applies to the gradient methods of the main graph, "
                                   f"not to {', '.join(others)}")

    @staticmethod
    def _source(method: str) -> str:
        from camserve import cam

        return cam.get_method(method).source

    def _targets(self, params: RequestParams) -> Any:
        from camserve.cam import TopK

        return TopK(params.target.topk) if params.target.topk is not None else list(params.target.classes)

    def _run_groups(self, items: list[_Item], batch: np.ndarray) -> dict[int, dict[str, Any]]:
        """One model call per group of alike requests; returns per-item results."""
        if getattr(self.manifest, "detection", False):
            return detection.run_groups(self, items, batch)
        groups: dict[tuple, list[_Item]] = {}
        for item in items:
            p = item.params
            key = ((p.methods, p.aug_smooth, p.eigen_smooth, p.components if "dff" in p.methods else 0, p.metrics, p.score,
                    p.concepts, item.concept_sha256) if p.explain else ("predict",))
            groups.setdefault(key, []).append(item)
        results: dict[int, dict[str, Any]] = {}
        for key, members in groups.items():
            index = np.concatenate([np.arange(m.rows.start, m.rows.stop) for m in members])
            images = batch[index]
            self.recorder.batch(len(index))
            try:
                if key == ("predict",):
                    start = time.perf_counter()
                    logits = self.session.run(images).logits
                    timings = {"inference": time.perf_counter() - start, "cam": 0.0}
                    out = {"logits": logits, "classes": None, "cams": {}, "ratios": {}, "pictures": {}, "concepts": [],
                           "metrics": {}}
                else:
                    methods, aug, eigen, components, metrics, score, names, _ = key
                    targets = [self._targets(m.params) for m in members for _ in m.images]
                    concept_labels: list[str] = []
                    start = time.perf_counter()
                    extra = {"components": components} if "dff" in methods else {}
                    if score != "logit":
                        extra["score"] = score
                    if self.manifest.embedding:  # every image against every concept of the request
                        extra["concepts"], concept_labels = embedding.vectors(self.session, self.concepts, names,
                                                                              members[0].concept_image)
                        targets = [list(range(len(concept_labels)))] * len(index)
                    if any(m.regions is not None for m in members):  # -1: the predicted mask
                        size = tuple(self.manifest.input_size)
                        extra["regions"] = np.concatenate([m.regions if m.regions is not None else
                                                           np.full((len(m.images), *size), -1.0, np.float32) for m in members])
                    exp = self.explain(self.session, images, targets, list(methods), eigen_smooth=eigen, aug_smooth=aug, **extra)
                    total = time.perf_counter() - start
                    timings = _split_timings(exp.timings, total)
                    out = {"logits": exp.logits, "classes": exp.classes, "cams": exp.cams,
                           "ratios": getattr(exp, "signal_ratio", None) or {},
                           "pictures": getattr(exp, "pictures", None) or {},
                           "concepts": getattr(exp, "concepts", None) or [], "metrics": {},
                           "concept_labels": concept_labels, "concept_vectors": extra.get("concepts")}
                    for method in methods:
                        self.recorder.explain(method, float(exp.timings.get(f"cam.{method}", timings["cam"] / len(methods))))
                    if metrics:
                        out["metrics"], timings["metrics"] = score_explanation(self.session, images, exp, methods, metrics)
                        self._record_scores(out["metrics"])
                self.recorder.inference(timings["inference"])
            except Exception as exc:  # noqa: BLE001 - the group fails, the batch goes on
                for m in members:
                    m.error = exc
                continue
            pos = 0
            for m in members:
                n = len(m.images)
                results[id(m)] = {
                    "logits": out["logits"][pos : pos + n],
                    "classes": None if out["classes"] is None else list(out["classes"][pos : pos + n]),
                    "cams": {meth: list(c[pos : pos + n]) for meth, c in out["cams"].items()},
                    "ratios": {meth: list(r[pos : pos + n]) for meth, r in out["ratios"].items()},
                    "pictures": {meth: list(p[pos : pos + n]) for meth, p in out["pictures"].items()},
                    "concepts": list(out["concepts"][pos : pos + n]),
                    "metrics": {meth: v[pos : pos + n] for meth, v in out["metrics"].items()},
                    "concept_labels": out.get("concept_labels", []),
                    "concept_vectors": out.get("concept_vectors"),
                }
                m.timings = timings
                m.batch = len(index)
                if key != ("predict",) and not key[4] and self.sampler is not None and self.sampler.draw():
                    self._sample(m, images[pos : pos + n], results[id(m)])
                pos += n
        return results

    def _sample(self, item: _Item, images: np.ndarray, result: dict[str, Any]) -> None:
        """Hand a drawn request's maps to the sampler (scored after the answer has left)."""
        from camserve.faithfulness.sampler import Job

        cams = {meth: c for meth, c in result["cams"].items() if meth != "dff"}
        if cams and self.manifest.kind == "classifier":  # metrics are defined for classifiers only
            self.sampler.offer(Job(item.request.request_id, self.model_info(), list(item.sha256), images,
                                   np.asarray(result["logits"]), [list(c) for c in result["classes"]], cams))

    # ------------------------------------------------------------------- batch ---

    def model_info(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "graph_sha256": self.manifest.graph_sha256}

    def handle(self, requests: list[Request]) -> list[Response]:
        """Answer every request of one server batch; never raises for a bad request. The
        post-processing (EigenCAM's factorizations, PNG encoding) may use the session's
        threads: those cores are idle once ONNX Runtime has answered."""
        with parallel.using(getattr(self.session, "threads", 1) or 1):
            return self._handle(requests)

    def _handle(self, requests: list[Request]) -> list[Response]:
        handle_start = time.perf_counter()
        items = [_Item(r) for r in requests]
        self.recorder.requests(len(items))
        good: list[_Item] = []
        for item in items:
            try:
                self._parse(item)
                good.append(item)
            except Exception as exc:  # noqa: BLE001 - answered as 4xx (ours) or 500 (a bug)
                item.error = exc
        results: dict[int, dict[str, Any]] = {}
        if good:
            start = time.perf_counter()
            rgb = [img for item in good for img in item.images]
            m = self.manifest
            batch = imageio.preprocess(rgb, m.input_size, m.mean, m.std, m.channel_order)
            prep = time.perf_counter() - start
            pos = 0
            for item in good:
                item.rows = slice(pos, pos + len(item.images))
                item.preprocess_s += prep * len(item.images) / len(rgb)
                pos += len(item.images)
            self.recorder.preprocess(sum(i.preprocess_s for i in good))
            results = self._run_groups(good, batch)
        responses = []
        encode_total = 0.0
        for item in items:
            start = time.perf_counter()
            body: dict[str, Any] | None = None
            if item.error is None:
                try:
                    body = self._body(item, results[id(item)], len(requests), start)
                except Exception as exc:  # noqa: BLE001 - one bad answer must not fail the batch
                    item.error = exc
            if self.hooks:
                try:
                    record = self.record(item, body)
                    for hook in self.hooks:
                        hook(record)
                except CamserveError as exc:
                    item.error, body = exc, None
            if item.error is not None or body is None:
                responses.append(self.error_response(item.request, item.error))
                continue
            encode_total += body["timings_ms"]["encode"] / 1000.0
            cams = results[id(item)]["cams"] if "array" in item.params.output else None
            responses.append(Response(200, json.dumps(body).encode(), cams=cams))
        if good:
            self.recorder.encode(encode_total)
        self.recorder.request_latency(time.perf_counter() - handle_start, len(items))
        return responses

    def _body(self, item: _Item, result: dict[str, Any], n_requests: int, start: float) -> dict[str, Any]:
        answer = self._answer(item, result)
        t = item.timings
        return {
            "schema": SCHEMA,
            "request_id": item.request.request_id,
            "model": self.model_info(),
            **answer,
            "timings_ms": {
                "preprocess": _ms(item.preprocess_s),
                "inference": _ms(t.get("inference", 0.0)),
                "cam": _ms(t.get("cam", 0.0)),
                "encode": _ms(time.perf_counter() - start),
                **({"metrics": _ms(t["metrics"])} if "metrics" in t else {}),
            },
            "batch": {"requests": n_requests, "images": item.batch},
        }

    def record(self, item: _Item, body: dict[str, Any] | None) -> dict[str, Any]:
        """What the audit log stores for one request (no image bytes, no heatmaps)."""
        error = item.error
        record: dict[str, Any] = {
            "time": time.time(),
            "request_id": item.request.request_id,
            "model": self.model_info(),
            "input_sha256": list(item.sha256),
            "image_sizes": [[int(i.shape[1]), int(i.shape[0])] for i in item.images],
            "outcome": "answered" if error is None else getattr(error, "kind", "internal_error"),
            "status": 200 if error is None else getattr(error, "status", 500),
        }
        if body is not None:
            record["images"] = [
                {
                    "predictions": img["predictions"],
                    "explanations": [{"method": e["method"], "target": e["target"], "summary": e["summary"],
                                      **({"metrics": e["metrics"]} if "metrics" in e else {})}
                                     for e in img.get("explanations", [])],
                }
                for img in body["images"]
            ]
            record["timings_ms"] = body["timings_ms"]
        else:
            record["error"] = str(error)
        return record

    def error_response(self, request: Request, exc: Exception) -> Response:
        """A JSON error body; unexpected exceptions become 500 ``internal_error``."""
        if isinstance(exc, CamserveError):
            kind, status, message = exc.kind, exc.status, str(exc)
        else:
            kind, status, message = "internal_error", 500, f"{type(exc).__name__}: {exc}"
        self.recorder.error(kind)
        body = {
            "schema": SCHEMA,
            "request_id": request.request_id,
            "model": self.model_info(),
            "error": {"kind": kind, "status": status, "message": message},
        }
        return Response(status, json.dumps(body).encode(), error_kind=kind)


def _split_timings(timings: Any, total: float) -> dict[str, float]:
    """The CAM core's seconds in graph runs (``inference``); the rest of the call is ``cam``."""
    inference = float(dict(timings or {}).get("inference", 0.0))
    return {"inference": inference, "cam": max(0.0, total - inference)}


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
