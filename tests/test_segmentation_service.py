"""Issue 15, segmentation through the request pipeline and a real TorchServe: classes present
as predictions, the predicted mask as a PNG, explanations of a class over its predicted pixels."""

from __future__ import annotations

import base64
import json

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from _server_fixture import INPUT, array_of, png_bytes, sample_image
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


def _mask_png(shape: tuple[int, int], box: tuple[int, int, int, int]) -> bytes:
    mask = np.zeros((*shape, 3), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0 : y1 + 1, x0 : x1 + 1] = 255
    return png_bytes(mask)


def test_client_box_and_mask_are_the_pixels_explained(export):
    """``box=`` and a ``mask`` part (the sent image's pixels) feed the graph's region input:
    the same map as ``explain(..., regions=)`` on the mask resized like the image."""
    from camserve.cam import explain

    session = GraphSession(export, intra_op_threads=1)
    service = Service(session)
    image = sample_image(3)  # 48 x 40 (h x w); the model takes INPUT x INPUT
    status, body = ask(service, "target=2&box=4,6,30,25&methods=gradcam&output=array")
    assert status == 200, body
    [exp] = body["images"][0]["explanations"]
    assert exp["target"]["index"] == 2 and exp["target"]["mask"] == "box"
    m = session.manifest
    x = imageio.preprocess([image], m.input_size, m.mean, m.std, m.channel_order)
    full = np.zeros(image.shape[:2], np.uint8)
    full[6:26, 4:31] = 255
    shrink = image.shape[0] > m.input_size[0] and image.shape[1] > m.input_size[1]  # as the image is resized
    region = cv2.resize(full, tuple(m.input_size)[::-1], interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    region = region.astype(np.float32) / 255.0
    direct = explain(session, x, [[2]], ["gradcam"], regions=region[None]).cams["gradcam"][0]
    np.testing.assert_allclose(array_of(exp), direct[0], atol=1e-3)
    predicted = explain(session, x, [[2]], ["gradcam"]).cams["gradcam"][0]
    assert np.abs(direct - predicted).max() > 0.05  # the box is not the predicted mask
    # the same box as a mask part
    parts = {"image": png_bytes(image), "mask": _mask_png(image.shape[:2], (4, 6, 30, 25))}
    response = service.handle([Request(parts, "m", explain_route=True, header_params="target=2&methods=gradcam&output=array")])[0]
    masked = json.loads(response.body)
    assert response.status == 200, masked
    [exp_mask] = masked["images"][0]["explanations"]
    assert exp_mask["target"]["mask"] == "mask" and exp_mask["array"] == exp["array"]
    _, predicted_body = ask(service, "target=2&methods=gradcam&output=summary")
    assert predicted_body["images"][0]["explanations"][0]["target"]["mask"] == "predicted"


@pytest.mark.parametrize("params, mask, needle", [
    ("box=4,6,30,25", None, "name the classes"),
    ("target=1&box=4,6,40,25", None, "outside image"),
    ("target=1&box=9,6,3,25", None, "x0 <= x1"),
    ("target=1&box=1,2,3", None, "four integers"),
    ("target=1&box=1,2,3,4&aug_smooth=true", None, "aug_smooth"),
    ("target=1&box=1,2,3,4", (1, 1, 5, 5), "not both"),
    ("target=1", "wrong size", "send a mask of the image's size"),
    ("target=1", "empty", "no non-zero pixel"),
])
def test_bad_client_masks_are_400s(export, params, mask, needle):
    service = Service(GraphSession(export, intra_op_threads=1))
    fields = {"image": png_bytes(sample_image(3))}
    if mask == "wrong size":
        fields["mask"] = _mask_png((20, 20), (1, 1, 5, 5))
    elif mask == "empty":
        fields["mask"] = png_bytes(np.zeros((48, 40, 3), np.uint8))
    elif mask is not None:
        fields["mask"] = _mask_png((48, 40), mask)
    response = service.handle([Request(fields, "r", explain_route=True, header_params=params)])[0]
    body = json.loads(response.body)
    assert response.status == 400 and needle in body["error"]["message"], body


def test_client_mask_on_a_classifier_is_a_400(tmp_path):
    from _server_fixture import tiny_export

    service = Service(GraphSession(tiny_export(tmp_path), intra_op_threads=1))
    status, body = ask(service, "target=1&box=1,1,5,5")
    assert status == 400 and "applies to segmentation models" in body["error"]["message"], body


@pytest.mark.server
def test_served_on_torchserve(export, tmp_path):
    from _server_fixture import http, serving

    with serving({"seg": export}, tmp_path) as instance:
        local = Service(GraphSession(export, intra_op_threads=1))
        for params in ("target=1,2&output=summary", "target=top1&methods=layercam&output=summary", "metrics=road",
                       "target=2&box=4,6,30,25&output=summary,array"):
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
