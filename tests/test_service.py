"""The request pipeline in-process: answers equal the CAM module, errors stay per request."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _server_fixture import LABELS, array_of, direct_explanation, png_bytes, sample_image, softmax, tiny_export
from camserve import cam
from camserve.config import Limits
from camserve.pipeline.imageio import decode
from camserve.pipeline.runtime import GraphSession
from camserve.pipeline.request import Request, header_source, split_fields
from camserve.pipeline.service import Service


class Counting:
    """Wraps cam.explain to count calls (one per batch of alike requests is the contract)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, session, images, *args, **kwargs):
        self.calls.append(len(images))
        return cam.explain(session, images, *args, **kwargs)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def session(export_dir):
    return GraphSession(export_dir, intra_op_threads=1)


def answers(service, requests):
    return [(r.status, json.loads(r.body)) for r in service.handle(requests)]


def test_answer_matches_the_cam_module_run_directly(export_dir, session):
    counter = Counting()
    service = Service(session, explain=counter)
    images = [sample_image(1), sample_image(2, (64, 30))]
    reqs = [
        Request({"body": png_bytes(images[0])}, "a", explain_route=True, header_params="output=array,png&target=topk&topk=2&methods=gradcam,layercam"),
        Request({"body": png_bytes(images[1])}, "b", header_params='{"output": "array", "target": "topk", "topk": 2, "methods": ["gradcam", "layercam"]}'),
    ]
    (s0, a0), (s1, a1) = answers(service, reqs)
    assert s0 == s1 == 200 and counter.calls == [2]  # one CAM call for the batch
    direct = direct_explanation(export_dir, images, [cam.TopK(2)] * 2, ["gradcam", "layercam"])
    for i, ans in enumerate((a0, a1)):
        assert ans["schema"] == "camserve/1" and ans["request_id"] == "ab"[i]
        assert ans["model"] == {"name": "tiny", "version": "1.0", "graph_sha256": session.manifest.graph_sha256}
        img = ans["images"][0]
        assert (img["height"], img["width"]) == images[i].shape[:2]
        probs = softmax(direct.logits[i].astype(np.float64))
        top = img["predictions"][0]
        assert top["index"] == int(np.argmax(probs)) and top["label"] == LABELS[top["index"]]
        assert top["score"] == pytest.approx(probs.max(), abs=1e-5)
        exps = img["explanations"]
        assert [(e["method"], e["target"]["index"]) for e in exps] == [
            (m, c) for m in ("gradcam", "layercam") for c in direct.classes[i]
        ]
        for e in exps:
            t = direct.classes[i].index(e["target"]["index"])
            expected = direct.cams[e["method"]][i][t]
            np.testing.assert_allclose(array_of(e), expected, atol=5e-4)  # float16 transport
            assert ("png" in e) == (i == 0)  # only the first asked for png
            assert set(e["summary"]) >= {"peak", "box", "box_mass", "entropy_bits"}
        assert set(ans["timings_ms"]) == {"preprocess", "inference", "cam", "encode"}
        assert ans["batch"] == {"requests": 2, "images": 2}


def test_bad_requests_fail_alone_and_neighbours_get_answers(session):
    counter = Counting()
    service = Service(session, limits=Limits(max_pixels=100_000, max_images_per_request=2), explain=counter)
    good = png_bytes(sample_image(3))
    jpeg_cut = __import__("cv2").imencode(".jpg", sample_image(4))[1].tobytes()[:300]
    bad = {
        "empty": ({"body": b""}, None, 415, "not_an_image", "empty"),
        "text": ({"body": b"definitely not an image"}, None, 415, "not_an_image", "not a JPEG, PNG"),
        "truncated": ({"body": jpeg_cut}, None, 415, "not_an_image", "JPEG"),
        "bomb": ({"body": png_bytes(np.zeros((400, 400, 3), np.uint8))}, None, 413, "image_too_large", "400 x 400"),
        "method": ({"body": good}, "methods=nosuchcam", 400, "bad_parameter", "nosuchcam"),
        "class": ({"body": good}, "target=5", 400, "bad_parameter", "class index 5 is out of range"),
        "malformed": ({"body": good}, "topk=three", 400, "bad_parameter", "topk='three'"),
        "header": ({"body": good}, "{not json", 400, "bad_parameter", "not valid JSON"),
        "typo": ({"body": good, "methdos": b"gradcam"}, None, 400, "unknown_parameter", "methdos"),
        "ablation": ({"body": good}, "methods=ablationcam", 400, "bad_parameter", "needs the head graph"),
        "many": ({"a": good, "b": good, "c": good}, None, 413, "too_many_images", "3 images"),
    }
    reqs = [Request({"body": good}, "good-0", True)]
    for name, (fields, hdr, *_rest) in bad.items():
        reqs.append(Request(fields, name, True, hdr))
    reqs.append(Request({"body": good}, "good-1", True))
    out = answers(service, reqs)
    assert out[0][0] == out[-1][0] == 200 and "explanations" in out[0][1]["images"][0]
    for (status, body), (name, (_f, _h, code, kind, words)) in zip(out[1:-1], bad.items()):
        assert status == code, (name, body)
        assert body["error"]["kind"] == kind and words in body["error"]["message"], (name, body)
        assert body["request_id"] == name
    assert counter.calls == [2]  # the bad ones dropped out before the model ran


