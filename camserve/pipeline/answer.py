"""The answer's body per request: predictions and explanations in the asked forms.

:class:`Answers` is the part of :class:`camserve.pipeline.service.Service` that turns one
request's share of a model call (logits, maps, pictures, concepts, scores) into the
``images`` of the ``camserve/1`` answer (schema in :mod:`camserve.pipeline.service`). It
reads the service's ``manifest``, ``recorder`` and ``params`` and nothing else.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from camserve import heads
from camserve.concepts import cosine
from camserve.pipeline import render
from camserve.pipeline.summary import summarize
from camserve.pipeline.params import RequestParams
from camserve.pipeline.scoring import as_json


class Answers:
    """Mixin of :class:`~camserve.pipeline.service.Service`: the per-request answer body."""

    manifest: Any
    recorder: Any

    def _answer(self, item: Any, result: dict[str, Any]) -> dict[str, Any]:
        params = item.params
        if getattr(self.manifest, "detection", False):
            from camserve.pipeline import detection

            return detection.answer(self, item, result)
        probs = heads.probabilities(result["logits"], self.manifest)
        images = []
        for i, (name, rgb) in enumerate(zip(item.names, item.images)):
            order = heads.predicted(probs[i], self.manifest, params.threshold)
            entry: dict[str, Any] = {
                "field": name,
                "width": int(rgb.shape[1]),
                "height": int(rgb.shape[0]),
                "predictions": [self._class(int(c), probs[i]) for c in order],
            }
            if getattr(self.manifest, "segmentation", False):  # the predicted class of every output pixel
                labels = np.asarray(result["logits"][i]).argmax(axis=0)
                entry["segmentation"] = {"mask": base64.b64encode(render.encode_png(
                    labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16))).decode("ascii"),
                    "width": int(labels.shape[1]), "height": int(labels.shape[0])}
            if params.explain:
                entry["explanations"] = self._explanations(rgb, probs[i], result, i, params)
                if getattr(self.manifest, "segmentation", False):  # the pixels each class was explained over
                    over = "box" if params.box is not None else "mask" if item.regions is not None else "predicted"
                    for e in entry["explanations"]:
                        e["target"]["mask"] = over
            images.append(entry)
        return {"images": images}

    @staticmethod
    def _similarity(index: int, embedding_row: np.ndarray, result: dict[str, Any]) -> dict[str, Any]:
        """An embedding model's target: the concept and the image's cosine similarity to it."""
        f = np.asarray(result["concept_vectors"][index])[None]
        score = cosine(np.asarray(embedding_row)[None], f)[0]
        return {"index": index, "label": result["concept_labels"][index], "score": round(float(score), 6)}

    def _class(self, index: int, probs: np.ndarray) -> dict[str, Any]:
        """A class (a binary head's category) with its probability (:mod:`camserve.heads`)."""
        return {"index": index, "label": heads.label(index, self.manifest), "score": round(float(probs[index]), 6)}

    def _explanations(self, rgb: np.ndarray, probs: np.ndarray, result: dict[str, Any], i: int,
                      params: RequestParams) -> list[dict[str, Any]]:
        classes = [int(c) for c in np.asarray(result["classes"][i]).ravel()]
        out = []
        size = (int(rgb.shape[0]), int(rgb.shape[1]))  # summaries and overlays at the input's size
        for method in params.methods:
            cams = np.asarray(result["cams"][method][i], dtype=np.float32)  # [T, h, w]
            cams = render.check_cams(cams)
            summaries = summarize(cams, image_size=size).as_dicts()  # in input-image pixels
            ratios = result["ratios"].get(method)
            self._flag_degenerate(method, summaries, None if ratios is None else ratios[i])
            pngs = render.heatmap_png(cams) if "png" in params.output else None
            raw = render.to_float16(cams) if "array" in params.output else None
            pictures = result["pictures"].get(method)
            # DFF answers one entry per concept, its target the concept's top class
            concepts = result["concepts"][i] if method == "dff" else None
            targets = classes if concepts is None else [int(c) for c in concepts["classes"][:, 0]]
            for t, cls in enumerate(targets):
                target = (self._similarity(cls, probs, result) if self.manifest.embedding else self._class(cls, probs))
                entry: dict[str, Any] = {"method": method, "target": target, "summary": summaries[t]}
                if concepts is not None:
                    entry["concept"] = {"index": t, "top_classes": [  # score: softmax of the head on the concept
                        {**self._class(int(c), probs), "score": round(float(s), 6)}
                        for c, s in zip(concepts["classes"][t], concepts["scores"][t])]}
                if method in result["metrics"]:
                    entry["metrics"] = as_json(result["metrics"][method][i], t)
                if pictures is not None:  # guided methods: the RGB picture at the model's input size
                    entry["picture"] = base64.b64encode(render.encode_png(pictures[i][t])).decode("ascii")
                if pngs is not None:
                    entry["png"] = base64.b64encode(pngs[t]).decode("ascii")
                if "overlay" in params.output:
                    entry["overlay"] = base64.b64encode(render.overlay_bytes(rgb, cams[t], "png")).decode("ascii")
                if raw is not None:
                    entry["array"] = render.to_float16(cams[t : t + 1]).to_json()
                out.append(entry)
        return out

    def _record_scores(self, scores: dict[str, list[dict[str, np.ndarray]]]) -> None:
        """Every finite metric value into ``camserve_faithfulness{metric, method}``."""
        for method, per_image in scores.items():
            for values in per_image:
                for name, v in values.items():
                    for x in v[np.isfinite(v)]:
                        self.recorder.faithfulness(method, name, float(x))

    def _flag_degenerate(self, method: str, summaries: list[dict[str, Any]], ratios: Any) -> None:
        """Mark maps whose channel terms cancel (float noise, not an explanation) in their summaries.

        ``signal_ratio`` is ``max |sum_c T_c| / max sum_c |T_c|`` of the raw map (null where the
        method does not sum channel terms); below :data:`camserve.cam.DEGENERATE_RATIO` the
        summary says ``degenerate: true`` with the reason, and the counter
        ``camserve_degenerate_maps_total`` counts it.
        """
        from camserve.cam import degenerate_reason

        flagged = 0
        for t, summary in enumerate(summaries):
            ratio = float(ratios[t]) if ratios is not None else float("nan")
            reason = degenerate_reason(ratio)
            summary["signal_ratio"] = None if np.isnan(ratio) else float(f"{ratio:.3g}")
            summary["degenerate"] = reason is not None
            summary["degenerate_reason"] = reason
            flagged += reason is not None
        if flagged:
            self.recorder.degenerate(method, flagged)
