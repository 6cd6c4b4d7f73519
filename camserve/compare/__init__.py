"""A/B comparison of two model versions: answers, explanations (CAM similarity) and latency.

``camserve compare`` (:mod:`.cli`) collects both sides' answers (:mod:`.runner`,
:mod:`.sources`, with a progress bar on a terminal: :mod:`.progress`), measures them
(:mod:`.similarity`, :mod:`.aggregate`, :mod:`.faithfulness`, :mod:`.analysis`) and writes
the report (:mod:`.report`, figures and names written by :mod:`.text`). Python API:
:func:`compare_exports` for two export folders.
"""

from __future__ import annotations

from typing import Any

from camserve.compare.analysis import analyse, apply_gates, wilson
from camserve.compare.data import Answer, CompareError, Pair
from camserve.compare.similarity import pearson, peak_distance, spearman, top_iou

__all__ = ["Answer", "CompareError", "Pair", "analyse", "apply_gates", "compare_exports", "pearson",
           "peak_distance", "spearman", "top_iou", "wilson"]


def compare_exports(dir_a: str, dir_b: str, images_dir: str, methods: list[str] | tuple[str, ...] = ("gradcam",),
                    metrics: str | list[str] | tuple[str, ...] = (), **gates: Any) -> dict[str, Any]:
    """The summary of comparing two export folders over an image folder (no report written).

    ``metrics``: faithfulness metrics to compute (``"road,drop"`` or a list); gates as keywords:
    ``min_agreement``, ``min_cam_iou``, ``min_road`` (which implies ``road``).
    """
    from camserve.compare.analysis import name_sides
    from camserve.compare.faithfulness import metrics_of
    from camserve.compare.runner import collect_export

    names = metrics_of(metrics if isinstance(metrics, str) else ",".join(metrics), gates.get("min_road"), "export")
    pairs, model_a, model_b = collect_export(dir_a, dir_b, images_dir, list(methods), metrics=names)
    summary = {"mode": "export", **name_sides({}, model_a, model_b), **analyse(pairs, list(methods), metrics=names)}
    return apply_gates(summary, gates.get("min_agreement"), gates.get("min_cam_iou"), gates.get("min_road"))
