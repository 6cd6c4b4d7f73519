"""How figures and sides are written for people (report page and stdout line).

``summary.json`` keeps 6 decimals (:func:`camserve.compare.analysis._num`); people read
:func:`fmt`: 3 significant digits, no exponent, at most 4 decimals. A side is
``NAME/VERSION (graph 1a2b3c4d)`` (:func:`side_name`), never the model dict itself.
"""

from __future__ import annotations

import math
from typing import Any

#: Hex digits of the graph's SHA-256 shown in a side's name (git's short-hash length).
SHORT_HASH = 8
MAX_DECIMALS = 4


def fmt(value: Any, digits: int = 3, *, sign: bool = False) -> str:
    """``value`` to ``digits`` significant digits in fixed notation (``0.877``, ``12.3``, ``1235``);
    ``n/a`` for None or a non-finite value (undefined, e.g. a constant map's correlation)."""
    if value is None:
        return "n/a"
    v = float(value)
    if not math.isfinite(v):
        return "n/a"
    if v == 0.0:
        return "+0" if sign else "0"
    magnitude = math.floor(math.log10(abs(v)))
    decimals = min(MAX_DECIMALS, max(0, digits - 1 - magnitude))
    return f"{v:+.{decimals}f}" if sign else f"{v:.{decimals}f}"


def side_name(model: dict[str, Any]) -> str:
    """``NAME/VERSION (graph 1a2b3c4d)`` of one side's model dict (``name``, ``version``,
    ``graph_sha256``); the parts a source does not know are left out."""
    name = str(model.get("name") or "?")
    if model.get("version"):
        name += f"/{model['version']}"
    sha = model.get("graph_sha256")
    return f"{name} (graph {str(sha)[:SHORT_HASH]})" if sha else name


def side_where(model: dict[str, Any]) -> str:
    """Where a side's answers came from: its URL, export folder, or nothing (audit log)."""
    return str(model.get("url") or model.get("export_dir") or "")
