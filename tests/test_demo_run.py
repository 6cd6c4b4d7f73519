"""``python -m camserve.demo`` (what ``make demo`` runs), end to end in a subprocess.

One real run: training, export, archive, a real TorchServe on free loopback ports, HTTP
requests through the client code, overlays, JSON answers and the contact sheet; then no
TorchServe process may be left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from camserve.demo import run as demo_run
from camserve.serving.torchserve.server import Instance, _alive, instance_processes

METHODS = ["gradcam", "gradcam++"]
SAMPLES = 6
SAMPLE_SIZE = 128
#: Label strip above each tile in camserve.demo.sheet.contact_sheet.
STRIP = 18


def run_demo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-m", "camserve.demo", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=Path(__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    proc = run_demo("--out", str(out), "--samples", str(SAMPLES), "--sample-size", str(SAMPLE_SIZE),
                    "--methods", ",".join(METHODS))
    return out, proc


@pytest.mark.server
def test_demo_exits_0_and_prints_a_summary(demo_out):
    out, proc = demo_out
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy on the samples" in proc.stdout and "gradcam++ peak in shape box" in proc.stdout
    assert str(out / "contact_sheet.png") in proc.stdout


@pytest.mark.server
def test_no_torchserve_process_is_left(demo_out):
    out, proc = demo_out
    assert proc.returncode == 0, proc.stderr[-3000:]
    instance = Instance.load(out / "serve_run")
    assert instance.pid > 0 and not _alive(instance.pid)
    assert instance_processes(instance.run_dir, instance.pid) == []  # frontend, workers, orphans


@pytest.mark.server
def test_contact_sheet_has_every_tile(demo_out):
    out, proc = demo_out
    assert proc.returncode == 0, proc.stderr[-3000:]
    sheet = cv2.imread(str(out / "contact_sheet.png"), cv2.IMREAD_UNCHANGED)
    assert sheet is not None and sheet.dtype == np.uint8 and sheet.shape[2] == 3
    columns = demo_run.SAMPLES_PER_ROW * (1 + len(METHODS))
    rows = -(-SAMPLES * (1 + len(METHODS)) // columns)
    tile, pad = demo_run.TILE, demo_run.PAD
    assert sheet.shape[:2] == (demo_run.HEADER + rows * (tile + STRIP + pad) + pad, columns * (tile + pad) + pad)
    # every tile is drawn: the tile areas are not the sheet's white background
    for r in range(rows):
        for c in range(columns):
            y, x = demo_run.HEADER + pad + r * (tile + STRIP + pad) + STRIP, pad + c * (tile + pad)
            assert sheet[y : y + tile, x : x + tile].mean() < 200, (r, c)


@pytest.mark.server
def test_overlays_and_answers_for_every_sample(demo_out):
    out, proc = demo_out
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = json.loads((out / "samples" / "samples.json").read_text())
    assert len(samples) == SAMPLES
    summary = json.loads((out / "demo_summary.json").read_text())
    labels = summary["model"]["labels"]
    correct = 0
    for s in samples:
        stem = Path(s["file"]).stem
        answer = json.loads((out / "results" / f"{stem}.camserve.json").read_text())
        assert answer["schema"] == "camserve/1" and answer["model"]["name"] == "shapes"
        assert len(answer["model"]["graph_sha256"]) == 64
        (image,) = answer["images"]
        assert (image["width"], image["height"]) == (SAMPLE_SIZE, SAMPLE_SIZE)
        preds = image["predictions"]
        scores = [p["score"] for p in preds]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-4
        assert all(labels[p["index"]] == p["label"] for p in preds)
        correct += preds[0]["label"] == s["label"]
        assert [e["method"] for e in image["explanations"]] == METHODS
        for exp in image["explanations"]:
            assert exp["target"]["index"] == preds[0]["index"]  # top1 by default
            peak = exp["summary"]["peak"]
            assert 0 <= peak[0] < SAMPLE_SIZE and 0 <= peak[1] < SAMPLE_SIZE
            path = out / "results" / exp["overlay_file"]
            assert path.name == f"{stem}.{exp['method']}.{preds[0]['index']}.overlay.png"
            overlay = cv2.imread(str(path), cv2.IMREAD_COLOR)
            assert overlay is not None and overlay.shape == (SAMPLE_SIZE, SAMPLE_SIZE, 3)
        assert set(answer["timings_ms"]) >= {"preprocess", "inference", "cam", "encode"}
    assert summary["accuracy"] == pytest.approx(correct / SAMPLES)
    assert correct >= SAMPLES - 2  # 98 % on fresh 128 px images: one miss in six is already rare


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    for args in (["--samples", "0"], ["--methods", "gradcam,nosuch"]):
        proc = run_demo("--out", str(tmp_path / "out"), *args, timeout=120)
        assert proc.returncode == 2 and proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1 and "error" in proc.stderr
    assert "nosuch" in proc.stderr and not (tmp_path / "out").exists()
