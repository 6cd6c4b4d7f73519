"""Helpers of the compare tests: shapes models (normal and shortcut), image folders, Chromium,
direct computations, audit records and served answers as the server writes them, fakes.

Models are trained and exported once per test session (cached here, not as fixtures, so
two modules importing them do not train twice).
"""

from __future__ import annotations

import atexit
import functools
import io
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

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


class TTYBuffer(io.StringIO):
    """A text buffer that says it is a terminal (what the progress bar draws on)."""

    def isatty(self) -> bool:
        return True


def visible_text(page: str) -> str:
    """The report page without its embedded pictures (base64 data URIs)."""
    import re

    return re.sub(r'src="data:[^"]*"', 'src=""', page)


def side_label(export_dir: Path) -> str:
    """``NAME/VERSION (graph 1a2b3c4d)`` of an export folder, written out from its manifest."""
    from camserve.manifest import Manifest

    m = Manifest.load(export_dir)
    return f"{m.model_name}/{m.model_version} (graph {m.graph_sha256[:8]})"


def direct(export_dir: Path, images: Path, methods: list[str]):
    """Top-1 class and maps per image, straight from GraphSession + cam.explain (one image per
    call); also the preprocessed images and logits, for faithfulness figures."""
    from camserve import cam
    from camserve.pipeline import imageio
    from camserve.pipeline.runtime import GraphSession

    session = GraphSession(export_dir, intra_op_threads=1)
    m = session.manifest
    tops, cams, batches, logits = [], {k: [] for k in methods}, [], []
    for path in sorted(images.glob("*.png")):
        rgb = imageio.decode(path.read_bytes(), 10**8)
        batch = imageio.preprocess([rgb], m.input_size, m.mean, m.std, m.channel_order)
        out = cam.explain(session, batch, [cam.TopK(1)], methods)
        tops.append(int(out.logits[0].argmax()))
        batches.append(batch[0])
        logits.append(out.logits[0])
        for k in methods:
            cams[k].append(out.cams[k][0][0])
    return np.array(tops), {k: np.stack(v) for k, v in cams.items()}, {"images": np.stack(batches),
                                                                      "logits": np.stack(logits), "session": session}


def direct_iou(a: np.ndarray, b: np.ndarray, share: float = 0.2) -> float:
    """Top-region IoU written out: the region is every pixel >= the k-th largest value."""
    k = math.ceil(share * a.size)
    ra = a.ravel() >= np.sort(a.ravel())[::-1][k - 1]
    rb = b.ravel() >= np.sort(b.ravel())[::-1][k - 1]
    return float((ra & rb).sum() / (ra | rb).sum())


def audit_record(version: str, shas: list[str], tops: list[int], peaks: list[list[int]], t: float) -> dict:
    """A record shaped like Service.record (one entry per image, gradcam on the top class)."""
    return {
        "time": t, "request_id": f"r-{version}-{t}", "model": {"name": "m", "version": version},
        "input_sha256": shas, "image_sizes": [[64, 64]] * len(shas), "outcome": "answered", "status": 200,
        "images": [{"predictions": [{"index": c, "label": f"c{c}", "score": 0.9}, {"index": 9, "label": "c9", "score": 0.05}],
                    "explanations": [{"method": "gradcam", "target": {"index": c, "label": f"c{c}", "score": 0.9},
                                      "summary": {"peak": p}}]} for c, p in zip(tops, peaks)],
        "timings_ms": {"preprocess": 1.0, "inference": 4.0, "cam": 2.0, "encode": 1.0},
    }


def fake_road(calls: list):
    """A score_maps stand-in: ROAD = the map's mean (NaN for a constant map), checking its inputs."""
    def score_maps(forward, images, cams, classes, metrics, *, base_logits=None, noise=0.01, seed=0):
        logits = forward(images)  # the export's forward-only graph answers like the explain graph
        assert images.dtype == np.float32 and cams.shape == (len(images), *images.shape[2:])
        assert logits == pytest.approx(base_logits, abs=1e-4) and list(classes) == list(base_logits.argmax(axis=1))
        calls.append(list(metrics))
        road = cams.mean(axis=(1, 2)).astype(np.float64)
        road[cams.max(axis=(1, 2)) == cams.min(axis=(1, 2))] = np.nan
        return {"road": road, "road_morf": -road, "road_lerf": road}
    return score_maps


def served_answer(version: str, road: float | None, with_metrics: bool = True) -> dict:
    """A camserve/1 answer as the server sends it with metrics=road (one gradcam map)."""
    from camserve.pipeline.render import to_float16

    cam = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    entry = {"method": "gradcam", "target": {"index": 1, "label": "c1", "score": 0.9}, "array": to_float16(cam).to_json()}
    if with_metrics:
        entry["metrics"] = {"road": road, "road_morf": 0.1, "road_lerf": 0.6}
    return {"model": {"name": "m", "version": version, "graph_sha256": version.replace(".", "") * 32},
            "images": [{"predictions": [{"index": 1, "label": "c1", "score": 0.9}], "explanations": [entry]}]}


def on_bare_pty(draw) -> str:
    """What ``draw(stream)`` writes to a bare pseudo-terminal (0 x 0, as under ``script`` or
    some CI runners, where tqdm's own sizing draws nothing)."""
    import pty

    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as term:
        draw(term)
        term.flush()
    chunks = []
    while True:  # everything written, up to EIO once the closed slave side is drained
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")
