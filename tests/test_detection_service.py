"""Issue 15, detection through the request pipeline, a real TorchServe and the KServe model:
detections (boxes in the sent image's pixels) as predictions, one EigenCAM map renormalized
in their boxes, an overlay with the boxes drawn; what a detector cannot do is a 400."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from _detection_fixture import exported_detector
from _server_fixture import array_of, png_bytes
from camserve.demo import shapes
from camserve.pipeline import detection, imageio
from camserve.pipeline.render import decode_image
from camserve.pipeline.request import Request
from camserve.pipeline.service import Service


@pytest.fixture(scope="module")
def export():
    return exported_detector()[0]


@pytest.fixture(scope="module")
def service(export):
    return Service(detection.DetectionSession(export, intra_op_threads=1))


def scene(seed: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A held-out shapes image at ``size`` px (the graph takes 64: the pipeline resizes) and its box."""
    import cv2

    data = shapes.make_shapes(1, shapes.HELDOUT_SEED_OFFSET + 100 + seed, 64)
    return cv2.resize(data.images[0], (size, size), interpolation=cv2.INTER_LINEAR), data.boxes[0] * size / 64


def ask(service, image: np.ndarray, params: str):
    response = service.handle([Request({"body": png_bytes(image)}, "r", explain_route=True, header_params=params)])[0]
    return response.status, json.loads(response.body)


def test_answer_lists_detections_and_one_map_renormalized_in_their_boxes(service, export):
    image, box = scene(0)
    status, body = ask(service, image, "output=summary,array,overlay&threshold=0.01")
    assert status == 200, body
    entry = body["images"][0]
    assert (entry["width"], entry["height"]) == (96, 96)
    [found] = entry["predictions"]  # the toy detects one shape per image
    m = service.session.manifest
    x = imageio.preprocess([imageio.decode(png_bytes(image), 10**8)], m.input_size, m.mean, m.std, m.channel_order)
    direct = detection.explain(service.session, x, threshold=0.0)
    scale = 96 / m.input_size[0]
    np.testing.assert_allclose(found["box"], direct.detections.boxes[0][0] * scale, atol=0.01)
    assert found["label"] == m.labels[found["index"]] and found["score"] == round(float(direct.detections.scores[0][0]), 6)
    x1, y1, x2, y2 = found["box"]
    iou_box = np.array([[x1, y1, x2, y2]])
    from camserve.demo.detector import box_iou

    assert box_iou(iou_box, (box + [0, 0, scale, scale])[None]).item() > 0.4
    [exp] = entry["explanations"]
    assert exp["method"] == "eigencam" and exp["target"] == {"detections": 1}
    cam = array_of(exp)
    assert cam.shape == tuple(m.input_size)
    np.testing.assert_allclose(cam, direct.cams[0], atol=1e-3)  # float16 on the wire
    px, py = exp["summary"]["peak"]
    assert x1 <= px <= x2 and y1 <= py <= y2 and not exp["summary"]["degenerate"]
    overlay = decode_image(base64.b64decode(exp["overlay"]))
    assert overlay.shape == (96, 96, 3)


def test_targets_pick_detections_by_class_and_threshold(service):
    image, _ = scene(1)
    _, body = ask(service, image, "output=summary&threshold=0.01")
    [found] = body["images"][0]["predictions"]
    status, other = ask(service, image, f"output=summary&threshold=0.01&target={(found['index'] % 4) + 1}")
    assert status == 200 and other["images"][0]["predictions"] == [], other
    summary = other["images"][0]["explanations"][0]["summary"]
    assert summary["degenerate"] and "no detection" in summary["degenerate_reason"]
    _, same = ask(service, image, f"output=summary&threshold=0.01&target={found['index']}")
    assert same["images"][0]["predictions"] == [found]
    _, none = ask(service, image, "output=summary&threshold=0.999999")
    assert none["images"][0]["predictions"] == [] or none["images"][0]["predictions"][0]["score"] >= 0.999999
    _, plain = ask(service, image, "explain=false&threshold=0.01")
    assert plain["images"][0]["predictions"] == [found] and "explanations" not in plain["images"][0]


def test_a_batch_answers_every_image(service):
    images = [scene(s)[0] for s in range(3)]
    parts = {f"img{i}": png_bytes(im) for i, im in enumerate(images)}
    response = service.handle([Request(parts, "r", explain_route=True, header_params="output=summary&threshold=0.01")])[0]
    body = json.loads(response.body)
    assert response.status == 200 and len(body["images"]) == 3, body
    for i, entry in enumerate(body["images"]):
        _, alone = ask(service, images[i], "output=summary&threshold=0.01")
        assert entry["predictions"] == alone["images"][0]["predictions"]


@pytest.mark.parametrize("params, needle", [("methods=gradcam", "gradcam"), ("metrics=drop", "detection"),
                                             ("score=softmax", "score=softmax"), ("target=9", "out of range"),
                                             ("aug_smooth=true", "aug_smooth")])
def test_bad_asks_are_400s(service, params, needle):
    status, body = ask(service, scene(0)[0], params)
    assert status == 400 and needle in body["error"]["message"], body


@pytest.mark.server
def test_served_on_torchserve(export, service, tmp_path):
    from _server_fixture import http, serving

    with serving({"det": export}, tmp_path) as instance:
        image, _ = scene(2)
        for params in ("output=summary,array&threshold=0.01", "target=1,2&output=summary", "methods=gradcam"):
            status, _, body = http("POST", f"{instance.inference_url}/explanations/det", png_bytes(image),
                                   {"Content-Type": "image/png", "X-Camserve-Params": params,
                                    "Authorization": f"Bearer {instance.key('inference')}"})
            served = json.loads(body)
            local_status, expected = ask(service, image, params)
            assert status == local_status, served
            if status == 200:
                assert served["images"] == expected["images"]
            else:
                assert "gradcam" in served["error"]["message"]


@pytest.mark.server
def test_served_on_kserve(export, service, tmp_path):
    import importlib.util

    from _server_fixture import kserve_explain, without_field

    if importlib.util.find_spec("kserve") is None:
        pytest.skip("camserve[kserve] is not installed")
    from camserve.audit import open_sink
    from camserve.audit.cli import csv_row
    from camserve.cli import kserve as kserve_cli
    from camserve.config import AuditConfig

    image, _ = scene(3)
    body = png_bytes(image)
    try:
        state = kserve_cli.start([str(export)], run_dir=tmp_path / "ks", names=["det"], http_port=0, grpc_port=0, grpc=False)
        status, answer = kserve_explain(state["url"], "det", body, {"output": "summary,array", "threshold": 0.01})
        assert status == 200, answer[:300]
        _, expected = ask(service, image, "output=summary,array&threshold=0.01")
        assert without_field(json.loads(answer)["explanations"]) == without_field(expected["images"])
        status, answer = kserve_explain(state["url"], "det", body, {"methods": "gradcam"})
        assert status == 400 and "gradcam" in json.loads(answer)["error"], answer[:300]
        sink = open_sink(AuditConfig(path=str(tmp_path / "ks" / "audit")))
        try:
            rows = list(sink.rows())
            answered, refused = (r.record() for r in rows[-2:])
        finally:
            sink.close()
        [exp] = answered["images"][0]["explanations"]
        assert exp["method"] == "eigencam" and exp["target"] == {"detections": 1}
        assert refused["status"] == 400
        assert csv_row(rows[-2])["targets"] == "eigencam:detections"
    finally:
        kserve_cli.stop(tmp_path / "ks")
