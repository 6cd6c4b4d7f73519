"""From paired answers to every figure of the report (``summary.json``).

Per input: both top-k, top-1 agreement, top-k overlap, score deltas, per method the CAM
similarity of :mod:`.similarity`, both latencies (and faithfulness figures when asked).
Overall: top-1 agreement with a Wilson 95 % interval, each similarity's distribution, the
two mean maps' similarity (:mod:`.aggregate`), latency percentiles per side, faithfulness
means (:mod:`.faithfulness`), and two ranked lists: inputs whose answers agree but whose
explanations diverge (for any method: top-region IoU or Pearson below 1, or the peaks
apart), most first (lowest IoU of the first method, then lowest Pearson), and inputs whose
answers differ (most confident first: the higher of the two top-1 scores). Agreeing inputs
whose maps match are counted in ``divergence.identical``, not listed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from camserve.compare import faithfulness
from camserve.compare.aggregate import aggregate
from camserve.compare.data import Pair
from camserve.compare.similarity import TOP_SHARE, similarity
from camserve.compare.text import side_name

SCHEMA = "camserve-compare/1"
METRICS = ("pearson", "spearman", "iou", "peak_px", "peak_norm")
Z95 = 1.959963984540054
#: Maps whose IoU and Pearson are within this of 1 (and peaks at the same pixel) are the same map.
SAME_TOL = 1e-6


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate: ``(c -+ h)`` with ``c = (p + z^2/2n) / (1 + z^2/n)``,
    ``h = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)``; sensible at p = 0 or 1, unlike the normal one."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def _num(x: Any) -> float | None:
    """JSON-safe float: NaN and infinities become None (undefined, e.g. a constant map's correlation)."""
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def distribution(values: np.ndarray) -> dict[str, Any]:
    """Count, mean, min, max and percentiles of the finite values (NaN = undefined, left out)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0}
    q = np.percentile(v, [5, 25, 50, 75, 95])
    return {"n": int(v.size), "mean": _num(v.mean()), "min": _num(v.min()), "p05": _num(q[0]), "p25": _num(q[1]),
            "median": _num(q[2]), "p75": _num(q[3]), "p95": _num(q[4]), "max": _num(v.max())}


def latency(values: np.ndarray) -> dict[str, Any]:
    v = np.asarray(values, np.float64)
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"n": int(v.size), "mean": _num(v.mean()), "p50": _num(p50), "p95": _num(p95), "p99": _num(p99), "max": _num(v.max())}


def _peak_from_summaries(pairs: list[Pair], method: str) -> np.ndarray:
    """Peak distance in input pixels from summary peaks (audit logs without heatmaps)."""
    out = np.full(len(pairs), np.nan)
    for i, p in enumerate(pairs):
        pa, pb = p.a.peaks.get(method), p.b.peaks.get(method)
        if pa is not None and pb is not None:
            out[i] = math.dist(pa, pb)
    return out


def map_peaks(pairs: list[Pair], method: str, side: str) -> list[list[int] | None]:
    """Each input's peak ``[x, y]`` on one side: map pixels (at the size compared), else the summary's."""
    out: list[list[int] | None] = []
    for p in pairs:
        ans = getattr(p, side)
        cam = ans.cams.get(method)
        if cam is not None:
            y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
            out.append([int(x), int(y)])
        else:
            peak = ans.peaks.get(method)
            out.append(None if peak is None else [int(v) for v in peak])
    return out


def method_similarity(pairs: list[Pair], method: str, share: float) -> tuple[dict[str, np.ndarray], str]:
    """Each metric ``[N]`` for one method, and where the maps came from (``maps`` or ``summary``)."""
    n = len(pairs)
    have = [p.a.cams.get(method) is not None and p.b.cams.get(method) is not None for p in pairs]
    res = {k: np.full(n, np.nan) for k in METRICS}
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        if have[i]:
            groups.setdefault((p.a.cams[method].shape, p.b.cams[method].shape), []).append(i)
    for idx in groups.values():  # one vectorized call per distinct pair of map sizes (usually one)
        sim = similarity(np.stack([pairs[i].a.cams[method] for i in idx]), np.stack([pairs[i].b.cams[method] for i in idx]), share)
        for k in METRICS:
            res[k][idx] = sim[k]
    if all(have):
        return res, "maps"
    missing = [i for i, h in enumerate(have) if not h]
    res["peak_px"][missing] = _peak_from_summaries([pairs[i] for i in missing], method)
    return res, "maps" if any(have) else "summary"


def _score_of(preds: list[dict], index: int) -> float | None:
    return next((float(p["score"]) for p in preds if int(p["index"]) == index), None)


def divergence(sims: dict[str, dict[str, np.ndarray]], methods: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(diverges, known), each bool ``[N]``: some method's maps differ (IoU or Pearson below
    ``1 - SAME_TOL``, or the peaks apart), and some measure is defined at all for the input
    (an audit record without heatmaps or peaks tells nothing)."""
    n = len(sims[methods[0]]["iou"])
    diverges, known = np.zeros(n, bool), np.zeros(n, bool)
    for m in methods:
        s = sims[m]
        with np.errstate(invalid="ignore"):  # NaN compares False: undefined is not a difference
            diverges |= (s["iou"] < 1 - SAME_TOL) | (s["pearson"] < 1 - SAME_TOL) | (s["peak_px"] > 0)
        known |= np.isfinite(s["iou"]) | np.isfinite(s["peak_px"])
    return diverges, known


def _image(p: Pair, agree: bool, methods: list[str], sims: dict, peak: dict, i: int, metrics: tuple[str, ...]) -> dict[str, Any]:
    """One input's entry of ``images`` in the summary."""
    ka = [int(q["index"]) for q in p.a.predictions]
    kb = [int(q["index"]) for q in p.b.predictions]
    b_on_a = _score_of(p.b.predictions, p.a.top1)
    entry = {
        "key": p.key,
        "agree": agree,
        "a": {"predictions": p.a.predictions, "latency_ms": _num(p.a.latency_ms)},
        "b": {"predictions": p.b.predictions, "latency_ms": _num(p.b.latency_ms)},
        "topk_overlap": _num(len(set(ka) & set(kb)) / max(1, min(len(ka), len(kb)))),
        "top1_score_delta": _num(float(p.b.predictions[0]["score"]) - float(p.a.predictions[0]["score"])),
        "a_top1_score_delta": None if b_on_a is None else _num(b_on_a - float(p.a.predictions[0]["score"])),
        "cam": {m: {**{k: _num(sims[m][k][i]) for k in METRICS},
                    "peak_a": peak[m]["a"][i], "peak_b": peak[m]["b"][i]} for m in methods},
    }
    if metrics:
        entry["faithfulness"] = faithfulness.per_image(p, methods)
    return entry


def _aggregate_summary(pairs: list[Pair], methods: list[str], share: float) -> dict[str, dict[str, Any]]:
    """:func:`.aggregate.aggregate` with JSON-safe figures."""
    return {m: {k: (_num(v) if isinstance(v, float) else v) for k, v in agg.items()}
            for m, agg in aggregate(pairs, methods, share).items()}


def analyse(pairs: list[Pair], methods: list[str], *, share: float = TOP_SHARE,
            metrics: tuple[str, ...] = ()) -> dict[str, Any]:
    """The summary (everything but gates and the sides' models): see the module docstring."""
    n = len(pairs)
    agree = np.array([p.a.top1 == p.b.top1 for p in pairs])
    sims, sources, peak = {}, {}, {}
    for m in methods:
        sims[m], sources[m] = method_similarity(pairs, m, share)
        peak[m] = {s: map_peaks(pairs, m, s) for s in ("a", "b")}
    lat_a = np.array([p.a.latency_ms for p in pairs])
    lat_b = np.array([p.b.latency_ms for p in pairs])
    images = [_image(p, bool(agree[i]), methods, sims, peak, i, metrics) for i, p in enumerate(pairs)]
    first = methods[0]
    iou, pear = sims[first]["iou"], sims[first]["pearson"]
    key_iou = np.where(np.isfinite(iou), iou, np.inf)
    key_pear = np.where(np.isfinite(pear), pear, np.inf)
    diverges, known = divergence(sims, methods)
    agree_idx = np.flatnonzero(agree & diverges)
    divergent = agree_idx[np.lexsort((key_pear[agree_idx], key_iou[agree_idx]))]
    differ_idx = np.flatnonzero(~agree)
    conf = np.array([max(float(p.a.predictions[0]["score"]), float(p.b.predictions[0]["score"])) for p in pairs])
    differ = differ_idx[np.argsort(-conf[differ_idx], kind="stable")]
    ok = int(agree.sum())
    lo, hi = wilson(ok, n)
    return {
        "schema": SCHEMA,
        "complete": True,
        "methods": list(methods),
        "top_share": share,
        "n_images": n,
        "agreement": {"top1": _num(ok / n), "agree": ok, "n": n, "ci95": [_num(lo), _num(hi)], "interval": "wilson"},
        "similarity": {m: {"source": sources[m], **{k: distribution(sims[m][k]) for k in METRICS},
                           "iou_when_agree": distribution(sims[m]["iou"][agree])} for m in methods},
        "aggregate": _aggregate_summary(pairs, methods, share),
        "latency_ms": {"a": latency(lat_a), "b": latency(lat_b)},
        "metrics": list(metrics),
        "faithfulness": faithfulness.summarize(pairs, methods) if metrics else {},
        "ranking_method": first,
        "divergence": {"diverging": int((agree & diverges).sum()), "identical": int((agree & known & ~diverges).sum()),
                       "unknown": int((agree & ~known).sum())},
        "divergent": [pairs[i].key for i in divergent],
        "disagreements": [pairs[i].key for i in differ],
        "images": images,
    }


def name_sides(summary: dict[str, Any], model_a: dict[str, Any], model_b: dict[str, Any]) -> dict[str, Any]:
    """Add both sides' models (``a``, ``b``) and their names (``names``: ``NAME/VERSION (graph 1a2b3c4d)``)."""
    summary["a"], summary["b"] = model_a, model_b
    summary["names"] = {"a": side_name(model_a), "b": side_name(model_b)}
    return summary


def apply_gates(summary: dict[str, Any], min_agreement: float | None, min_cam_iou: float | None,
                min_road: float | None = None) -> dict[str, Any]:
    """Add ``gates`` (each with value, threshold, passed) and ``passed`` to the summary.

    ``min_agreement`` gates the top-1 agreement rate; ``min_cam_iou`` the mean top-region
    IoU over all inputs, for every method (a method with no IoU at all fails it);
    ``min_road`` the drop of mean ROAD from A to B, for every method
    (:func:`.faithfulness.road_gates`).
    """
    gates = []
    if min_agreement is not None:
        v = summary["agreement"]["top1"]
        gates.append({"name": "min_agreement", "value": v, "threshold": min_agreement, "passed": v >= min_agreement})
    if min_cam_iou is not None:
        for m in summary["methods"]:
            v = summary["similarity"][m]["iou"].get("mean")
            gates.append({"name": "min_cam_iou", "method": m, "value": v, "threshold": min_cam_iou,
                          "passed": v is not None and v >= min_cam_iou})
    if min_road is not None:
        gates += faithfulness.road_gates(summary, min_road)
    summary["gates"] = gates
    summary["failed_gates"] = [g["name"] + (f" ({g['method']})" if "method" in g else "") for g in gates if not g["passed"]]
    summary["passed"] = not summary["failed_gates"]
    return summary
