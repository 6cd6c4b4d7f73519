"""camserve compare against a real TorchServe serving three versions of the shapes model.

``shapes/1.0`` is trained on clean shapes; ``shapes/2.0`` on images where a corner marker
names the class (it learns the shortcut); ``shapes/1.1`` is the 1.0 graph again. Inputs
carry both cues (marker and shape name the same class) plus a few conflicting ones. The
server's audit log keeps heatmaps and inputs, so the audit mode is checked on real records.
The served comparison asks for faithfulness metrics (``metrics=``), checked against
:func:`camserve.faithfulness.score_maps` run here on the exports.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from _compare_fixture import direct, marked_images, open_in_chromium, shapes_exports, side_label
from camserve.cli import main
from camserve.serving.torchserve.server import Instance

pytestmark = pytest.mark.server

PORTS = ("inference", "management", "metrics", "grpc-inference", "grpc-management")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Archive the three versions and serve them; always stopped afterwards."""
    from camserve.serving.torchserve.archive import build_archive

    ex = shapes_exports()
    store = tmp_path_factory.mktemp("compare_store")
    build_archive(ex["normal"], name="shapes", version="1.0", model_store=store)
    build_archive(ex["shortcut"], name="shapes", version="2.0", model_store=store, mar_name="shapes-2.0")
    build_archive(ex["normal"], name="shapes", version="1.1", model_store=store, mar_name="shapes-1.1")
    images = tmp_path_factory.mktemp("compare_images")
    meta = marked_images(images)
    run_dir = tmp_path_factory.mktemp("compare_run")
    config = run_dir.parent / f"{run_dir.name}-config.yaml"
    config.write_text("audit: {store_heatmaps: true, store_inputs: true}\n")
    argv = ["serve", "--model-store", str(store), "--run-dir", str(run_dir), "--config", str(config),
            *[a for p in PORTS for a in (f"--{p}-port", "0")], "--batch-size", "4", "--max-batch-delay", "5", "--ort-threads", "1",
            "--post-processing", "device"]  # GradCAM as ONNX graphs in the worker (camserve.cam.device), checked against numpy here
    try:
        assert main(argv) == 0
        yield Instance.load(run_dir), images, meta, ex
    finally:
        if (run_dir / "state.json").exists() or (run_dir / "tmp" / ".model_server.pid").exists():
            main(["stop", "--run-dir", str(run_dir)])


