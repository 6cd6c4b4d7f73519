"""Issue 15, segmentation through the request pipeline and a real TorchServe: classes present
as predictions, the predicted mask as a PNG, explanations of a class over its predicted pixels."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from torch import nn

from _server_fixture import INPUT, png_bytes, sample_image
from camserve.pipeline import imageio
from camserve.pipeline.render import decode_image
from camserve.pipeline.request import Request
from camserve.pipeline.runtime import GraphSession
from camserve.pipeline.service import Service

LABELS = ["background", "red", "green", "blue"]


class TinySeg(nn.Module):
    """Two convs, a 1x1 classifier at half resolution and a bilinear upsampling, like an FCN."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(16, len(LABELS), 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.classifier(self.backbone(x))
        return {"out": nn.functional.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from camserve.export import export_model

    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("seg")
    export_model(TinySeg().eval(), ["backbone.2"], out, input_size=INPUT, labels=LABELS, model_name="seg",
                 mean=(0.5, 0.45, 0.4), std=(0.25, 0.25, 0.3), kind="segmentation")
    return out


def ask(service, params: str, seed: int = 3):
    response = service.handle([Request({"body": png_bytes(sample_image(seed))}, "r", explain_route=True,
                                       header_params=params)])[0]
    return response.status, json.loads(response.body)


def test_answer_has_classes_present_mask_and_class_explanations(export):
    session = GraphSession(export, intra_op_threads=1)
    service = Service(session)
    status, body = ask(service, "target=topk&topk=2&methods=gradcam,eigencam&output=summary")
    assert status == 200, body
    image = body["images"][0]
    m = session.manifest
    x = imageio.preprocess([imageio.decode(png_bytes(sample_image(3)), 10**8)], m.input_size, m.mean, m.std, m.channel_order)
    predicted = session.run(x).logits[0].argmax(axis=0)
    share = np.bincount(predicted.ravel(), minlength=len(LABELS)) / predicted.size
    order = [int(c) for c in np.argsort(-share, kind="stable") if share[c] > 0]
    assert [p["index"] for p in image["predictions"]] == order[:5]
    assert image["predictions"][0]["score"] == round(float(share[order[0]]), 6)
    mask = decode_image(base64.b64decode(image["segmentation"]["mask"]), grayscale=True)
    np.testing.assert_array_equal(mask, predicted)
    explained = [e["target"]["index"] for e in image["explanations"] if e["method"] == "gradcam"]
    assert explained == order[:2]  # top-k = the classes covering most pixels


@pytest.mark.parametrize("params, needle", [("metrics=drop", "segmentation"), ("methods=scorecam", "scorecam"),
                                             ("score=softmax", "score=softmax"), ("target=7", "out of range")])
def test_bad_asks_are_400s(export, params, needle):
    status, body = ask(Service(GraphSession(export, intra_op_threads=1)), params)
    assert status == 400 and needle in body["error"]["message"], body


@pytest.mark.server
def test_served_on_torchserve(export, tmp_path):
    from _server_fixture import http
    from camserve.config import PORT_FIELDS, load_config
    from camserve.serving.torchserve.archive import build_archive
    from camserve.serving.torchserve.server import start, stop

    store = tmp_path / "store"
    store.mkdir()
    build_archive(export, name="seg", version="1.0", model_store=store)
    config = load_config(env={}, overrides={"server": {p: 0 for p in PORT_FIELDS}, "runtime": {"ort_threads": 1},
                                            "audit": {"enabled": False}})
    instance = start(config, run_dir=tmp_path / "run", model_store=store)
    try:
        local = Service(GraphSession(export, intra_op_threads=1))
        for params in ("target=1,2&output=summary", "target=top1&methods=layercam&output=summary", "metrics=road"):
            status, _, body = http("POST", f"{instance.inference_url}/explanations/seg", png_bytes(sample_image(5)),
                                   {"Content-Type": "image/png", "X-Camserve-Params": params,
                                    "Authorization": f"Bearer {instance.key('inference')}"})
            served = json.loads(body)
            local_status, expected = ask(local, params, seed=5)
            assert status == local_status, served
            if status == 200:
                assert served["images"] == expected["images"]
            else:
                assert "segmentation" in served["error"]["message"]
    finally:
        stop(tmp_path / "run")
