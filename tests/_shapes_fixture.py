"""The synthetic-shapes model, trained and exported once per test session.

Cached in this module (not as a pytest fixture: a session fixture imported into two test
modules is registered twice and would train twice). Test modules wrap these in fixtures.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

#: Training budget of the test model: seed and steps fixed so the test is deterministic.
SEED = 0
STEPS = 260


@functools.lru_cache(maxsize=None)
def trained_shapes() -> tuple[Any, Any]:
    """(model, ShapesModelInfo) of :func:`camserve.demo.shapes.train_shapes_model` (seconds on 2 cores)."""
    from camserve.demo.shapes import train_shapes_model

    return train_shapes_model(seed=SEED, steps=STEPS)


@functools.lru_cache(maxsize=None)
def exported_shapes() -> tuple[Path, Any]:
    """(export directory, Manifest) of the trained model, exported with parity check."""
    from camserve.demo.shapes import export_shapes_model

    model, info = trained_shapes()
    out = Path(tempfile.mkdtemp(prefix="camserve-shapes-"))
    atexit.register(shutil.rmtree, out, True)
    manifest = export_shapes_model(model, info, out, model_name="shapes")
    return out, manifest
