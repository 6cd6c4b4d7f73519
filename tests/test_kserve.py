"""camserve on KServe's own model server, started for real on 127.0.0.1, beside a real TorchServe.

The same tiny model is served by both; v2 requests go through clients nobody here wrote
(tritonclient's ``InferenceServerClient`` and kserve's ``InferenceRESTClient``), v1 through
plain HTTP. Answers must equal the TorchServe answers for the same images and parameters,
metrics must carry the dashboard's names on both servers, bad input must be a 4xx JSON
refusal that is audited while the server keeps serving.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from _server_fixture import http, multipart, png_bytes, sample_image, tiny_export
from camserve.config import PORT_FIELDS

if importlib.util.find_spec("kserve") is None:  # not imported here: kserve parses the command line at import
    pytest.skip("camserve[kserve] is not installed", allow_module_level=True)
pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"methods": "gradcam,layercam", "target": "topk", "topk": 2, "output": "summary,array"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(KServe state, TorchServe instance): the tiny model on both, always stopped afterwards."""
    from camserve.cli import kserve as kserve_cli
    from camserve.serving.torchserve import server
    from camserve.serving.torchserve.archive import build_archive
    from camserve.config import load_config

    export = tiny_export(tmp_path_factory.getbasetemp())
    store = tmp_path_factory.mktemp("store")
    build_archive(export, name="tiny", version="1.0", model_store=store)
    ks_run, ts_run = tmp_path_factory.mktemp("ks_run"), tmp_path_factory.mktemp("ts_run")
    try:
        state = kserve_cli.start([str(export)], run_dir=ks_run, http_port=0, grpc_port=0)
        config = load_config(env={}, overrides={"server": {p: 0 for p in PORT_FIELDS}, "runtime": {"ort_threads": 1}})
        instance = server.start(config, run_dir=ts_run, model_store=store)
        yield state, instance
    finally:
        kserve_cli.stop(ks_run)
        if (ts_run / "state.json").is_file():
            server.stop(ts_run)


def images(n: int = 2) -> list[bytes]:
    return [png_bytes(sample_image(40 + i)) for i in range(n)]


def torchserve_answer(instance, bodies: list[bytes], params: dict) -> dict:
    """The TorchServe answer for the same images as multipart parts image_0..image_{n-1}."""
    data, ctype = multipart([(f"image_{i}", "image/png", b) for i, b in enumerate(bodies)])
    status, _, body = http("POST", f"{instance.inference_url}/explanations/tiny", data,
                           {"Content-Type": ctype, "X-Camserve-Params": json.dumps(params),
                            "Authorization": f"Bearer {instance.key('inference')}"})
    assert status == 200, body[:300]
    return json.loads(body)


def test_v2_tritonclient_answers_equal_torchserve(servers):
    import tritonclient.http as triton

    state, instance = servers
    bodies = images(2)
    client = triton.InferenceServerClient(state["url"].removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
        inp = triton.InferInput("image", [2], "BYTES")
        inp.set_data_from_numpy(np.array([base64.b64encode(b) for b in bodies], dtype=np.object_))
        outputs = [triton.InferRequestedOutput(name, binary_data=True) for name in ("answer", "cam_gradcam", "cam_layercam")]
        result = client.infer("tiny", [inp], outputs=outputs, parameters=PARAMS, request_id="t-1")
    finally:
        client.close()
    answers = [json.loads(a) for a in result.as_numpy("answer")]
    reference = torchserve_answer(instance, bodies, PARAMS)
    assert answers == reference["images"]  # same pipeline, same answer (images[i] holds no request id or timing)
    for method in ("gradcam", "layercam"):
        cams = result.as_numpy(f"cam_{method}")
        assert cams.dtype == np.float32 and cams.shape == (2, 2, 32, 32)
        for i, image in enumerate(reference["images"]):
            entries = [e for e in image["explanations"] if e["method"] == method]
            from camserve.pipeline.render import from_float16

            ts = np.stack([from_float16(e["array"])[0] for e in entries])
            np.testing.assert_allclose(cams[i], ts, atol=1e-3)  # TorchServe's array is float16


def test_v2_kserve_client_and_metadata(servers):
    import asyncio

    state, _ = servers
    argv, sys.argv = sys.argv, [sys.argv[0]]  # kserve parses the command line at import
    try:
        from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    finally:
        sys.argv = argv
    body = images(1)[0]

    async def call():
        request = InferRequest(model_name="tiny", request_id="k-1", parameters={"methods": "gradcam", "output": "summary"},
                               infer_inputs=[InferInput("image", [1], "BYTES", data=[base64.b64encode(body).decode()])])
        async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=60)) as client:
            return await client.infer(state["url"], request, model_name="tiny")

    response = asyncio.run(call())
    (answer,) = [json.loads(a) for a in response.get_output_by_name("answer").as_numpy()]
    assert answer["explanations"][0]["method"] == "gradcam" and answer["predictions"]
    status, _, meta = http("GET", f"{state['url']}/v2/models/tiny")
    meta = json.loads(meta)
    assert status == 200 and meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    names = {o["name"]: o for o in meta["outputs"]}
    # truthful: no output for a method this export cannot answer (no extra graphs, no head graph)
    assert "cam_fullgrad" not in names and "cam_dff" not in names and "cam_ablationcam" not in names
    assert names["answer"]["datatype"] == "BYTES" and names["cam_gradcam"] == {"name": "cam_gradcam", "datatype": "FP32",
                                                                              "shape": [-1, -1, 32, 32]}


