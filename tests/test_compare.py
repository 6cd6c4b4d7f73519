"""camserve compare without a server: similarity math against scipy, export-folder mode
figures against a direct computation, gates, errors (exit 2, no report), the HTML page in
headless Chromium, rounding and naming, faithfulness (fake and real ``score_maps``, a fake
served answer) and the progress bar."""

from __future__ import annotations

import io
import json
import math
import re
import sys

import numpy as np
import pytest
import scipy.stats as st

from _compare_fixture import (TTYBuffer, audit_record, direct, direct_iou, fake_road, on_bare_pty, open_in_chromium,
                              served_answer, side_label, visible_text, write_png)
from _server_fixture import sample_image, tiny_export
from camserve.cli import main
from camserve.compare import similarity as sim
from camserve.compare.analysis import wilson
from camserve.compare.text import fmt, side_name

METHODS = ["gradcam", "layercam"]


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


def test_export_mode_figures_match_a_direct_computation(tiny, tmp_path, capsys):
    a, b, images = tiny
    out = tmp_path / "report"
    code, stdout, err = run_cli(capsys, "--export-a", a, "--export-b", b, "--images", images, "--methods", ",".join(METHODS), "--out", out)
    assert code == 0 and "top-1 agreement" in stdout
    assert err == ""  # stderr is no terminal here: no progress bar
    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] is True and s["mode"] == "export" and s["n_images"] == 10 and s["passed"] is True
    top_a, cams_a, _ = direct(a, images, METHODS)
    top_b, cams_b, _ = direct(b, images, METHODS)
    agree = top_a == top_b
    assert s["agreement"]["agree"] == int(agree.sum())
    assert s["agreement"]["top1"] == pytest.approx(agree.mean(), abs=1e-6)
    assert s["agreement"]["ci95"] == pytest.approx(list(wilson(int(agree.sum()), 10)), abs=1e-6)
    keys = [im["key"] for im in s["images"]]
    assert keys == sorted(p.name for p in images.glob("*.png"))
    same = np.ones(10, bool)  # every method's maps the same map (IoU and r 1, same peak)
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
            same[i] &= iou[i] == 1.0 and not pear[i] < 1 - 1e-6 and np.argmax(cams_a[m][i]) == np.argmax(cams_b[m][i])
        # aggregate view: the mean maps over the image set, compared as one pair
        mean_a, mean_b = cams_a[m].mean(axis=0), cams_b[m].mean(axis=0)
        agg = s["aggregate"][m]
        assert agg["n"] == 10 and agg["size"] == list(mean_a.shape)
        assert agg["pearson"] == pytest.approx(st.pearsonr(mean_a.ravel(), mean_b.ravel())[0], abs=1e-5)
        assert agg["iou"] == pytest.approx(direct_iou(mean_a, mean_b), abs=1e-6)
        assert agg["max_a"] == pytest.approx(mean_a.max(), abs=1e-6)
        d = s["similarity"][m]
        assert d["iou"]["mean"] == pytest.approx(np.mean(iou), abs=1e-5)
        assert d["pearson"]["median"] == pytest.approx(np.median(pear), abs=1e-5)
        assert d["spearman"]["p95"] == pytest.approx(np.percentile(spear, 95), abs=1e-5)
    for side in ("a", "b"):
        lat = [im[side]["latency_ms"] for im in s["images"]]
        assert all(v > 0 for v in lat)
        for q in (50, 95, 99):
            assert s["latency_ms"][side][f"p{q}"] == pytest.approx(np.percentile(lat, q), abs=1e-3)
    # ranked lists: agreeing inputs whose maps differ by ascending IoU of the first method, then differing ones
    assert set(s["divergent"]) == {k for k, ok, eq in zip(keys, agree, same) if ok and not eq}
    assert s["divergence"] == {"diverging": int((agree & ~same).sum()), "identical": int((agree & same).sum()), "unknown": 0}
    assert set(s["disagreements"]) == {k for k, ok in zip(keys, agree) if not ok}
    ious = [s["images"][keys.index(k)]["cam"]["gradcam"]["iou"] for k in s["divergent"]]
    assert ious == sorted(ious)
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    # sides by name, never the model dict; figures rounded in the page and on stdout
    assert s["names"] == {"a": side_label(a), "b": side_label(b)}
    assert f"A {side_label(a)} vs B {side_label(b)}" in stdout
    assert f"<h1>camserve compare: {side_label(a)} vs {side_label(b)}</h1>" in page
    assert "graph_sha256" not in page and '{"name"' not in page and "{&quot;" not in page
    assert not re.search(r"\d\.\d{5,}", visible_text(page)), re.findall(r".{30}\d\.\d{5,}", visible_text(page))[:3]
    assert not re.search(r"\d\.\d{5,}", stdout), stdout
    assert f"mean IoU gradcam {fmt(s['similarity']['gradcam']['iou']['mean'])}, layercam" in stdout
    assert "mean gradcam" in page and page.count('alt="A ') >= 2 and "Faithfulness</h2><p>Not measured" in page
    assert "all 0 inputs" not in page
    if not agree.any():  # these two random models never agree: nothing to rank, and it says so
        assert "no input where the answers agree" in page


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
    assert s["disagreements"] == [] and s["divergent"] == []
    assert s["divergence"] == {"diverging": 0, "identical": 10, "unknown": 0}
    assert s["aggregate"]["gradcam"]["iou"] == 1.0 and s["aggregate"]["gradcam"]["peak_px"] == 0.0
    page = (out / "report.html").read_text()
    # nothing diverges: one line per ranked list instead of a gallery
    assert 'class="case"' not in page and page.count("no divergence") == 2
    assert "the explanations of all 10 inputs where the answers agree are the same" in page
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