def compare(capsys, *argv):
    code = main(["compare", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def direct_top1_and_iou(ex, images):
    """Top-1 of both exports and the gradcam top-region IoU, computed here with ONNX Runtime."""
    from camserve import cam
    from camserve.pipeline import imageio
    from camserve.pipeline.runtime import GraphSession
    from _compare_fixture import direct_iou

    out = {}
    sessions = {k: GraphSession(ex[k], intra_op_threads=1) for k in ("normal", "shortcut")}
    for path in sorted(images.glob("*.png")):
        rgb = imageio.decode(path.read_bytes(), 10**8)
        res = {}
        for k, s in sessions.items():
            m = s.manifest
            e = cam.explain(s, imageio.preprocess([rgb], m.input_size, m.mean, m.std, m.channel_order), [cam.TopK(1)], ["gradcam"])
            res[k] = (int(e.logits[0].argmax()), e.cams["gradcam"][0][0])
        out[path.name] = (res["normal"][0], res["shortcut"][0], direct_iou(res["normal"][1], res["shortcut"][1]))
    return out


@pytest.fixture(scope="module")
def shortcut_report(served, tmp_path_factory):
    instance, images, meta, ex = served
    out = tmp_path_factory.mktemp("shortcut_report")
    url_a = f"{instance.inference_url}/predictions/shapes/1.0"
    url_b = f"{instance.inference_url}/shapes/2.0"  # the short form of the issue
    code = main(["compare", "--a", url_a, "--b", url_b, "--images", str(images), "--methods", "gradcam",
                 "--out", str(out), "--run-dir", str(instance.run_dir), "--min-agreement", "0.75", "--min-cam-iou", "0.5",
                 "--metrics", "drop,confidence_change"])
    return code, out, json.loads((out / "summary.json").read_text())


def test_shortcut_version_agrees_but_looks_elsewhere_and_fails_the_iou_gate(served, shortcut_report):
    instance, images, meta, ex = served
    code, out, s = shortcut_report
    assert code == 1 and s["complete"] is True and s["mode"] == "http"
    assert s["failed_gates"] == ["min_cam_iou (gradcam)"] and s["passed"] is False
    assert s["a"]["version"] == "1.0" and s["b"]["version"] == "2.0"
    assert s["names"] == {"a": side_label(ex["normal"]), "b": side_label(ex["shortcut"])}  # the graph hash the server sent
    images_by_key = {im["key"]: im for im in s["images"]}
    assert set(images_by_key) == set(meta)
    consistent = [k for k, m in meta.items() if m["label"] == m["shape"]]
    rate = np.mean([images_by_key[k]["agree"] for k in consistent])
    assert rate >= 0.85  # both models right on images where marker and shape agree
    iou = s["similarity"]["gradcam"]["iou"]
    assert iou["mean"] < 0.2 and s["similarity"]["gradcam"]["iou_when_agree"]["median"] < 0.15
    # figures against ONNX Runtime run here on the same files (server maps are float16)
    direct = direct_top1_and_iou(ex, images)
    for key, (ta, tb, d_iou) in direct.items():
        im = images_by_key[key]
        assert im["a"]["predictions"][0]["index"] == ta and im["b"]["predictions"][0]["index"] == tb
        assert im["cam"]["gradcam"]["iou"] == pytest.approx(d_iou, abs=0.05)
    agree = [ta == tb for ta, tb, _ in direct.values()]
    assert s["agreement"]["agree"] == sum(agree) and s["agreement"]["n"] == len(agree)
    assert iou["mean"] == pytest.approx(np.mean([d for *_, d in direct.values()]), abs=0.02)
    # the first cases a reviewer sees: A looks at the shape, B away from it, at the image border
    # where the corner markers are (for some classes the marker's corner, for others the
    # opposite edges: the absence of the other markers), i.e. the shortcut
    for key in s["divergent"][:5]:
        m, c = meta[key], images_by_key[key]["cam"]["gradcam"]
        (ax, ay), (bx, by) = c["peak_a"], c["peak_b"]
        x0, y0, x1, y1 = m["box"]
        assert x0 - 4 <= ax <= x1 + 4 and y0 - 4 <= ay <= y1 + 4, (key, c, m)
        assert not (x0 - 2 <= bx <= x1 + 2 and y0 - 2 <= by <= y1 + 2), (key, c, m)
        assert min(bx, by, 63 - bx, 63 - by) <= 14, (key, c, m)
    assert set(s["disagreements"]) == {k for k, (ta, tb, _) in direct.items() if ta != tb}
    conflicts = {k for k, m in meta.items() if m["label"] != m["shape"]}
    assert len(conflicts & set(s["disagreements"])) >= 3  # marker says one class, shape another
    for side in ("a", "b"):
        lat = s["latency_ms"][side]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]


def test_the_workers_took_the_post_processing_flag(served):
    """``--post-processing device`` reached every worker (config -> environment -> handler):
    each says so in the model log once loaded. The answers above come from that path."""
    import time

    instance = served[0]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # log lines reach the file a moment after the worker is up
        log = (instance.run_dir / "logs" / "model_log.log").read_text(errors="replace")
        if log.count("CAM post-processing: ONNX graphs on the cpu device") >= 3:  # shapes 1.0, 1.1 and 2.0
            break
        time.sleep(0.2)
    assert log.count("CAM post-processing: ONNX graphs on the cpu device") >= 3, log[-2000:]
    assert "CAM post-processing: numpy on the host" not in log


def test_served_faithfulness_matches_score_maps_run_here(served, shortcut_report):
    from camserve.faithfulness import score_maps

    _, images, _, ex = served
    _, _, s = shortcut_report
    f = s["faithfulness"]["gradcam"]
    assert s["metrics"] == ["drop", "confidence_change"] and set(f) == {"drop", "confidence_change"}
    for side, kind in (("a", "normal"), ("b", "shortcut")):
        tops, cams, run = direct(ex[kind], images, ["gradcam"])
        here = score_maps(run["session"].forward_logits, run["images"], cams["gradcam"], tops, ["drop", "confidence_change"],
                          base_logits=run["logits"])
        served_drop = [im["faithfulness"]["gradcam"][side]["drop"] for im in s["images"]]
        assert served_drop == pytest.approx(here["drop"], abs=2e-3)
        assert f["drop"][side] == pytest.approx(here["drop"].mean(), abs=1e-3) and f["drop"]["n"] == len(s["images"])
        assert f["confidence_change"][side] == pytest.approx(here["confidence_change"].mean(), abs=1e-3)


def test_report_of_the_served_comparison_loads_in_chromium(shortcut_report, tmp_path):
    _, out, s = shortcut_report
    page = open_in_chromium(out / "report.html", tmp_path)
    shown = min(12, len(s["divergent"])) + min(12, len(s["disagreements"]))
    assert page["total"] == 2 + 2 + 2 * shown and page["loaded"] == page["total"]  # plots, mean maps, cases
    assert page["console"] == []


def test_identical_versions_agree_fully_and_pass(served, tmp_path, capsys):
    instance, images, _, _ = served
    code, out, err = compare(capsys, "--a", f"{instance.inference_url}/shapes/1.0", "--b", f"{instance.inference_url}/shapes/1.1",
                             "--images", images, "--out", tmp_path, "--run-dir", instance.run_dir,
                             "--min-agreement", "1.0", "--min-cam-iou", "1.0", "--min-road", "0")
    assert code == 0, err
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["agreement"]["top1"] == 1.0 and s["similarity"]["gradcam"]["iou"]["min"] == 1.0
    assert s["similarity"]["gradcam"]["pearson"]["min"] == pytest.approx(1.0) and s["passed"] is True
    # the same graph served twice: the same ROAD (a seeded perturbation), so the gate at margin 0 passes
    road = s["faithfulness"]["gradcam"]["road"]
    assert road["delta"] == 0.0 and road["n"] > 0 and road["a"] is not None
    assert [g["name"] for g in s["gates"]] == ["min_agreement", "min_cam_iou", "min_road"]
    assert s["names"]["a"].split(" ")[1:] == s["names"]["b"].split(" ")[1:] and "shapes/1.1 (graph " in out
    page = (tmp_path / "report.html").read_text()
    assert s["divergent"] == [] and s["disagreements"] == [] and 'class="case"' not in page and page.count("no divergence") == 2


def test_audit_mode_matches_inputs_by_hash(served, shortcut_report, tmp_path, capsys):
    instance, images, meta, _ = served
    _, _, http = shortcut_report
    log = instance.run_dir / "audit" / "audit.sqlite"
    assert log.is_file()
    code, _, err = compare(capsys, "--audit", log, "--a", "shapes/1.0", "--b", "shapes/2.0", "--out", tmp_path)
    assert code == 0, err
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["mode"] == "audit" and s["n_images"] == len(meta)
    assert s["agreement"] == http["agreement"]
    assert s["similarity"]["gradcam"]["source"] == "maps"  # stored heatmaps (8-bit PNG)
    assert s["similarity"]["gradcam"]["iou"]["mean"] == pytest.approx(http["similarity"]["gradcam"]["iou"]["mean"], abs=0.05)
    assert s["aggregate"]["gradcam"]["n"] == len(meta)  # mean maps from the stored heatmaps
    assert s["aggregate"]["gradcam"]["iou"] == pytest.approx(http["aggregate"]["gradcam"]["iou"], abs=0.1)
    html = (tmp_path / "report.html").read_text()
    assert html.count("<img") == 2 + 2 + 2 * (min(12, len(s["divergent"])) + min(12, len(s["disagreements"])))
    assert "Faithfulness</h2><p>Not available" in html
    code, _, err = compare(capsys, "--audit", log, "--a", "shapes/1.0", "--b", "shapes/7.0", "--out", tmp_path / "x")
    assert code == 2 and "shapes/7.0" in err and not (tmp_path / "x" / "summary.json").exists()


@pytest.mark.parametrize("path", ["shapes/9.9", "nosuchmodel/1.0"])
def test_unknown_model_or_version_exits_2(served, path, tmp_path, capsys):
    instance, images, _, _ = served
    out = tmp_path / "out"
    code, _, err = compare(capsys, "--a", f"{instance.inference_url}/shapes/1.0", "--b", f"{instance.inference_url}/{path}",
                           "--images", images, "--out", out, "--run-dir", instance.run_dir)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "404" in err and path in err, err
    assert not out.exists() or not any(out.iterdir())


def test_token_refusal_names_the_flag_and_the_default_run_dir_works(served, tmp_path, capsys, monkeypatch):
    """The README's compare example against a default (token on) server: without the key the
    one-line error says which flag to pass; from the folder that holds serve_run it just works."""
    import shutil

    instance, images, _, _ = served
    a, b = f"{instance.inference_url}/shapes/1.0", f"{instance.inference_url}/shapes/1.0"
    monkeypatch.chdir(tmp_path)  # no serve_run here: no key to find
    code, _, err = compare(capsys, "--a", a, "--b", b, "--images", images, "--out", tmp_path / "r1")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "InvalidKeyException" in err and "--run-dir" in err and "--token" in err, err
    (tmp_path / "serve_run").mkdir()
    shutil.copy(instance.run_dir / "key_file.json", tmp_path / "serve_run" / "key_file.json")
    code, out, err = compare(capsys, "--a", a, "--b", b, "--images", images, "--out", tmp_path / "r2")
    assert code == 0 and (tmp_path / "r2" / "summary.json").is_file(), err