def test_predictions_only_and_mixed_groups(session):
    counter = Counting()
    service = Service(session, explain=counter)
    img = png_bytes(sample_image(5))
    out = answers(service, [Request({"body": img}, "p"), Request({"body": img}, "e", True), Request({"body": img}, "s", False, "eigen_smooth=true")])
    assert [s for s, _ in out] == [200, 200, 200]
    assert "explanations" not in out[0][1]["images"][0]
    assert out[1][1]["images"][0]["explanations"][0]["png"]
    assert counter.calls == [1, 1]  # different options: one call per group
    p0 = [p["score"] for p in out[0][1]["images"][0]["predictions"]]
    assert p0 == [p["score"] for p in out[1][1]["images"][0]["predictions"]]
    assert sum(p0) <= 1.0 + 1e-6 and len(p0) == len(LABELS)


def test_overlay_output_is_a_png_of_the_input_size(session):
    import base64

    service = Service(session)
    rgb = sample_image(6, (50, 70))
    status, body = answers(service, [Request({"body": png_bytes(rgb)}, "o", True, "output=overlay")])[0]
    assert status == 200
    overlay = decode(base64.b64decode(body["images"][0]["explanations"][0]["overlay"]), 10**6)
    assert overlay.shape == rgb.shape
    assert body["images"][0]["explanations"][0]["summary"]["peak"] is not None


def test_multipart_fields_and_json_params(session):
    service = Service(session)
    a, b = png_bytes(sample_image(7)), png_bytes(sample_image(8))
    status, body = answers(service, [Request({"first": a, "second": b, "params": {"target": [1, 3], "output": "summary"}}, "m", False)])[0]
    assert status == 200
    assert [i["field"] for i in body["images"]] == ["first", "second"]
    for img in body["images"]:
        assert [e["target"]["index"] for e in img["explanations"]] == [1, 3]
        assert "png" not in img["explanations"][0] and "summary" in img["explanations"][0]


def test_split_fields_and_header_parsing():
    images, query, js = split_fields({"body": b"\x89PNG...", "methods": b"gradcam", "params": b"{}", "model_name": b"tiny"})
    assert [n for n, _ in images] == ["body"] and query == {"methods": b"gradcam"} and js == b"{}"
    assert header_source("methods=gradcam%2Clayercam&topk=2") == {"methods": "gradcam,layercam", "topk": "2"}
    assert header_source('{"topk": 2}') == {"topk": 2}
    assert header_source(None) is None and header_source("  ") is None


def test_random_bytes_never_escape_as_exceptions(session):
    rng = np.random.default_rng(0)
    service = Service(session)
    good = png_bytes(sample_image(9))
    reqs = []
    for i in range(40):
        data = bytearray(good)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 20))):
            data[pos] = int(rng.integers(0, 256))
        if i % 3 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        reqs.append(Request({"body": bytes(data)}, str(i), True))
    for response in service.handle(reqs):
        assert response.status in (200, 400, 413, 415)
        body = json.loads(response.body)
        assert ("images" in body) == (response.status == 200)


def test_audit_hook_gets_one_record_per_request_and_can_refuse(session):
    import hashlib

    from camserve.errors import CamserveError

    records = []
    service = Service(session, hooks=[records.append])
    good = png_bytes(sample_image(10, (36, 44)))
    out = answers(service, [Request({"body": good}, "ok", True), Request({"body": b"junk"}, "bad", True)])
    assert [s for s, _ in out] == [200, 415]
    ok, bad = records
    assert ok["request_id"] == "ok" and ok["outcome"] == "answered" and ok["status"] == 200
    assert ok["input_sha256"] == [hashlib.sha256(good).hexdigest()] and ok["image_sizes"] == [[44, 36]]
    assert ok["images"][0]["explanations"][0]["summary"] == out[0][1]["images"][0]["explanations"][0]["summary"]
    assert "png" not in ok["images"][0]["explanations"][0]
    assert bad["outcome"] == "not_an_image" and bad["status"] == 415 and "error" in bad

    class SinkDown(CamserveError):
        kind, status = "audit_unavailable", 503

    def refuse(record):
        raise SinkDown("audit sink unavailable (fail-closed)")

    status, body = answers(Service(session, hooks=[refuse]), [Request({"body": good}, "x", True)])[0]
    assert status == 503 and body["error"]["kind"] == "audit_unavailable"


def test_smoothing_flags_reach_the_cam_module(export_dir, session):
    service = Service(session)
    rgb = sample_image(19)
    status, body = answers(service, [Request({"body": png_bytes(rgb)}, "s", True, "aug_smooth=true&eigen_smooth=true&output=array&methods=gradcam")])[0]
    assert status == 200
    from camserve.pipeline import imageio

    m = session.manifest
    batch = imageio.preprocess([rgb], m.input_size, m.mean, m.std, m.channel_order)
    direct = cam.explain(session, batch, [cam.TopK(1)], ["gradcam"], eigen_smooth=True, aug_smooth=True)
    plain = cam.explain(session, batch, [cam.TopK(1)], ["gradcam"])
    got = array_of(body["images"][0]["explanations"][0])
    np.testing.assert_allclose(got, direct.cams["gradcam"][0][0], atol=5e-4)
    assert np.abs(got - plain.cams["gradcam"][0][0]).max() > 1e-2  # the flags changed the map
