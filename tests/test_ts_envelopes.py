"""camserve on KServe's TorchServe runtime: ``camserve archive --kserve-layout`` + request envelopes.

The layout is written by the CLI, then TorchServe is started the way KServe's runtime starts
it (``torchserve --start --model-store .../model-store --ts-config .../config.properties``,
``TS_SERVICE_ENVELOPE`` in the environment). The only edits to the written properties are the
ones a pod does not need: ``/mnt/models`` becomes the local folder and the 0.0.0.0 ports
become free ports on 127.0.0.1. Answers must equal the pipeline's own for the same images.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from _server_fixture import http, png_bytes, sample_image, tiny_export

pytestmark = pytest.mark.server
PARAMS = {"methods": "gradcam,layercam", "target": "topk", "topk": 2, "output": "summary,array"}


def start_layout(layout: Path, run: Path, envelope: str) -> dict:
    """TorchServe on a copy of ``layout`` with ``TS_SERVICE_ENVELOPE=envelope``; returns its URLs."""
    from camserve.serving.torchserve.java import find_java
    from camserve.serving.torchserve.kserve_layout import MOUNT, PORTS
    from camserve.serving.torchserve.server import free_port

    shutil.copytree(layout, run / "models")
    props = run / "models" / "config" / "config.properties"
    text = props.read_text().replace(MOUNT, str(run / "models"))
    ports = {name: free_port() for name in PORTS}
    for name, port in PORTS.items():
        text = text.replace(f"0.0.0.0:{port}", f"127.0.0.1:{ports[name]}").replace(f"_port={port}\n", f"_port={ports[name]}\n")
    text = text.replace("_address=0.0.0.0", "_address=127.0.0.1")
    assert "0.0.0.0" not in text
    props.write_text(text + f"vmargs=-Xmx512m -XX:-UsePerfData -Djava.io.tmpdir={run / 'tmp'}\n")
    for sub in ("tmp", "logs"):
        (run / sub).mkdir()
    java = find_java()
    env = {**os.environ, "TS_SERVICE_ENVELOPE": envelope, "JAVA_HOME": str(Path(java).resolve().parent.parent),
           "TMPDIR": str(run / "tmp"), "TEMP": str(run / "tmp"), "LOG_LOCATION": str(run / "logs"),
           "METRICS_LOCATION": str(run / "logs"), "ORT_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
           "CAMSERVE_AUDIT_PATH": str(run / "audit"), "CAMSERVE_RUNTIME_ORT_THREADS": "1"}
    torchserve = Path(sys.executable).parent / "torchserve"
    log = open(run / "logs" / "console.log", "ab")
    proc = subprocess.Popen([str(torchserve), "--start", "--foreground", "--ncs", "--model-store", str(run / "models" / "model-store"),
                             "--ts-config", str(props)], cwd=run, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    urls = {"inference": f"http://127.0.0.1:{ports['inference']}", "management": f"http://127.0.0.1:{ports['management']}",
            "metrics": f"http://127.0.0.1:{ports['metrics']}", "proc": proc, "log": log, "run": run}
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status, _, body = http("GET", f"{urls['management']}/models/tiny", timeout=5)
        except OSError:  # not listening yet
            status = 0
        if status == 200 and any(w.get("status") == "READY" for w in json.loads(body)[0].get("workers", [])):
            return urls
        time.sleep(0.5)
    stop_layout(urls)
    raise AssertionError(f"TorchServe did not get ready: {(run / 'logs' / 'console.log').read_text()[-2000:]}")


def stop_layout(urls: dict) -> None:
    try:
        os.killpg(urls["proc"].pid, signal.SIGTERM)
        urls["proc"].wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(urls["proc"].pid, signal.SIGKILL)
    urls["log"].close()


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    from camserve.cli import main

    export = tiny_export(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("layout")
    assert main(["archive", str(export), "--name", "tiny", "--version", "1.0", "--kserve-layout", str(out)]) == 0
    return export, out


@pytest.fixture(scope="module", params=["kserve", "kservev2"])
def served(request, layout, tmp_path_factory):
    export, out = layout
    urls = start_layout(out, tmp_path_factory.mktemp(f"ts_{request.param}"), request.param)
    try:
        yield request.param, export, urls
    finally:
        stop_layout(urls)


def test_layout_holds_what_kserves_runtime_reads(layout):
    from camserve.cli import main

    _, out = layout
    text = (out / "config" / "config.properties").read_text()
    props = dict(line.split("=", 1) for line in text.splitlines())
    assert props["enable_envvars_config"] == "true" and props["model_store"] == "/mnt/models/model-store"
    assert props["inference_address"] == "http://0.0.0.0:8085" and props["metrics_mode"] == "prometheus"
    snapshot = json.loads(props["model_snapshot"])
    assert snapshot["models"]["tiny"]["1.0"]["batchSize"] == 1 and snapshot["models"]["tiny"]["1.0"]["marName"] == "tiny.mar"
    assert (out / "model-store" / "tiny.mar").is_file() and (out / "config" / "metrics.yaml").is_file()
    # options that would contradict the layout are refused with a one-line error, exit 2
    assert main(["archive", "x", "--name", "tiny", "--kserve-layout", str(out), "--batch-size", "8"]) == 2


def reference(export: Path, bodies: list[bytes], params: dict, explain: bool = True) -> list[dict]:
    """The pipeline's own answer for these images, in this process (no server)."""
    from camserve.pipeline.request import Request
    from camserve.pipeline.runtime import GraphSession
    from camserve.pipeline.service import Service

    service = Service(GraphSession(export, intra_op_threads=1), name="tiny", version="1.0")
    (response,) = service.handle([Request({f"image_{i}": b for i, b in enumerate(bodies)}, explain_route=explain,
                                          header_params=json.dumps(params), images_only=True)])
    return json.loads(response.body)["images"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(urls: dict, path: str, payload: dict, headers: dict | None = None) -> tuple[int, dict]:
    status, _, body = http("POST", urls["inference"] + path, json.dumps(payload).encode(),
                           {"Content-Type": "application/json", **(headers or {})})
    return status, json.loads(body)


def v2_inputs(bodies: list[bytes], params: dict | None = None) -> list[dict]:
    inputs = [{"name": f"image_{i}", "datatype": "BYTES", "shape": [1], "data": [b64(b)]} for i, b in enumerate(bodies)]
    return inputs + ([{"name": "parameters", "datatype": "BYTES", "shape": [1], "data": [json.dumps(params)]}] if params else [])


def test_answers_equal_the_pipelines(served):
    envelope, export, urls = served
    bodies = [png_bytes(sample_image(60 + i)) for i in range(2)]
    expected = reference(export, bodies, PARAMS)
    if envelope == "kserve":
        instances = [{"image": {"b64": b64(bodies[0])}}, {"data": b64(bodies[1])}]  # camserve's and KServe's sample form
        status, answer = post(urls, "/v1/models/tiny:explain", {"instances": instances, "parameters": PARAMS})
        assert status == 200, answer
        assert answer == {"explanations": expected}
        status, answer = post(urls, "/v1/models/tiny:predict", {"instances": instances[:1]})
        (prediction,) = answer["predictions"]
        assert status == 200 and prediction["predictions"] and "explanations" not in prediction
        return
    import tritonclient.http as triton

    client = triton.InferenceServerClient(urls["inference"].removeprefix("http://"))
    inputs = []
    for inp in v2_inputs(bodies, PARAMS):
        tensor = triton.InferInput(inp["name"], [1], "BYTES")
        tensor.set_data_from_numpy(__import__("numpy").array(inp["data"], dtype=object), binary_data=False)
        inputs.append(tensor)
    result = client.infer("tiny", inputs, request_id=str(uuid.uuid4()),
                          outputs=[triton.InferRequestedOutput(i.name(), binary_data=False) for i in inputs])
    got = [json.loads(result.as_numpy(f"image_{i}")[0]) for i in range(2)]
    assert got == expected
    request_level = json.loads(result.as_numpy("parameters")[0])
    assert request_level["model"]["name"] == "tiny" and request_level["batch"]["images"] == 2


def audit_records(run: Path) -> list[dict]:
    from camserve.audit import open_sink
    from camserve.config import AuditConfig

    sink = open_sink(AuditConfig(path=str(run / "audit")))
    try:
        return [r.record() for r in sink.rows()]
    finally:
        sink.close()


def test_bad_input_is_a_4xx_naming_the_problem_and_audited(served):
    envelope, _export, urls = served
    good = b64(png_bytes(sample_image(70)))
    if envelope == "kserve":
        cases = {
            "broken base64": ({"instances": [{"image": {"b64": "%%%"}}]}, 400, "not valid base64"),
            "no image": ({"instances": [{"colour": "red"}]}, 400, "has no image"),
            "not an image": ({"instances": [{"data": b64(b"hello")}]}, 415, "image"),
            "unknown parameter": ({"instances": [{"data": good}], "parameters": {"colour": "red"}}, 400, "unknown parameter 'colour'"),
            "no instances": ({"inputs": []}, 400, "'instances'"),
        }
        path, good_body = "/v1/models/tiny:predict", {"instances": [{"data": good}]}
    else:
        image = {"name": "image_0", "datatype": "BYTES", "shape": [1], "data": [good]}
        cases = {
            "wrong datatype": ({"inputs": [{"name": "image_0", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 400, "datatype FP32"),
            "broken base64": ({"inputs": [{**image, "data": ["%%%"]}]}, 400, "not valid base64"),
            "not an image": ({"inputs": [{**image, "data": [b64(b"hello")]}]}, 415, "image"),
            "unknown parameter": ({"inputs": v2_inputs([b"x"], {"colour": "red"})[1:] + [image]}, 400, "unknown parameter 'colour'"),
            "parameters only": ({"inputs": v2_inputs([b"x"], {"methods": "gradcam"})[1:]}, 400, "no image input"),
        }
        path, good_body = "/v2/models/tiny/infer", {"inputs": [image]}
    before = len(audit_records(urls["run"]))
    for what, (payload, expected, words) in cases.items():
        status, answer = post(urls, path, payload)
        assert status == expected, (what, status, answer)
        errors = answer["predictions"] if envelope == "kserve" else [json.loads(o["data"][0]) for o in answer["outputs"]]
        assert all(e["error"]["status"] == expected and words in e["error"]["message"] for e in errors), (what, errors)
        status, answer = post(urls, path, good_body)
        assert status == 200, (what, answer)  # the worker keeps serving
    deadline = time.monotonic() + 30
    while len(records := audit_records(urls["run"])[before:]) < 2 * len(cases) and time.monotonic() < deadline:
        time.sleep(0.3)
    refused = [r for r in records if r["outcome"] != "answered"]
    assert len(refused) == len(cases) and len(records) == 2 * len(cases)


def test_metrics_are_camserves(served):
    from camserve.pipeline.metrics import parse_prometheus

    _, _, urls = served
    deadline = time.monotonic() + 30
    while True:
        status, _, text = http("GET", f"{urls['metrics']}/metrics")
        samples = parse_prometheus(text.decode()) if status == 200 else []
        counted = any(n == "camserve_requests_total" and dict(lab).get("model_name") == "tiny" for n, lab in samples)
        if counted and any(n == "camserve_request_latency_seconds_count" for n, _ in samples):
            break  # histograms leave the worker in a flush once a second
        assert time.monotonic() < deadline, (status, text[:500])
        time.sleep(0.3)
