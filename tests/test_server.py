"""A real TorchServe (Java frontend + Python worker) on free loopback ports, one per module.

Two versions of the tiny CNN are archived and served side by side; answers are checked
against the CAM module run directly on the same images.
"""

from __future__ import annotations

import json
import time
import stat
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from _server_fixture import (
    LABELS,
    answer_json,
    array_of,
    direct_explanation,
    http,
    multipart,
    png_bytes,
    sample_image,
    softmax,
    tiny_export,
)
from camserve import cam
from camserve.pipeline.imageio import decode
from camserve.pipeline.metrics import parse_prometheus
from camserve.cli import main
from camserve.serving.torchserve.server import Instance, _alive
from camserve.config import PORT_FIELDS

pytestmark = pytest.mark.server

PORTS = PORT_FIELDS  # every port camserve serve opens, all free ones in tests


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Archive v1.0 and v2.0 (different weights) and serve both; always stopped afterwards."""
    from camserve.serving.torchserve.archive import build_archive

    base = tmp_path_factory.getbasetemp()
    exports = {"1.0": tiny_export(base, "1.0", seed=0), "2.0": tiny_export(base, "2.0", seed=1)}
    store = tmp_path_factory.mktemp("model_store")
    build_archive(exports["1.0"], name="tiny", version="1.0", model_store=store)
    build_archive(exports["2.0"], name="tiny", version="2.0", model_store=store, mar_name="tiny-2.0")
    run_dir = tmp_path_factory.mktemp("serve_run")
    ports = [a for p in PORTS for a in (f"--{p.replace('_port', '').replace('_', '-')}-port", "0")]
    argv = ["serve", "--model-store", str(store), "--run-dir", str(run_dir), *ports,
            "--batch-size", "8", "--max-batch-delay", "150", "--ort-threads", "1"]
    try:
        assert main(argv) == 0  # the real CLI: camserve serve ... (returns once every worker is READY)
        yield Instance.load(run_dir), exports
    finally:
        if (run_dir / "state.json").exists() or (run_dir / "tmp" / ".model_server.pid").exists():
            main(["stop", "--run-dir", str(run_dir)])
    assert not _alive(Instance.load(run_dir).pid)
    assert not _alive(Instance.load(run_dir).health_pid)  # the health check went with the server


def post(instance, path, data, ctype="image/png", params=None, token=True, extra=None):
    headers = {"Content-Type": ctype}
    if token:
        headers["Authorization"] = f"Bearer {instance.key('inference')}"
    if params is not None:
        headers["X-Camserve-Params"] = params
    headers.update(extra or {})
    return http("POST", instance.inference_url + path, data, headers)


def worker_pids(instance, version):
    status, _, body = http("GET", f"{instance.management_url}/models/tiny/{version}",
                           headers={"Authorization": f"Bearer {instance.key('management')}"})
    assert status == 200
    return [w["pid"] for w in json.loads(body)[0]["workers"]]


def test_explanation_matches_the_cam_module(served):
    instance, exports = served
    rgb = sample_image(11, (40, 56))
    status, headers, body = post(instance, "/explanations/tiny/1.0", png_bytes(rgb), params="output=array,overlay&target=topk&topk=2")
    assert status == 200 and headers["content-type"].startswith("application/json")
    ans = answer_json(body)
    assert ans["model"]["name"] == "tiny" and ans["model"]["version"] == "1.0" and len(ans["request_id"]) > 8
    direct = direct_explanation(exports["1.0"], [decode(png_bytes(rgb), 10**6)], [cam.TopK(2)], ["gradcam"])
    probs = softmax(direct.logits[0].astype(np.float64))
    img = ans["images"][0]
    assert [p["index"] for p in img["predictions"]] == list(np.argsort(-probs)[: len(LABELS)])
    assert img["predictions"][0]["score"] == pytest.approx(probs.max(), abs=1e-5)
    assert [e["target"]["index"] for e in img["explanations"]] == direct.classes[0]
    for t, e in enumerate(img["explanations"]):
        np.testing.assert_allclose(array_of(e), direct.cams["gradcam"][0][t], atol=5e-4)
        import base64

        assert decode(base64.b64decode(e["overlay"]), 10**6).shape == rgb.shape
    assert set(ans["timings_ms"]) == {"preprocess", "inference", "cam", "encode"}


def test_predictions_route_and_legacy_query_string(served):
    instance, _ = served
    data = png_bytes(sample_image(12))
    status, _, body = post(instance, "/predictions/tiny/1.0", data)
    assert status == 200 and "explanations" not in answer_json(body)["images"][0]
    # TorchServe forwards the query string on its legacy route: the parameters apply.
    status, _, body = post(instance, "/tiny/1.0/predict?target=3&output=summary", data)
    assert status == 200, body
    exps = answer_json(body)["images"][0]["explanations"]
    assert [e["target"]["index"] for e in exps] == [3] and "summary" in exps[0] and "png" not in exps[0]


def test_multipart_request_with_json_params(served):
    instance, exports = served
    images = [sample_image(13), sample_image(14, (30, 30))]
    body, ctype = multipart([("a", "image/png", png_bytes(images[0])), ("b", "image/png", png_bytes(images[1])),
                             ("params", "application/json", json.dumps({"target": [1, 4], "output": "array"}).encode())])
    status, _, raw = post(instance, "/predictions/tiny/1.0", body, ctype)
    assert status == 200, raw
    ans = answer_json(raw)
    direct = direct_explanation(exports["1.0"], images, [[1, 4], [1, 4]], ["gradcam"])
    assert [i["field"] for i in ans["images"]] == ["a", "b"]
    for i, img in enumerate(ans["images"]):
        for t, e in enumerate(img["explanations"]):
            np.testing.assert_allclose(array_of(e), direct.cams["gradcam"][i][t], atol=5e-4)


def png_bomb(side: int = 20000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = zlib.compress(b"\x00" * (side + 1) * 8, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


BAD = {
    "empty": (b"", None, 415, "not_an_image"),
    "text": (b"this is not an image at all", None, 415, "not_an_image"),
    "truncated": ("jpeg-cut", None, 415, "not_an_image"),
    "bomb": ("bomb", None, 413, "image_too_large"),
    "method": ("good", "methods=nosuchcam", 400, "bad_parameter"),
    "class": ("good", "target=7", 400, "bad_parameter"),
    "malformed": ("good", "topk=x", 400, "bad_parameter"),
}


def bad_body(kind):
    import cv2

    if kind == "good":
        return png_bytes(sample_image(15))
    if kind == "jpeg-cut":
        return cv2.imencode(".jpg", sample_image(16))[1].tobytes()[:400]
    if kind == "bomb":
        return png_bomb()
    return kind


def test_bad_inputs_answer_4xx_and_the_worker_stays_up(served):
    instance, _ = served
    pids = worker_pids(instance, "1.0")
    for name, (kind, params, code, error_kind) in BAD.items():
        status, headers, body = post(instance, "/explanations/tiny/1.0", bad_body(kind), "application/octet-stream", params)
        assert status == code, (name, body)
        assert headers["content-type"].startswith("application/json")
        error = answer_json(body)["error"]
        assert error["kind"] == error_kind and error["message"], name
    assert "20000 x 20000" in answer_json(post(instance, "/explanations/tiny/1.0", png_bomb(), "image/png")[2])["error"]["message"]
    assert "'nosuchcam'" in answer_json(post(instance, "/explanations/tiny/1.0", bad_body("good"), params="methods=nosuchcam")[2])["error"]["message"]
    status, _, _ = post(instance, "/explanations/tiny/1.0", bad_body("good"))
    assert status == 200
    assert worker_pids(instance, "1.0") == pids  # no restart


def test_concurrent_requests_are_batched_and_bad_neighbours_fail_alone(served):
    instance, _ = served
    jobs = [("good", None)] * 4 + [(kind, params) for kind, params, _c, _k in BAD.values()]
    shared = False
    for _attempt in range(3):  # the server decides the batches; under heavy load retry the round
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: post(instance, "/explanations/tiny/1.0", bad_body(job[0]), "application/octet-stream", job[1]), jobs))
        good = [answer_json(b) for s, _, b in results[:4]]
        assert all(s == 200 for s, _, _ in results[:4])
        assert all("explanations" in g["images"][0] for g in good)
        for (status, _, body), (_kind, _p, code, kind) in zip(results[4:], BAD.values()):
            assert status == code and answer_json(body)["error"]["kind"] == kind
        # A good answer from a batch with more requests than images shared it with bad ones.
        shared = any(g["batch"]["requests"] > g["batch"]["images"] for g in good)
        if shared:
            break
    assert shared


def test_two_versions_side_by_side(served):
    instance, exports = served
    data = png_bytes(sample_image(17))
    answers = {}
    for version in ("1.0", "2.0"):
        status, _, body = post(instance, f"/predictions/tiny/{version}", data)
        assert status == 200
        answers[version] = answer_json(body)
        assert answers[version]["model"]["version"] == version
        direct = direct_explanation(exports[version], [sample_image(17)], [cam.TopK(1)], ["gradcam"])
        assert answers[version]["images"][0]["predictions"][0]["score"] == pytest.approx(softmax(direct.logits[0].astype(np.float64)).max(), abs=1e-5)
    assert answers["1.0"]["model"]["graph_sha256"] != answers["2.0"]["model"]["graph_sha256"]
    status, _, body = post(instance, "/predictions/tiny", data)  # default: the highest version
    assert status == 200 and answer_json(body)["model"]["version"] == "2.0"


def test_metrics_endpoint_counts_and_histogram_moves(served):
    instance, _ = served

    def scrape():
        status, _, body = http("GET", instance.metrics_url + "/metrics")
        assert status == 200
        return parse_prometheus(body.decode())

    def total(samples, name, **labels):
        return sum(v for (n, lab), v in samples.items() if n == name and all(dict(lab).get(k) == w for k, w in labels.items()))

    v = {"model_name": "tiny", "model_version": "2.0"}

    count = "camserve_explain_latency_seconds_count"
    per_good = ("camserve_inference_latency_seconds_count", "camserve_preprocess_latency_seconds_count",
                "camserve_batch_size_count")

    def good_counts(samples) -> list[float]:
        return [total(samples, count, method="gradcam", **v)] + [total(samples, n, **v) for n in per_good]

    def settled(at_least: float = 0, good: list[float] | None = None):
        """A scrape once ``at_least`` requests were counted and their histograms arrived
        (they leave the worker in background flushes, after the request counter): the
        request latency once per request, and the explain, inference, preprocess and
        batch-size counts up to ``good`` (:func:`good_counts` order). Each count the test
        asserts is polled for: polling for the request latency alone failed once when the
        others arrived later."""
        deadline = time.monotonic() + 30
        while True:
            samples = scrape()
            requests = total(samples, "camserve_requests_total", **v)
            latency = total(samples, "camserve_request_latency_seconds_count", **v)
            arrived = good is None or all(c >= g for c, g in zip(good_counts(samples), good))
            if (requests >= at_least and latency >= requests and arrived) or time.monotonic() > deadline:
                return samples
            time.sleep(0.2)

    before = settled()
    for _ in range(3):
        assert post(instance, "/explanations/tiny/2.0", bad_body("good"))[0] == 200
    assert post(instance, "/explanations/tiny/2.0", b"nope")[0] == 415
    after = settled(total(before, "camserve_requests_total", **v) + 4, [c + 3 for c in good_counts(before)])
    assert total(after, "camserve_requests_total", **v) - total(before, "camserve_requests_total", **v) == 4
    assert total(after, "camserve_errors_total", kind="not_an_image", **v) - total(before, "camserve_errors_total", kind="not_an_image", **v) == 1
    assert total(after, count, method="gradcam", **v) - total(before, count, method="gradcam", **v) == 3
    assert total(after, "camserve_explain_latency_seconds_sum", **v) > total(before, "camserve_explain_latency_seconds_sum", **v)
    for name in per_good:
        assert total(after, name, **v) - total(before, name, **v) == 3, name
    assert total(after, "camserve_request_latency_seconds_count", **v) - total(before, "camserve_request_latency_seconds_count", **v) == 4
    # camserve's buckets (1 ms .. 60 s; batch sizes 1 .. max_batch_size), not TorchServe's defaults
    from camserve.pipeline.metrics import LATENCY_BUCKETS, size_buckets
    from prometheus_client.utils import floatToGoString

    def les(name):
        return {dict(lab)["le"] for (n, lab), _ in after.items() if n == name and dict(lab).get("model_version") == "2.0"}

    assert les("camserve_explain_latency_seconds_bucket") <= {floatToGoString(b) for b in (*LATENCY_BUCKETS, float("inf"))}
    assert {"60.0", "+Inf"} <= les("camserve_inference_latency_seconds_bucket")
    assert les("camserve_batch_size_bucket") == {floatToGoString(b) for b in (*size_buckets(64), float("inf"))}
    assert total(after, "camserve_batch_size_bucket", le="1.0", **v) - total(before, "camserve_batch_size_bucket", le="1.0", **v) == 3


def test_safe_defaults_on_the_running_server(served):
    instance, _ = served
    conf = (instance.run_dir / "config.properties").read_text()
    for key in ("inference_address", "management_address", "metrics_address"):
        assert f"{key}=http://127.0.0.1:" in conf
    assert "grpc_inference_address=127.0.0.1" in conf and "metrics_mode=prometheus" in conf
    assert stat.S_IMODE(instance.run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((instance.run_dir / "key_file.json").stat().st_mode) == 0o600
    status, _, _ = http("GET", instance.management_url + "/models")
    assert status in (400, 401, 403)  # no token
    status, _, _ = post(instance, "/predictions/tiny/1.0", bad_body("good"), token=False)
    assert status in (400, 401, 403)
    auth = {"Authorization": f"Bearer {instance.key('management')}"}
    status, _, _ = http("POST", instance.management_url + "/models?url=http://127.0.0.1:9/x.mar", b"", auth)
    assert status == 405  # registration API off
    assert worker_pids(instance, "1.0")


def test_client_writes_overlays_and_json(served, tmp_path, capsys):
    instance, _ = served
    image = tmp_path / "sample.png"
    image.write_bytes(png_bytes(sample_image(18)))
    argv = ["explain", str(image), "--model", "tiny", "--version", "1.0", "--run-dir", str(instance.run_dir)]  # URL from the run folder
    assert main(argv + ["--target", "topk", "--topk", "2"]) == 0
    answer = json.loads((tmp_path / "sample.camserve.json").read_text())
    overlays = sorted(tmp_path.glob("sample.gradcam.*.overlay.png"))
    assert len(overlays) == 2 and all(decode(p.read_bytes(), 10**6).shape == (48, 40, 3) for p in overlays)
    assert "overlay" not in answer["images"][0]["explanations"][0]  # moved to the file
    capsys.readouterr()
    assert main(argv + ["--metrics", "drop,increase", "--output", "summary"]) == 0  # faithfulness, printed and kept
    metrics = json.loads((tmp_path / "sample.camserve.json").read_text())["images"][0]["explanations"][0]["metrics"]
    assert set(metrics) == {"drop", "increase"} and f"drop {metrics['drop']:.4g}" in capsys.readouterr().out
    (tmp_path / "bad.png").write_bytes(b"not a png")
    capsys.readouterr()
    assert main(argv[:1] + [str(tmp_path / "bad.png")] + argv[2:]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HTTP 415" in err and "bad.png" in err


def test_archive_refuses_bad_exports_and_overwrites(served, tmp_path):
    from camserve.serving.torchserve.archive import ArchiveError, build_archive

    _instance, exports = served
    with pytest.raises(ArchiveError, match="does not exist"):
        build_archive(tmp_path / "nope", name="x", version="1", model_store=tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in exports["1.0"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    graph = broken / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ArchiveError, match="sha256"):
        build_archive(broken, name="x", version="1", model_store=tmp_path)
    with pytest.raises(ArchiveError, match="model name"):
        build_archive(exports["1.0"], name="a/b", version="1", model_store=tmp_path)
    path = build_archive(exports["1.0"], name="x", version="3.1", model_store=tmp_path)
    with pytest.raises(ArchiveError, match="--force"):
        build_archive(exports["1.0"], name="x", version="3.1", model_store=tmp_path)
    import zipfile

    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        meta = json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]
        config = zf.read("model-config.yaml").decode()
    assert {"model.onnx", "manifest.json", "camserve_handler.py", "model-config.yaml"} <= names
    assert meta["modelVersion"] == "3.1" and "batchSize: 8" in config


def test_concurrent_good_requests_share_one_model_call(served):
    instance, exports = served
    images = [sample_image(30 + i) for i in range(8)]
    direct = direct_explanation(exports["1.0"], images, [cam.TopK(1)] * 8, ["gradcam"])
    batched = False
    for _attempt in range(3):
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda img: post(instance, "/explanations/tiny/1.0", png_bytes(img), params="output=array"), images))
        for i, (status, _, body) in enumerate(results):
            assert status == 200
            e = answer_json(body)["images"][0]["explanations"][0]
            assert e["target"]["index"] == direct.classes[i][0]
            np.testing.assert_allclose(array_of(e), direct.cams["gradcam"][i][0], atol=5e-4)
        batched = any(answer_json(b)["batch"]["images"] > 1 for _, _, b in results)
        if batched:
            break
    assert batched


def audit_records(instance):
    """The served instance's audit records (SQLite sink in the run folder, the default)."""
    from camserve.audit import SinkError, open_sink
    from camserve.config import AuditConfig

    sink = open_sink(AuditConfig(path=str(instance.run_dir / "audit")))
    try:
        return [row.record() for row in sink.rows()]
    except SinkError:
        return []
    finally:
        sink.close()


