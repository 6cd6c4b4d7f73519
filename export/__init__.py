"""Offline export step, imported as ``camserve.export``: torch model -> ONNX graph + manifest.

Torch is imported here and nowhere on the request path. See :func:`export_model`.
"""

from camserve.export.api import export_model
from camserve.export.resolve import load_model, load_weights

__all__ = ["export_model", "load_model", "load_weights"]
