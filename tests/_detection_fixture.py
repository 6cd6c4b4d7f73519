"""The shapes detector (issue 15), trained and exported once per test session.

Cached here (not a pytest fixture) so the model and service test modules share one export.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

from _shapes_fixture import trained_shapes


@functools.lru_cache(maxsize=None)
def shapes_detector() -> tuple[Any, float]:
    """(detector, held-out mean IoU of its boxes) around the trained shapes classifier."""
    from camserve.demo.detector import build_detector, train_box_head

    model, info = trained_shapes()
    detector = build_detector(model, info.mean, info.std)
    return detector, train_box_head(detector, info)


@functools.lru_cache(maxsize=None)
def exported_detector() -> tuple[Path, Any]:
    """(export directory, Manifest) of the shapes detector, exported with parity check."""
    from camserve.demo.detector import LABELS
    from camserve.export.detection import export_detection

    detector, _ = shapes_detector()
    _, info = trained_shapes()
    out = Path(tempfile.mkdtemp(prefix="camserve-detector-"))
    atexit.register(shutil.rmtree, out, True)
    manifest = export_detection(detector, out, target_layer="backbone", input_size=info.input_size,
                                labels=LABELS, model_name="shapes-det", threshold=0.3)
    return out, manifest