def test_oversized_body_gets_the_json_413_and_an_audit_record(served):
    """Bodies over limits.max_body_bytes reach the handler (the frontend's ceiling is higher)."""
    import os
    import time

    from camserve.config import Config

    instance, _ = served
    config = Config()
    limit, ceiling = config.limits.max_body_bytes, config.frontend_max_request_bytes
    assert f"max_request_size={ceiling}" in (instance.run_dir / "config.properties").read_text()
    status, headers, body = post(instance, "/predictions/tiny/1.0", os.urandom(9_000_000), "application/octet-stream")
    assert status == 413 and headers.get("content-type", "").startswith("application/json"), (status, headers, body[:200])
    answer = json.loads(body)
    assert answer["error"]["kind"] == "body_too_large" and f"limit of {limit}" in answer["error"]["message"]
    deadline = time.monotonic() + 30
    while not any(r.get("request_id") == answer["request_id"] for r in audit_records(instance)):
        assert time.monotonic() < deadline, "no audit record for the refused body"
        time.sleep(0.2)
    (record,) = [r for r in audit_records(instance) if r.get("request_id") == answer["request_id"]]
    assert record["outcome"] == "body_too_large" and record["status"] == 413
    # above the frontend's own ceiling TorchServe refuses before any worker sees the body (documented)
    # (it answers an empty 413 and closes the connection, often before the client finished sending)
    import urllib.error

    try:
        status, _, body = post(instance, "/predictions/tiny/1.0", os.urandom(ceiling + 1024), "application/octet-stream")
        assert status == 413 and body == b""
    except urllib.error.URLError as exc:
        assert isinstance(exc.reason, ConnectionError), exc
    assert post(instance, "/predictions/tiny/1.0", bad_body("good"))[0] == 200