@pytest.mark.parametrize("case", ["empty", "unreadable", "missing_export", "unreachable", "bad_url", "no_sides", "no_audit",
                                  "unknown_metric", "audit_metrics", "audit_min_road"])
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
    elif case == "unknown_metric":
        write_png(folder / "good.png", sample_image(1))
        argv += ["--metrics", "road,bogus"]
        expect = "'bogus'"
    elif case.startswith("audit_"):
        flag = ["--metrics", "drop"] if case == "audit_metrics" else ["--min-road", "0"]
        argv = ["--audit", tmp_path, "--a", "m/1.0", "--b", "m/2.0", *flag]
        expect = f"{flag[0]} needs served or exported sides"
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
    assert page["total"] == 1 + 1 + 2 + 2 * shown  # gradcam and latency plots, A and B mean maps, A and B per case
    assert page["loaded"] == page["total"]
    assert page["console"] == []
    shot = page["screenshot"]
    assert shot is not None and shot.shape[0] >= 2000
    rgb = shot.reshape(-1, 3).astype(int)
    coloured = (rgb.max(1) - rgb.min(1)) > 80  # plot bars and heatmaps, not just black text on white
    assert coloured.mean() > 0.01


def test_audit_log_without_heatmaps_compares_answers_and_summary_peaks(tmp_path, capsys):
    from camserve.audit.records import prepare
    from camserve.audit.sqlite_sink import SQLiteSink

    s1, s2, s3 = ("1" * 64, "2" * 64, "3" * 64)
    sink = SQLiteSink(tmp_path / "log")
    sink.append([prepare(r, "test") for r in (
        audit_record("1.0", [s1], [0], [[5, 5]], 1.0),
        audit_record("1.0", [s2], [1], [[9, 9]], 2.0),  # B never saw this input
        audit_record("1.0", [s3], [2], [[0, 0]], 3.0),
        audit_record("1.0", [s1], [3], [[10, 10]], 4.0),  # the same input again: the latest answer wins
        audit_record("2.0", [s1, s3], [3, 1], [[13, 14], [30, 40]], 5.0),  # one request, two images
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
    page = (out / "report.html").read_text()
    assert "<h1>camserve compare: m/1.0 vs m/2.0</h1>" in page and s["names"] == {"a": "m/1.0", "b": "m/2.0"}
    assert "Faithfulness</h2><p>Not available" in page and s["faithfulness"] == {} and s["aggregate"] == {}
    assert "no input has maps on both sides" in page and page.count("<img") == 2  # the two plots, no map anywhere
    # also reachable as the log folder
    assert run_cli(capsys, "--audit", tmp_path / "log", "--a", "m/1.0", "--b", "m/2.0", "--out", tmp_path / "rep2")[0] == 0


def test_fmt_rounds_to_three_significant_digits_and_sides_are_named():
    assert [fmt(v) for v in (0.876543, 12.3456, 1234.56, 0.000123456, 1.0, 0.0, None, math.nan)] == \
        ["0.877", "12.3", "1235", "0.0001", "1.00", "0", "n/a", "n/a"]
    assert fmt(-0.0123456, sign=True) == "-0.0123" and fmt(0.5, sign=True) == "+0.500"
    assert side_name({"name": "resnet50", "version": "2.0", "graph_sha256": "1a2b3c4d5e6f" + "0" * 52}) == \
        "resnet50/2.0 (graph 1a2b3c4d)"
    assert side_name({"name": "m", "version": None, "url": "http://x/m"}) == "m"


def test_progress_bar_only_on_a_terminal():
    from camserve.compare.progress import QuietBar, bar

    assert isinstance(bar(5, "comparing", stream=io.StringIO()), QuietBar)
    tty = TTYBuffer()
    with bar(3, "comparing", stream=tty) as progress:
        for _ in range(3):
            progress.update()
    drawn = tty.getvalue()
    assert "comparing" in drawn and "3/3" in drawn and "img/s" in drawn, drawn

    def draw(term):
        with bar(4, "comparing", stream=term) as progress:
            progress.update(4)

    seen = on_bare_pty(draw)
    assert "4/4" in seen and "img/s" in seen, seen


def test_min_road_gate_fails_when_b_is_less_faithful(tiny, tmp_path, capsys, monkeypatch):
    a, b, images = tiny
    calls: list = []
    monkeypatch.setattr("camserve.faithfulness.score_maps", fake_road(calls))
    code, stdout, err = run_cli(capsys, "--export-a", a, "--export-b", b, "--images", images, "--out", tmp_path / "r0",
                                "--min-road", "0")
    s = json.loads((tmp_path / "r0" / "summary.json").read_text())
    assert s["metrics"] == ["road"] and calls and all(c == ["road"] for c in calls)  # --min-road implies road
    means = {}
    for side, d in (("a", a), ("b", b)):
        _, cams, _ = direct(d, images, ["gradcam"])
        means[side] = cams["gradcam"].mean(axis=(1, 2))
    ok = np.isfinite(means["a"]) & np.isfinite(means["b"])
    road = s["faithfulness"]["gradcam"]["road"]
    assert road["n"] == int(ok.sum()) and road["a"] == pytest.approx(means["a"][ok].mean(), abs=1e-5)
    assert road["delta"] == pytest.approx(means["b"][ok].mean() - means["a"][ok].mean(), abs=1e-5) and road["delta"] != 0
    assert set(s["faithfulness"]["gradcam"]) == {"road", "road_morf", "road_lerf"}
    assert s["images"][0]["faithfulness"]["gradcam"]["a"]["road"] == pytest.approx(means["a"][0], abs=1e-5)
    assert (code == 1) == (road["delta"] < 0) and ("mean ROAD gradcam A " in stdout)
    # B less faithful than A by |delta|: a margin below it fails, one above it passes
    worse, better = (b, a) if road["delta"] < 0 else (a, b)
    drop = abs(road["delta"])
    code, _, err = run_cli(capsys, "--export-a", better, "--export-b", worse, "--images", images, "--out", tmp_path / "r1",
                           "--metrics", "road", "--min-road", drop / 2)
    s = json.loads((tmp_path / "r1" / "summary.json").read_text())
    assert code == 1 and s["failed_gates"] == ["min_road (gradcam)"] and "gate failed: min_road (gradcam)" in err
    gate = s["gates"][0]
    assert gate["value"] == pytest.approx(-drop, abs=1e-6) and gate["threshold"] == -drop / 2 and not gate["passed"]
    page = (tmp_path / "r1" / "report.html").read_text()
    assert "gates failed: min_road (gradcam)" in page and "ROAD A " in page
    from camserve.compare import compare_exports

    api = compare_exports(str(better), str(worse), str(images), min_road=2 * drop)
    assert api["passed"] is True and api["gates"][0]["name"] == "min_road"


def test_export_metrics_match_score_maps_run_directly(tiny, tmp_path, capsys):
    from camserve.faithfulness import score_maps

    a, b, images = tiny
    code, _, err = run_cli(capsys, "--export-a", a, "--export-b", b, "--images", images, "--out", tmp_path,
                           "--metrics", "drop,confidence_change")
    assert code == 0, err
    s = json.loads((tmp_path / "summary.json").read_text())
    got = {}
    for side, d in (("a", a), ("b", b)):
        tops, cams, run = direct(d, images, ["gradcam"])
        got[side] = score_maps(run["session"].forward_logits, run["images"], cams["gradcam"], tops,
                               ["drop", "confidence_change"], base_logits=run["logits"])
        for i, im in enumerate(s["images"]):
            assert im["faithfulness"]["gradcam"][side]["drop"] == pytest.approx(got[side]["drop"][i], abs=1e-5)
    f = s["faithfulness"]["gradcam"]
    assert set(f) == {"drop", "confidence_change"} and f["drop"]["n"] == 10
    assert f["drop"]["a"] == pytest.approx(got["a"]["drop"].mean(), abs=1e-5)
    assert f["confidence_change"]["delta"] == pytest.approx(
        got["b"]["confidence_change"].mean() - got["a"]["confidence_change"].mean(), abs=1e-5)


def test_http_sides_ask_for_metrics_and_read_them(tiny, monkeypatch):
    from camserve.compare.analysis import analyse, apply_gates, name_sides
    from camserve.compare.data import CompareError
    from camserve.compare.runner import collect_http

    _, _, images = tiny
    sent = []

    def post_image(url, data, ctype, token, timeout, params):
        sent.append((url, dict(params)))
        version = url.rsplit("/", 1)[1]
        return served_answer(version, 0.25 if version == "1.0" else None, with_metrics=version != "9.0")

    monkeypatch.setattr("camserve.serving.client.post_image", post_image)
    tty = TTYBuffer()
    monkeypatch.setattr(sys, "stderr", tty)
    pairs, ma, mb = collect_http("http://h:1/m/1.0", "http://h:1/predictions/m/2.0", str(images), ["gradcam"], None, None,
                                 5.0, metrics=("road",))
    assert len(sent) == 20 and all(p["metrics"] == "road" and p["target"] == "top1" for _, p in sent)
    assert "10/10" in tty.getvalue()  # the progress bar counted the inputs on the (fake) terminal
    assert pairs[0].a.metrics["gradcam"] == {"road": 0.25, "road_morf": 0.1, "road_lerf": 0.6}
    assert math.isnan(pairs[0].b.metrics["gradcam"]["road"])  # null: undefined
    s = apply_gates({"mode": "http", **name_sides({}, ma, mb), **analyse(pairs, ["gradcam"], metrics=("road",))}, None, None, 0.0)
    assert s["names"] == {"a": "m/1.0 (graph 10101010)", "b": "m/2.0 (graph 20202020)"}
    assert s["faithfulness"]["gradcam"]["road"] == {"a": None, "b": None, "delta": None, "n": 0}
    assert s["faithfulness"]["gradcam"]["road_lerf"] == {"a": 0.6, "b": 0.6, "delta": 0.0, "n": 10}
    assert s["failed_gates"] == ["min_road (gradcam)"]  # no defined ROAD pair: nothing shows B is as faithful
    with pytest.raises(CompareError, match=r"m/9\.0 on s00\.png: the gradcam explanation has no road metric"):
        collect_http("http://h:1/m/1.0", "http://h:1/m/9.0", str(images), ["gradcam"], None, None, 5.0, metrics=("road",))
