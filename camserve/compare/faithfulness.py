"""Faithfulness of each side's explanations (``--metrics``) and the ``--min-road`` gate.

The figures are those of :mod:`camserve.faithfulness` (ROAD, confidence change, drop,
increase) for the top-1 class's map of each method:

* served sides ask the server for them (``metrics=`` request parameter) and read each
  explanation's ``metrics`` (:func:`from_explanation`);
* export sides compute them here with :func:`camserve.faithfulness.score_maps` over the
  export's forward-only graph (:func:`score_export`);
* an audit log holds no model to re-run: no metrics (:func:`metrics_of` refuses them).

Per method and metric the summary holds both sides' means over the inputs where both
values are defined (NaN, e.g. ROAD of a constant map, is left out of both, so A and B are
averaged over the same inputs), their difference B - A and that count.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from camserve.errors import InputError
from camserve.compare.data import CompareError, Pair

#: The metric ``--min-road`` gates on (ROADCombined: higher = more faithful).
ROAD = "road"


def metrics_of(text: str | None, min_road: float | None, mode: str) -> tuple[str, ...]:
    """The metrics asked by ``--metrics`` (comma list) plus ``road`` when ``--min-road`` is set;
    InputError naming an unknown metric, or when the sides (an audit log) cannot be scored."""
    names: list[str] = []
    if text and text.strip():
        from camserve.faithfulness import parse_metrics

        try:
            names = list(parse_metrics(text))
        except InputError as exc:
            raise InputError(f"--metrics {text!r}: {exc}") from None
    if min_road is not None and ROAD not in names:
        names.append(ROAD)
    if names and mode == "audit":
        flag = "--min-road" if text is None or not text.strip() else "--metrics"
        raise InputError(f"{flag} needs served or exported sides (--a/--b URLs or --export-a/--export-b): "
                         "an audit log holds no model to re-run")
    return tuple(names)


def score_export(session: Any, batch: np.ndarray, logits: np.ndarray, cams: dict[str, np.ndarray], target: int,
                 metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{method: {metric: value}}`` of one preprocessed image ``batch`` ``[1, 3, H, W]`` whose
    top-1 class ``target`` has map ``cams[method]`` ``[H, W]``: one :func:`score_maps` call
    over every method's map (the image repeated), so ROAD's forwards are batched."""
    from camserve.faithfulness import score_maps

    methods = list(cams)
    if not methods or not metrics:
        return {}
    images = np.repeat(batch, len(methods), axis=0)
    maps = np.stack([cams[m] for m in methods]).astype(np.float32)
    scores = score_maps(session.forward_logits, images, maps, np.full(len(methods), target, np.int64), list(metrics),
                        base_logits=np.repeat(logits, len(methods), axis=0))
    return {m: {k: float(v[i]) for k, v in scores.items()} for i, m in enumerate(methods)}


def from_explanation(explanation: dict[str, Any], metrics: Sequence[str], where: str) -> dict[str, float]:
    """The ``metrics`` of one served explanation entry (``null`` -> NaN); CompareError naming
    the method and the missing metric when the server did not send it."""
    got = explanation.get("metrics")
    method = explanation.get("method")
    missing = [m for m in metrics if not isinstance(got, dict) or m not in got]
    if missing:
        raise CompareError(f"{where}: the {method} explanation has no {', '.join(missing)} metric "
                           "(does this server compute faithfulness metrics?)")
    try:
        return {str(k): math.nan if v is None else float(v) for k, v in got.items()}
    except (TypeError, ValueError):
        raise CompareError(f"{where}: the {method} explanation's metrics are not numbers: {got!r}") from None


def metric_names(pairs: list[Pair], method: str) -> list[str]:
    """Every metric either side has for ``method``, in the order they first appear."""
    seen: dict[str, None] = {}
    for p in pairs:
        for ans in (p.a, p.b):
            seen.update(dict.fromkeys(ans.metrics.get(method, {})))
    return list(seen)


def _num(x: float) -> float | None:
    return round(float(x), 6) if math.isfinite(x) else None


def side_values(pairs: list[Pair], method: str, metric: str, side: str) -> np.ndarray:
    """One side's ``metric`` of ``method`` per input, float64 ``[N]`` (NaN where missing)."""
    return np.array([getattr(p, side).metrics.get(method, {}).get(metric, math.nan) for p in pairs], np.float64)


def summarize(pairs: list[Pair], methods: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{method: {metric: {"a", "b", "delta", "n"}}}``: paired means (see the module docstring)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in methods:
        out[m] = {}
        for k in metric_names(pairs, m):
            a, b = side_values(pairs, m, k, "a"), side_values(pairs, m, k, "b")
            both = np.isfinite(a) & np.isfinite(b)
            if not both.any():
                out[m][k] = {"a": None, "b": None, "delta": None, "n": 0}
                continue
            ma, mb = float(a[both].mean()), float(b[both].mean())
            out[m][k] = {"a": _num(ma), "b": _num(mb), "delta": _num(mb - ma), "n": int(both.sum())}
    return out


def per_image(pair: Pair, methods: list[str]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{method: {"a": {metric: value}, "b": {...}}}`` of one input (None where undefined)."""
    return {m: {s: {k: _num(v) for k, v in getattr(pair, s).metrics.get(m, {}).items()} for s in ("a", "b")}
            for m in methods}


def road_gates(summary: dict[str, Any], margin: float) -> list[dict[str, Any]]:
    """One ``min_road`` gate per method: ``value`` = mean ROAD of B - mean ROAD of A, passed
    when ``value >= threshold = -margin`` (B at most ``margin`` less faithful than A); a
    method without any defined ROAD pair fails (nothing shows B is as faithful)."""
    gates = []
    for m in summary["methods"]:
        entry = summary.get("faithfulness", {}).get(m, {}).get(ROAD) or {}
        delta = entry.get("delta")
        gates.append({"name": "min_road", "method": m, "value": delta, "threshold": -margin, "a": entry.get("a"),
                      "b": entry.get("b"), "passed": delta is not None and delta >= -margin})
    return gates
