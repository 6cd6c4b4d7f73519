"""Issue 14 on the request path: ``metrics=...`` adds each explanation's faithfulness
scores to the answer, the audit record and ``camserve_faithfulness``; bad asks are 400s."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _server_fixture import array_of, png_bytes, sample_image, tiny_export
from camserve import faithfulness
from camserve.config import Limits
from camserve.pipeline import imageio
from camserve.pipeline.request import Request
from camserve.pipeline.runtime import GraphSession
from camserve.pipeline.service import Service


class Cache:
    """A TorchServe-style metrics cache that keeps what it is sent."""

    def __init__(self) -> None:
        self.values: dict = {}

    def get_metric(self, name, kind):
        cache = self

        class Series:
            def add_or_update(self, value, dims, request_id=""):
                key = (name, tuple(dims))
                cache.values[key] = value if str(kind).endswith("GAUGE") else cache.values.get(key, 0) + value

        return Series()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def session(export_dir):
    return GraphSession(export_dir, intra_op_threads=1)


def ask(service, params: str, *images, rid="r"):
    if len(images) == 1:
        fields = {"body": png_bytes(images[0])}
    else:
        fields = {f"img{i}": png_bytes(im) for i, im in enumerate(images)}
    response = service.handle([Request(fields, rid, explain_route=True, header_params=params)])[0]
    return response.status, json.loads(response.body)


def test_metrics_in_the_answer_equal_scoring_the_served_maps(session):
    from camserve.pipeline.metrics import Recorder

    records = []
    cache = Cache()
    service = Service(session, recorder=Recorder(cache, "tiny", "1.0"), hooks=[records.append])
    image = sample_image(3)
    status, body = ask(service, "methods=gradcam,layercam&target=topk&topk=2&output=array&metrics=road,drop,increase", image)
    assert status == 200, body
    entries = body["images"][0]["explanations"]
    assert len(entries) == 4 and body["timings_ms"]["metrics"] > 0
    m = session.manifest
    x = imageio.preprocess([imageio.decode(png_bytes(image), 10**8)], m.input_size, m.mean, m.std, m.channel_order)
    for e in entries:
        assert set(e["metrics"]) == {"road", "road_morf", "road_lerf", "drop", "increase"}
        cam = array_of(e).astype(np.float32)
        # the served float16 map scores within rounding of the float32 map it came from
        again = faithfulness.score_maps(session.forward_logits, x, cam[None], np.array([e["target"]["index"]]),
                                        ["road", "drop", "increase"])
        assert e["metrics"]["increase"] in (0.0, 1.0) and e["metrics"]["drop"] >= 0
        assert abs(e["metrics"]["road"] - again["road"][0]) < 5e-3
    assert records[0]["images"][0]["explanations"][0]["metrics"] == entries[0]["metrics"]  # audited
    service.recorder.flush()
    counts = {k: v for k, v in cache.values.items() if k[0] == "camserve_faithfulness_count"}
    assert counts[("camserve_faithfulness_count", ("tiny", "1.0", "road", "gradcam"))] == 2
    assert ("camserve_faithfulness_sum", ("tiny", "1.0", "road", "layercam")) in cache.values


def test_bad_metric_asks_are_400_naming_the_problem(session):
    service = Service(session, limits=Limits(max_metric_maps=3))
    image = sample_image(4)
    status, body = ask(service, "metrics=road,roadd", image)
    assert status == 400 and "'roadd'" in body["error"]["message"] and body["error"]["kind"] == "bad_parameter"
    status, body = ask(service, "methods=dff&metrics=drop", image)
    assert status == 400 and "dff" in body["error"]["message"]
    status, body = ask(service, "methods=gradcam,layercam&target=topk&topk=2&metrics=drop", image)
    assert status == 400 and "4 maps" in body["error"]["message"] and "limit of 3" in body["error"]["message"]
    status, body = ask(service, "metrics=drop&methods=gradcam", image, image)
    assert status == 200 and all("metrics" in e for img in body["images"] for e in img["explanations"])
    status, body = ask(service, "methods=gradcam", image)
    assert status == 200 and "metrics" not in body["images"][0]["explanations"][0] and "metrics" not in body["timings_ms"]


def test_a_bad_neighbour_does_not_lose_the_metrics(session):
    service = Service(session)
    good = Request({"body": png_bytes(sample_image(5))}, "good", explain_route=True, header_params="metrics=confidence_change")
    bad = Request({"body": b"not an image"}, "bad", explain_route=True, header_params="metrics=confidence_change")
    r_good, r_bad = service.handle([good, bad])
    assert r_bad.status == 415 and r_good.status == 200
    assert "confidence_change" in json.loads(r_good.body)["images"][0]["explanations"][0]["metrics"]
