"""A/B comparison of two model versions: answers, explanations (CAM similarity) and latency.

``camserve compare`` (:mod:`.cli`) collects both sides' answers (:mod:`.runner`,
:mod:`.sources`), measures them (:mod:`.similarity`, :mod:`.analysis`) and writes the
report (:mod:`.report`). Python API: :func:`compare_exports` for two export folders.
"""

from __future__ import annotations

from typing import Any

from camserve.compare.analysis import analyse, apply_gates, wilson
from camserve.compare.data import Answer, CompareError, Pair
from camserve.compare.similarity import pearson, peak_distance, spearman, top_iou

__all__ = ["Answer", "CompareError", "Pair", "analyse", "apply_gates", "compare_exports", "pearson",
           "peak_distance", "spearman", "top_iou", "wilson"]


def compare_exports(dir_a: str, dir_b: str, images_dir: str, methods: list[str] | tuple[str, ...] = ("gradcam",),
                    **gates: Any) -> dict[str, Any]:
    """The summary of comparing two export folders over an image folder (no report written)."""
    from camserve.compare.runner import collect_export

    pairs, model_a, model_b = collect_export(dir_a, dir_b, images_dir, list(methods))
    summary = {"mode": "export", "a": model_a, "b": model_b, **analyse(pairs, list(methods))}
    return apply_gates(summary, gates.get("min_agreement"), gates.get("min_cam_iou"))