def test_v1_predict_and_explain(servers):
    state, instance = servers
    bodies = images(2)
    payload = {"instances": [{"image": {"b64": base64.b64encode(b).decode()}} for b in bodies], "parameters": PARAMS}
    status, _, body = http("POST", f"{state['url']}/v1/models/tiny:explain", json.dumps(payload).encode(),
                           {"Content-Type": "application/json"})
    assert status == 200, body[:300]
    assert json.loads(body)["explanations"] == torchserve_answer(instance, bodies, PARAMS)["images"]
    status, _, body = http("POST", f"{state['url']}/v1/models/tiny:predict",
                           json.dumps({"instances": payload["instances"][:1]}).encode(), {"Content-Type": "application/json"})
    (prediction,) = json.loads(body)["predictions"]
    assert status == 200 and prediction["predictions"] and "explanations" not in prediction


def test_health_routes_need_no_token(servers):
    state, _ = servers
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/tiny/ready"):
        status, _, body = http("GET", state["url"] + path)
        assert status == 200, (path, body)


def v2_body(inputs: list[dict], parameters: dict | None = None) -> bytes:
    return json.dumps({"id": str(uuid.uuid4()), "inputs": inputs, **({"parameters": parameters} if parameters else {})}).encode()


def image_input(values: list, datatype: str = "BYTES", shape: list | None = None) -> dict:
    return {"name": "image", "datatype": datatype, "shape": shape or [len(values)], "data": values}


def test_bad_input_is_a_4xx_json_refusal_audited_and_the_server_stays_up(servers):
    from camserve.audit import open_sink
    from camserve.config import AuditConfig

    state, _ = servers
    good = base64.b64encode(images(1)[0]).decode()
    cases = {
        "wrong datatype": (v2_body([image_input([1.0], "FP32")]), 400, "datatype FP32"),
        "wrong shape": (v2_body([image_input([good], shape=[2])]), 400, "shape [2]"),
        "unknown input": (v2_body([{"name": "other", "datatype": "BYTES", "shape": [1], "data": [good]}]), 400, "unknown input"),
        "broken base64": (v2_body([image_input(["%%%not base64"])]), 400, "not valid base64"),
        "not an image": (v2_body([image_input([base64.b64encode(b"hello, not an image").decode()])]), 415, "image"),
        "unknown parameter": (v2_body([image_input([good])], {"colour": "red"}), 400, "unknown parameter 'colour'"),
        "oversized body": (v2_body([image_input([base64.b64encode(b"\x89PNG" + b"\0" * 9_000_000).decode()])]), 413, "limit"),
    }
    sink = open_sink(AuditConfig(path=str(Path(state["run_dir"]) / "audit")))
    try:
        before = len(list(sink.rows()))
    except Exception:  # noqa: BLE001 - no log yet
        before = 0
    for what, (body, expected, words) in cases.items():
        status, headers, answer = http("POST", f"{state['url']}/v2/models/tiny/infer", body, {"Content-Type": "application/json"})
        assert status == expected, (what, status, answer[:300])
        error = json.loads(answer)
        assert isinstance(error["error"], str) and words in error["error"] and error["kind"], (what, error)
        ok = http("POST", f"{state['url']}/v2/models/tiny/infer", v2_body([image_input([good])]), {"Content-Type": "application/json"})
        assert ok[0] == 200, (what, ok[2][:300])  # the server keeps serving
    records = [r.record() for r in sink.rows()][before:]
    sink.close()
    refused = [r for r in records if r["outcome"] != "answered"]
    assert len(refused) == len(cases) and len(records) == 2 * len(cases)
    assert {r["status"] for r in refused} == {400, 413, 415}


def test_metrics_carry_the_dashboards_names_on_both_servers(servers):
    import time

    from camserve.pipeline.metrics import parse_prometheus

    state, instance = servers
    shown = json.loads((ROOT / "grafana" / "camserve-dashboard.json").read_text())
    series = set(re.findall(r"\bcamserve_[a-z_]+", " ".join(t["expr"] for p in shown["panels"] for t in p["targets"])))
    series -= {"camserve_degenerate_maps_total"}  # only once a degenerate map was served
    series -= {"camserve_faithfulness_samples_total"}  # only with metrics.sample_rate > 0
    asked = {"methods": "gradcam", "metrics": "drop,road"}  # camserve_faithfulness, on both servers
    ts_answer = torchserve_answer(instance, images(1), asked)
    payload = {"instances": [{"image": {"b64": base64.b64encode(images(1)[0]).decode()}}], "parameters": asked}
    status, _, body = http("POST", f"{state['url']}/v1/models/tiny:explain", json.dumps(payload).encode(),
                           {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["explanations"] == ts_answer["images"]  # the same scores too
    assert set(ts_answer["images"][0]["explanations"][0]["metrics"]) == {"drop", "road", "road_morf", "road_lerf"}
    status, _, _ = http("POST", f"{instance.inference_url}/predictions/tiny", b"nope",  # an error counted too
                        {"Content-Type": "image/png", "Authorization": f"Bearer {instance.key('inference')}"})
    assert status == 415
    for url in (f"{state['url']}/metrics", f"{instance.metrics_url}/metrics"):
        deadline = time.monotonic() + 30  # histograms leave the worker in a flush once a second
        while True:
            status, _, text = http("GET", url)
            names = {name for name, _ in parse_prometheus(text.decode())}
            if series <= names or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert status == 200 and series <= names, (url, series - names)
        samples = parse_prometheus(text.decode())
        assert any(n == "camserve_requests_total" and dict(lab).get("model_name") == "tiny" for n, lab in samples)