def test_health_check_needs_no_token_and_reveals_nothing(served):
    instance, _ = served
    assert instance.health_url and instance.health_url != instance.inference_url
    status, _, _ = http("GET", instance.inference_url + "/ping")
    assert status == 400  # TorchServe's own /ping wants the inference key (InvalidKeyException)
    for path, answer in (("/ping", "Healthy"), ("/ready", "Ready")):
        status, headers, body = http("GET", instance.health_url + path)
        assert status == 200 and json.loads(body) == {"status": answer}, (path, status, body)
        assert "python" not in headers.get("server", "").lower() and "tiny" not in body.decode()
    assert http("GET", instance.health_url + "/models")[0] == 404
    assert http("POST", instance.health_url + "/ping", b"x")[0] == 405


def test_health_check_reports_a_server_that_is_gone(tmp_path):
    """Unit check of the health handler: a frontend that does not answer is Unhealthy/NotReady (503)."""
    import threading
    from http.server import ThreadingHTTPServer

    from camserve.serving.torchserve.health import Checks, make_handler
    from camserve.serving.torchserve.server import Instance, free_port

    dead = f"http://127.0.0.1:{free_port()}"
    Instance(run_dir=tmp_path, inference_url=dead, management_url=dead, metrics_url=dead, models={"m": ["1.0"]}).save()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(Checks(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert http("GET", url + "/ping")[:1] == (503,) and json.loads(http("GET", url + "/ping")[2]) == {"status": "Unhealthy"}
        assert http("GET", url + "/ready")[0] == 503
    finally:
        httpd.shutdown()
