"""``camserve methods``: every CAM method the server answers, what it needs from the export."""

from __future__ import annotations

import argparse
import json
from typing import Any

NEEDS = {
    "gradients": "model.onnx",
    "activations": "model.onnx",
    "finer": "model.onnx (one more run)",
    "score": "model.onnx (masked-input runs)",
    "ablation": "head.onnx (camserve export --head)",
    "dff": "head.onnx (camserve export --head)",
}


def describe() -> list[dict[str, Any]]:
    """One row per registered method: name, what it needs, what it computes."""
    from camserve.cam import REGISTRY

    rows = []
    for spec in REGISTRY.values():
        needs = f"{spec.extra}.onnx (camserve export --extras {spec.extra})" if spec.extra else NEEDS[spec.source]
        rows.append({"name": spec.name, "needs": needs, "eigen_smooth": spec.eigen_smooth, "computes": spec.summary})
    return rows


def _run(args: argparse.Namespace) -> int:
    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    needs = max(len(r["needs"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['needs']:<{needs}}  {r['computes']}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("methods", help="list the CAM methods and what each needs from the export")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=_run)
