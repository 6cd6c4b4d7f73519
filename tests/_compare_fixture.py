"""Helpers of the compare tests: shapes models (normal and shortcut), image folders, Chromium.

Models are trained and exported once per test session (cached here, not as fixtures, so
two modules importing them do not train twice).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
STEPS = 260


@functools.lru_cache(maxsize=None)
def shapes_exports() -> dict[str, Path]:
    """{"normal": export dir, "shortcut": export dir}: the same CNN trained on clean shapes and
    on shortcut images (the corner marker predicts the class, the shape is random)."""
    from _shapes_fixture import trained_shapes
    from camserve.demo.shapes import export_shapes_model, train_shapes_model

    base = Path(tempfile.mkdtemp(prefix="camserve-compare-"))
    atexit.register(shutil.rmtree, base, True)
    out = {}
    for kind in ("normal", "shortcut"):
        model, info = trained_shapes() if kind == "normal" else train_shapes_model(seed=SEED, steps=STEPS, shortcut=True)
        assert info.heldout_accuracy > 0.85, (kind, info.heldout_accuracy)
        out[kind] = base / kind
        export_shapes_model(model, info, out[kind], model_name="shapes", model_version="1.0" if kind == "normal" else "2.0")
    return out


def write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def marked_images(folder: Path, agree: int = 28, conflict: int = 4, seed: int = 11) -> dict[str, dict[str, Any]]:
    """Write ``agree`` images whose corner marker and shape name the same class and
    ``conflict`` images where they differ; returns {file name: {label, shape, box, marker}}."""
    from camserve.demo.shapes import CLASSES, make_shapes

    data = make_shapes(8 * (agree + conflict), seed=seed, shortcut=True)
    same = np.flatnonzero(data.shapes == data.labels)[:agree]
    diff = np.flatnonzero(data.shapes != data.labels)[:conflict]
    assert len(same) == agree and len(diff) == conflict
    folder.mkdir(parents=True, exist_ok=True)
    meta = {}
    for i in np.concatenate([same, diff]):
        name = f"img_{i:03d}_{CLASSES[data.labels[i]]}.png"
        write_png(folder / name, data.images[i])
        meta[name] = {"label": int(data.labels[i]), "shape": int(data.shapes[i]),
                      "box": data.boxes[i].tolist(), "marker": data.markers[i].tolist()}
    return meta


def chromium() -> str | None:
    """Path of Chromium, installing Debian's package through scripts/ensure_chromium.sh when missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    subprocess.run(["sh", str(ROOT / "scripts" / "ensure_chromium.sh")], capture_output=True, timeout=900)
    return shutil.which("chromium") or shutil.which("chromium-browser")


FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0")
PROBE = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
         "const ok=im.filter(i=>i.complete&&i.naturalWidth>0).length;"
         "document.body.setAttribute('data-probe',ok+'/'+im.length);});</script>")


def open_in_chromium(report: Path, work: Path) -> dict[str, Any]:
    """Load ``report`` in headless Chromium twice: a copy with a probe script (images loaded
    / total, read back with --dump-dom) and the report itself for a screenshot. Returns
    ``{"loaded", "total", "console", "screenshot" (RGB array)}``."""
    import re

    import cv2

    exe = chromium()
    assert exe, "chromium is not installed and scripts/ensure_chromium.sh could not install it"
    probe = work / "probe.html"
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run([exe, *FLAGS, f"--user-data-dir={work / 'profile1'}", "--virtual-time-budget=10000",
                          "--dump-dom", probe.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'data-probe="(\d+)/(\d+)"', dom.stdout)
    shot = work / "shot.png"
    snap = subprocess.run([exe, *FLAGS, f"--user-data-dir={work / 'profile2'}", "--window-size=1200,3000",
                           f"--screenshot={shot}", report.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    console = [line for line in (dom.stderr + snap.stderr).splitlines() if "CONSOLE" in line or "Uncaught" in line]
    img = cv2.imread(str(shot)) if shot.is_file() else None
    return {"loaded": int(m.group(1)) if m else -1, "total": int(m.group(2)) if m else -1, "console": console,
            "screenshot": None if img is None else img[:, :, ::-1]}
