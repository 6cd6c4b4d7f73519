"""camserve compare without a server: similarity math against scipy, export-folder mode
figures against a direct computation, gates, errors (exit 2, no report) and the HTML page
in headless Chromium."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats as st

from _compare_fixture import open_in_chromium, write_png
from _server_fixture import sample_image, tiny_export
from camserve.cli import main
from camserve.compare import similarity as sim
from camserve.compare.analysis import wilson

METHODS = ["gradcam", "layercam"]


def direct_iou(a: np.ndarray, b: np.ndarray, share: float = 0.2) -> float:
    """Top-region IoU written out: the region is every pixel >= the k-th largest value."""
    k = math.ceil(share * a.size)
    ra = a.ravel() >= np.sort(a.ravel())[::-1][k - 1]
    rb = b.ravel() >= np.sort(b.ravel())[::-1][k - 1]
    return float((ra & rb).sum() / (ra | rb).sum())


def test_similarity_measures_match_scipy_and_definitions():
    rng = np.random.default_rng(3)
    a = np.maximum(rng.normal(size=(6, 12, 10)), 0).astype(np.float32)  # ReLU: many tied zeros
    b = np.maximum(a + rng.normal(scale=0.7, size=a.shape), 0).astype(np.float32)
    b[2] = a[2] * 3.0 + 1.0  # monotone transform: both correlations 1, same regions, same peak
    b[3] = np.round(b[3], 1)  # more ties
    s = sim.similarity(a, b)
    for i in range(6):
        assert s["pearson"][i] == pytest.approx(st.pearsonr(a[i].ravel().astype(float), b[i].ravel().astype(float))[0], abs=1e-9)
        assert s["spearman"][i] == pytest.approx(st.spearmanr(a[i].ravel(), b[i].ravel())[0], abs=1e-9)
        assert s["iou"][i] == pytest.approx(direct_iou(a[i], b[i]), abs=1e-12)
        ya, xa = np.unravel_index(a[i].argmax(), a[i].shape)
        yb, xb = np.unravel_index(b[i].argmax(), b[i].shape)
        assert s["peak_px"][i] == pytest.approx(math.hypot(xa - xb, ya - yb))
        assert s["peak_norm"][i] == pytest.approx(math.hypot(xa - xb, ya - yb) / math.hypot(9, 11))
    assert s["pearson"][2] == pytest.approx(1.0) and s["spearman"][2] == pytest.approx(1.0)
    assert s["iou"][2] == 1.0 and s["peak_px"][2] == 0.0
    assert np.array_equal(sim.average_ranks(np.array([[3.0, 1.0, 3.0, 2.0]])), st.rankdata([[3, 1, 3, 2]], axis=1))
    const = sim.pearson(np.ones((1, 4, 4)), a[:1, :4, :4])
    assert np.isnan(const[0])  # undefined, not a made-up 0
    with pytest.raises(Exception, match="one shape"):
        sim.pearson(a, b[:, :5])


def test_wilson_interval_known_values():
    assert wilson(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-5)
    assert wilson(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-5)
    assert wilson(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-5)
    assert wilson(98, 100) == pytest.approx((0.929988, 0.994498), abs=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    images = tmp_path_factory.mktemp("tiny-images")
    for i in range(10):
        write_png(images / f"s{i:02d}.png", sample_image(i))
    return tiny_export(base, "1.0", 0), tiny_export(base, "2.0", 1), images


def run_cli(capsys, *argv):
    code = main(["compare", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def direct(export_dir: Path, images: Path, methods: list[str]):
    """Top-1 class and maps per image, straight from GraphSession + cam.explain (one image per call)."""
    from camserve import cam
    from camserve.pipeline import imageio
    from camserve.pipeline.runtime import GraphSession

    session = GraphSession(export_dir, intra_op_threads=1)
    m = session.manifest
    tops, cams = [], {k: [] for k in methods}
    for path in sorted(images.glob("*.png")):
        rgb = imageio.decode(path.read_bytes(), 10**8)
        out = cam.explain(session, imageio.preprocess([rgb], m.input_size, m.mean, m.std, m.channel_order), [cam.TopK(1)], methods)
        tops.append(int(out.logits[0].argmax()))
        for k in methods:
            cams[k].append(out.cams[k][0][0])
    return np.array(tops), {k: np.stack(v) for k, v in cams.items()}


def test_export_mode_figures_match_a_direct_computation(tiny, tmp_path, capsys):
    a, b, images = tiny
    out = tmp_path / "report"
    code, stdout, _ = run_cli(capsys, "--export-a", a, "--export-b", b, "--images", images, "--methods", ",".join(METHODS), "--out", out)
    assert code == 0 and "top-1 agreement" in stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] is True and s["mode"] == "export" and s["n_images"] == 10 and s["passed"] is True
    top_a, cams_a = direct(a, images, METHODS)
    top_b, cams_b = direct(b, images, METHODS)
    agree = top_a == top_b
    assert s["agreement"]["agree"] == int(agree.sum())
    assert s["agreement"]["top1"] == pytest.approx(agree.mean(), abs=1e-6)
    assert s["agreement"]["ci95"] == pytest.approx(list(wilson(int(agree.sum()), 10)), abs=1e-6)
    keys = [im["key"] for im in s["images"]]
    assert keys == sorted(p.name for p in images.glob("*.png"))
    for m in METHODS:
        pear = [st.pearsonr(x.ravel(), y.ravel())[0] for x, y in zip(cams_a[m], cams_b[m])]
        spear = [st.spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(cams_a[m], cams_b[m])]
        iou = [direct_iou(x, y) for x, y in zip(cams_a[m], cams_b[m])]
        for i, im in enumerate(s["images"]):
            assert im["agree"] == bool(agree[i])
            assert [p["index"] for p in im["a"]["predictions"]][0] == top_a[i]
            assert im["cam"][m]["pearson"] == pytest.approx(pear[i], abs=1e-5)
            assert im["cam"][m]["spearman"] == pytest.approx(spear[i], abs=1e-5)
            assert im["cam"][m]["iou"] == pytest.approx(iou[i], abs=1e-5)
        d = s["similarity"][m]
        assert d["iou"]["mean"] == pytest.approx(np.mean(iou), abs=1e-5)
        assert d["pearson"]["median"] == pytest.approx(np.median(pear), abs=1e-5)
        assert d["spearman"]["p95"] == pytest.approx(np.percentile(spear, 95), abs=1e-5)
    for side in ("a", "b"):
        lat = [im[side]["latency_ms"] for im in s["images"]]
        assert all(v > 0 for v in lat)
        for q in (50, 95, 99):
            assert s["latency_ms"][side][f"p{q}"] == pytest.approx(np.percentile(lat, q), abs=1e-3)
    # ranked lists: agreeing inputs by ascending IoU of the first method, then differing ones
    assert sorted(s["divergent"] + s["disagreements"]) == keys
    assert set(s["disagreements"]) == {k for k, ok in zip(keys, agree) if not ok}
    ious = [s["images"][keys.index(k)]["cam"]["gradcam"]["iou"] for k in s["divergent"]]
    assert ious == sorted(ious)
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_identical_versions_agree_fully_and_pass_the_gates(tiny, tmp_path, capsys):
    a, _, images = tiny
    out = tmp_path / "same"
    code, _, err = run_cli(capsys, "--export-a", a, "--export-b", a, "--images", images, "--out", out,
                           "--min-agreement", "1.0", "--min-cam-iou", "1.0")
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["agreement"]["top1"] == 1.0 and s["passed"] is True and s["failed_gates"] == []
    g = s["similarity"]["gradcam"]
    assert g["iou"]["min"] == 1.0 and g["pearson"]["min"] == pytest.approx(1.0) and g["peak_px"]["max"] == 0.0
    assert s["disagreements"] == []
    from camserve.compare import compare_exports  # the Python API gives the same summary

    api = compare_exports(str(a), str(a), str(images), min_agreement=1.0)
    assert api["agreement"] == s["agreement"] and api["passed"] is True and api["n_images"] == 10


def test_failed_gate_exits_1_and_names_it(tiny, tmp_path, capsys):
    a, b, images = tiny
    out = tmp_path / "gate"
    code, _, err = run_cli(capsys, "--export-a", a, "--export-b", b, "--images", images, "--out", out,
                           "--min-agreement", "1.0", "--min-cam-iou", "0.95")
    s = json.loads((out / "summary.json").read_text())
    assert s["agreement"]["top1"] < 1.0 and s["similarity"]["gradcam"]["iou"]["mean"] < 0.95  # random weights differ
    assert code == 1 and s["passed"] is False
    assert s["failed_gates"] == ["min_agreement", "min_cam_iou (gradcam)"]
    assert "gate failed: min_agreement, min_cam_iou (gradcam)" in err
    assert "gates failed" in (out / "report.html").read_text()


def _unreachable_url() -> str:
    from camserve.serving.torchserve.server import free_port

    return f"http://127.0.0.1:{free_port()}/predictions/shapes/1.0"


@pytest.mark.parametrize("case", ["empty", "unreadable", "missing_export", "unreachable", "bad_url", "no_sides", "no_audit"])
def test_errors_exit_2_with_one_line_and_leave_no_report(case, tiny, tmp_path, capsys):
    a, _, images = tiny
    out = tmp_path / "out"
    out.mkdir()
    for name in ("summary.json", "report.html"):  # a stale complete report from an earlier run
        (out / name).write_text("{}")
    folder = tmp_path / "imgs"
    folder.mkdir()
    argv = ["--export-a", a, "--export-b", a, "--images", folder]
    if case == "empty":
        (folder / "notes.txt").write_text("not an image")
        expect = "holds no images"
    elif case == "unreadable":
        write_png(folder / "good.png", sample_image(1))
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        expect = "broken.png"
    elif case == "missing_export":
        write_png(folder / "good.png", sample_image(1))
        argv = ["--export-a", a, "--export-b", tmp_path / "nope", "--images", folder]
        expect = "nope"
    elif case == "unreachable":
        write_png(folder / "good.png", sample_image(1))
        url = _unreachable_url()
        argv = ["--a", url, "--b", url, "--images", folder]
        expect = "cannot reach"
    elif case == "bad_url":
        write_png(folder / "good.png", sample_image(1))
        argv = ["--a", "http://127.0.0.1:1/a/b/c/d", "--b", "ftp://x/y", "--images", folder]
        expect = "a/b/c/d"
    elif case == "no_sides":
        argv = ["--images", images]
        expect = "--a and --b"
    else:
        argv = ["--audit", tmp_path / "missing.db", "--a", "shapes/1.0", "--b", "shapes/2.0"]
        expect = "missing.db"
    code, _, err = run_cli(capsys, *argv, "--out", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("camserve compare: error:") and expect in lines[0], err
    assert not (out / "summary.json").exists() and not (out / "report.html").exists()
    assert not list(out.glob(".*partial"))


def test_report_opens_in_headless_chromium_with_every_image_loaded(tiny, tmp_path, capsys):
    a, b, images = tiny
    out = tmp_path / "html"
    assert run_cli(capsys, "--export-a", a, "--export-b", b, "--images", images, "--out", out)[0] == 0
    s = json.loads((out / "summary.json").read_text())
    page = open_in_chromium(out / "report.html", tmp_path)
    shown = min(12, len(s["divergent"])) + min(12, len(s["disagreements"]))
    assert page["total"] == 1 + 1 + 2 * shown  # gradcam plot, latency plot, A and B overlays per shown case
    assert page["loaded"] == page["total"]
    assert page["console"] == []
    shot = page["screenshot"]
    assert shot is not None and shot.shape[0] >= 2000
    rgb = shot.reshape(-1, 3).astype(int)
    coloured = (rgb.max(1) - rgb.min(1)) > 80  # plot bars and heatmaps, not just black text on white
    assert coloured.mean() > 0.01


def _record(version: str, shas: list[str], tops: list[int], peaks: list[list[int]], t: float) -> dict:
    """A record shaped like Service.record (one entry per image, gradcam on the top class)."""
    return {
        "time": t, "request_id": f"r-{version}-{t}", "model": {"name": "m", "version": version},
        "input_sha256": shas, "image_sizes": [[64, 64]] * len(shas), "outcome": "answered", "status": 200,
        "images": [{"predictions": [{"index": c, "label": f"c{c}", "score": 0.9}, {"index": 9, "label": "c9", "score": 0.05}],
                    "explanations": [{"method": "gradcam", "target": {"index": c, "label": f"c{c}", "score": 0.9},
                                      "summary": {"peak": p}}]} for c, p in zip(tops, peaks)],
        "timings_ms": {"preprocess": 1.0, "inference": 4.0, "cam": 2.0, "encode": 1.0},
    }


def test_audit_log_without_heatmaps_compares_answers_and_summary_peaks(tmp_path, capsys):
    from camserve.audit.records import prepare
    from camserve.audit.sqlite_sink import SQLiteSink

    s1, s2, s3 = ("1" * 64, "2" * 64, "3" * 64)
    sink = SQLiteSink(tmp_path / "log")
    sink.append([prepare(r, "test") for r in (
        _record("1.0", [s1], [0], [[5, 5]], 1.0),
        _record("1.0", [s2], [1], [[9, 9]], 2.0),  # B never saw this input
        _record("1.0", [s3], [2], [[0, 0]], 3.0),
        _record("1.0", [s1], [3], [[10, 10]], 4.0),  # the same input again: the latest answer wins
        _record("2.0", [s1, s3], [3, 1], [[13, 14], [30, 40]], 5.0),  # one request, two images
    )])
    sink.close()
    out = tmp_path / "rep"
    code, _, err = run_cli(capsys, "--audit", tmp_path / "log" / "audit.sqlite", "--a", "m/1.0", "--b", "m/2.0",
                           "--out", out, "--min-cam-iou", "0.1")
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "audit" and s["n_images"] == 2
    assert [im["key"] for im in s["images"]] == [s1[:16], s3[:16]]
    assert s["agreement"]["agree"] == 1 and s["disagreements"] == [s3[:16]] and s["divergent"] == [s1[:16]]
    g = s["similarity"]["gradcam"]
    assert g["source"] == "summary" and g["iou"] == {"n": 0} and g["pearson"] == {"n": 0}
    assert [im["cam"]["gradcam"]["peak_px"] for im in s["images"]] == pytest.approx([5.0, 50.0])
    assert s["latency_ms"]["a"]["p50"] == 8.0 and s["latency_ms"]["b"]["max"] == 8.0
    assert code == 1 and s["failed_gates"] == ["min_cam_iou (gradcam)"], err  # no IoU known: the gate cannot pass
    # also reachable as the log folder
    assert run_cli(capsys, "--audit", tmp_path / "log", "--a", "m/1.0", "--b", "m/2.0", "--out", tmp_path / "rep2")[0] == 0
