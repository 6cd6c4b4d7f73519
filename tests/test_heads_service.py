"""Issue 15, sigmoid heads through the request pipeline and a real TorchServe: multi-label
predictions above a threshold, binary categories, score=softmax, and refusals naming the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from _server_fixture import INPUT, LABELS, png_bytes, sample_image, tiny_model
from camserve.pipeline import imageio
from camserve.pipeline.request import Request
from camserve.pipeline.runtime import GraphSession
from camserve.pipeline.service import Service


def _export(base, name: str, model: nn.Module, labels: list[str], **kwargs):
    from camserve.export import export_model

    out = base / name
    export_model(model, ["2"], out, input_size=INPUT, labels=labels, model_name=name, mean=(0.5, 0.45, 0.4),
                 std=(0.25, 0.25, 0.3), output_activation="sigmoid", **kwargs)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    base = tmp_path_factory.mktemp("heads")
    multi = tiny_model(0)
    binary = tiny_model(1)
    binary[-1] = nn.Linear(16, 1)
    with torch.no_grad():
        binary[-1].bias.fill_(0.0)
    return {"multi": _export(base, "multi", multi, LABELS, threshold=0.5),
            "binary": _export(base, "binary", binary.eval(), ["defect"], threshold=0.5)}


def ask(service, params: str, seed: int = 3):
    response = service.handle([Request({"body": png_bytes(sample_image(seed))}, "r", explain_route=True,
                                       header_params=params)])[0]
    return response.status, json.loads(response.body)


def logits_of(session, seed: int) -> np.ndarray:
    m = session.manifest
    x = imageio.preprocess([imageio.decode(png_bytes(sample_image(seed)), 10**8)], m.input_size, m.mean, m.std, m.channel_order)
    return session.run(x).logits[0]


def test_multi_label_predictions_are_the_labels_above_the_threshold(exports):
    session = GraphSession(exports["multi"], intra_op_threads=1)
    service = Service(session)
    p = 1 / (1 + np.exp(-logits_of(session, 3).astype(np.float64)))
    for threshold in (0.3, 0.5, 0.55):
        status, body = ask(service, f"threshold={threshold}&methods=gradcam&target=topk&topk=2")
        assert status == 200, body
        preds = body["images"][0]["predictions"]
        expected = [int(c) for c in np.argsort(-p) if p[c] >= threshold]
        assert [e["index"] for e in preds] == expected
        assert all(abs(e["score"] - p[e["index"]]) < 1e-5 for e in preds)  # sigmoid, not softmax
        explained = body["images"][0]["explanations"]
        assert [e["target"]["index"] for e in explained] == [int(c) for c in np.argsort(-p)[:2]]
    status, body = ask(service, "threshold=1.5")
    assert status == 400 and "threshold" in body["error"]["message"]


def test_binary_head_answers_categories(exports):
    session = GraphSession(exports["binary"], intra_op_threads=1)
    service = Service(session)
    for seed in (3, 4, 5, 6):
        z = float(logits_of(session, seed)[0])
        s = 1 / (1 + np.exp(-z))
        status, body = ask(service, "methods=gradcam,layercam&metrics=drop", seed=seed)
        assert status == 200, body
        (pred,) = body["images"][0]["predictions"]
        category = int(s >= 0.5)
        assert pred == {"index": category, "label": "defect" if category else "not defect",
                        "score": round(s if category else 1 - s, 6)}
        entries = body["images"][0]["explanations"]
        assert [e["target"]["index"] for e in entries] == [category, category]
        assert 0 <= entries[0]["metrics"]["drop"] <= 1
    status, body = ask(service, "target=0,1&methods=gradcam")
    assert status == 200 and [e["target"]["label"] for e in body["images"][0]["explanations"]] == ["not defect", "defect"]
    for params, needle in (("target=2", "out of range"), ("score=softmax", "binary"),
                           ("methods=scorecam&score=binary", "scorecam")):
        status, body = ask(service, params)
        assert status == 400 and needle in body["error"]["message"], (params, body)


def test_softmax_score_and_refusals_on_a_softmax_head(tmp_path):
    from _server_fixture import tiny_export

    session = GraphSession(tiny_export(tmp_path), intra_op_threads=1)
    service = Service(session)
    status, logit = ask(service, "methods=gradcam&output=array")
    status2, prob = ask(service, "methods=gradcam&output=array&score=softmax")
    assert status == status2 == 200
    assert logit["images"][0]["explanations"][0]["target"] == prob["images"][0]["explanations"][0]["target"]
    for params, needle in (("threshold=0.5", "sigmoid heads"), ("score=binary", "one-output sigmoid"),
                           ("score=probability", "'probability'")):
        status, body = ask(service, params)
        assert status == 400 and needle in body["error"]["message"], (params, body)


def test_compare_refuses_sigmoid_heads_naming_the_kind(exports):
    from camserve.compare.sources import ExportSide
    from camserve.errors import InputError

    with pytest.raises(InputError, match="holds a sigmoid model"):
        ExportSide(exports["multi"], ["gradcam"])


@pytest.mark.server
def test_served_on_torchserve(exports, tmp_path):
    """One archive per head kind on a real TorchServe: answers equal the in-process pipeline's."""
    from _server_fixture import http, serving

    with serving(dict(exports), tmp_path) as instance:
        for name, params in (("multi", "threshold=0.4&target=topk&topk=2&output=summary"),
                             ("binary", "target=0,1&output=summary&score=binary"),
                             ("binary", "target=3")):
            status, _, body = http("POST", f"{instance.inference_url}/explanations/{name}", png_bytes(sample_image(8)),
                                   {"Content-Type": "image/png", "X-Camserve-Params": params,
                                    "Authorization": f"Bearer {instance.key('inference')}"})
            served = json.loads(body)
            local_status, local = ask(Service(GraphSession(exports[name], intra_op_threads=1)), params, seed=8)
            assert status == local_status, (name, params, served)
            if status == 200:
                assert served["images"] == local["images"], (name, params)
            else:
                assert status == 400 and "out of range" in served["error"]["message"]
