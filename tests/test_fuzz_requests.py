"""Property-based fuzzing of the handler's decode-and-parse path, in-process.

Random and mutated bodies (valid PNG/JPEG/WebP/BMP with bytes flipped, cut or spliced,
random bytes, huge declared sizes), random parameter headers and multipart fields go through
``Service.handle``: every answer must be a well-formed JSON document with status 200 or 4xx
(never 5xx, never an escaping exception), good neighbours in the same batch must still be
answered in full, and memory must stay bounded over the whole run.
"""

from __future__ import annotations

import json
import resource
import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _server_fixture import png_bytes, sample_image, tiny_export
from camserve.config import Limits
from camserve.pipeline.request import Request
from camserve.pipeline.runtime import GraphSession
from camserve.pipeline.service import Service

FORMATS = (".png", ".jpg", ".webp", ".bmp")
PARAM_WORDS = ["methods", "target", "topk", "output", "aug_smooth", "eigen_smooth", "explain", "x", ""]
VALUES = ["gradcam", "gradcam++", "scorecam", "nosuch", "top1", "topk", "0", "1", "-1", "999999", "3,2", "true",
          "false", "png,overlay", "array", "summary", "none", "nan", "1e9", "", "[1,2]", "{}", "%00", "\u00e9"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    session = GraphSession(tiny_export(tmp_path_factory.getbasetemp()), intra_op_threads=1)
    limits = Limits(max_pixels=4_000_000, max_body_bytes=2_000_000)
    return Service(session, limits)


def encoded(fmt: str, seed: int, size: tuple[int, int]) -> bytes:
    ok, buf = cv2.imencode(fmt, sample_image(seed, size)[:, :, ::-1])
    assert ok
    return buf.tobytes()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header that declares a huge image (decompression bomb) with a tiny body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + b"\x00" * 64


@st.composite
def bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["valid", "flipped", "cut", "spliced", "random", "bomb", "empty"]))
    if kind == "random":
        return draw(st.binary(max_size=4096))
    if kind == "empty":
        return b""
    if kind == "bomb":
        return png_declaring(draw(st.integers(1, 60_000)), draw(st.integers(1, 60_000)))
    fmt = draw(st.sampled_from(FORMATS))
    size = (draw(st.integers(1, 96)), draw(st.integers(1, 96)))
    data = bytearray(encoded(fmt, draw(st.integers(0, 50)), size))
    if kind == "flipped":
        for pos in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[pos] ^= draw(st.integers(1, 255))
    elif kind == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "spliced":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=256)) + data[at:]
    return bytes(data)


params_text = st.lists(
    st.tuples(st.sampled_from(PARAM_WORDS), st.one_of(st.sampled_from(VALUES), st.text(max_size=12))), max_size=5
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))
params_json = st.dictionaries(
    st.sampled_from(PARAM_WORDS),
    st.one_of(st.sampled_from(VALUES), st.integers(-5, 10**6), st.lists(st.integers(-3, 12), max_size=4), st.none(), st.booleans()),
    max_size=5,
).map(json.dumps)
# Nesting and size, not only flat values: JSON trees of any shape under parameter names,
# bracket towers deep enough to exhaust the parser's recursion, and long values.
json_trees = st.recursive(
    st.one_of(st.sampled_from(VALUES), st.integers(-5, 10**6), st.none(), st.booleans()),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(PARAM_WORDS), children, max_size=3),
    max_leaves=12,
)
params_nested = st.dictionaries(st.sampled_from(PARAM_WORDS), json_trees, max_size=4).map(json.dumps)
params_deep = st.tuples(st.sampled_from(PARAM_WORDS), st.integers(1, 5000), st.sampled_from("[{")).map(
    lambda t: '{"%s": %s}' % (t[0], ("[" * t[1] + "]" * t[1]) if t[2] == "[" else ('{"a": ' * t[1] + "1" + "}" * t[1]))
)
params_long = st.tuples(st.sampled_from(PARAM_WORDS), st.sampled_from(VALUES), st.integers(100, 20_000)).map(
    lambda t: f"{t[0]}=" + ",".join([t[1]] * t[2])
)
headers = st.one_of(st.none(), params_text, params_json, params_nested, params_deep, params_long, st.text(max_size=40))


@st.composite
def requests(draw) -> Request:
    if draw(st.booleans()):
        fields = {"body": draw(bodies())}
    else:  # multipart: random field names, image parts and a params part
        fields = {}
        for i in range(draw(st.integers(0, 3))):
            fields[draw(st.sampled_from(["a", "b", "file", "image", "params", "model_name", f"f{i}"]))] = draw(
                st.one_of(bodies(), params_json.map(str.encode), params_nested.map(str.encode),
                          params_deep.map(str.encode), st.text(max_size=20))
            )
    return Request(fields, draw(st.text(max_size=8)), explain_route=draw(st.booleans()), header_params=draw(headers))


def check_answer(response) -> dict:
    assert response.status == 200 or 400 <= response.status < 500, (response.status, response.body[:300])
    body = json.loads(response.body)
    assert body["schema"] == "camserve/1"
    if response.status >= 400:
        assert body["error"]["kind"] and body["error"]["message"]
    return body


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@settings(max_examples=250, deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
          derandomize=True)
@given(batch=st.lists(requests(), min_size=1, max_size=4))
def test_fuzzed_batches_never_fail_as_a_whole(service, batch):
    good = Request({"body": png_bytes(sample_image(7))}, "good", explain_route=True, header_params="methods=gradcam")
    responses = service.handle(batch + [good])
    assert len(responses) == len(batch) + 1
    for response in responses:
        check_answer(response)
    assert responses[-1].status == 200  # the good neighbour is answered in full
    assert json.loads(responses[-1].body)["images"][0]["explanations"]


def test_memory_stays_bounded_over_many_bad_requests(service):
    rng = np.random.default_rng(0)
    bad = [png_declaring(50_000, 50_000), b"", rng.bytes(3000), encoded(".jpg", 1, (64, 64))[:300]]

    def round_trip() -> None:
        for data in bad:
            for response in service.handle([Request({"body": data}, "x", header_params="target=999")]):
                check_answer(response)

    for _ in range(30):  # warm up allocator pools
        round_trip()
    before = rss_mb()
    for _ in range(300):
        round_trip()
    assert rss_mb() - before < 50


def test_limits_are_enforced_before_any_decoding(service, monkeypatch):
    """Body size, images per request, targets and methods are refused before a pixel is decoded."""
    import camserve.pipeline.imageio as imageio

    strict = Service(service.session, Limits(max_body_bytes=8000, max_images_per_request=2, max_targets=2, max_methods=1,
                                             max_pixels=4_000_000))
    decoded: list[int] = []
    real_decode = imageio.decode
    monkeypatch.setattr(imageio, "decode", lambda data, *a, **k: decoded.append(len(data)) or real_decode(data, *a, **k))
    small = png_bytes(sample_image(1))
    big = encoded(".bmp", 2, (64, 64))  # 12 KB uncompressed
    cases = {
        "body_too_large": Request({"body": big}, "1"),
        "too_many_images": Request({"a": small, "b": small, "c": small}, "2"),
        "bad_parameter": Request({"body": small}, "3", explain_route=True, header_params="target=topk&topk=3"),
        "methods": Request({"body": small}, "4", explain_route=True, header_params="methods=gradcam,layercam"),
    }
    responses = strict.handle(list(cases.values()))
    for (kind, _), response in zip(cases.items(), responses):
        body = check_answer(response)
        assert 400 <= response.status < 500, kind
        assert kind in body["error"]["kind"] or kind in body["error"]["message"] or "limit" in body["error"]["message"], body
    assert decoded == []  # nothing was decoded for any refused request
    ok = strict.handle([Request({"body": small}, "5", explain_route=True)])[0]
    assert ok.status == 200 and decoded == [len(small)]


DEEP = '{"methods": ' + "[" * 900 + "]" * 900 + "}"  # ~1.8 KB: once a RecursionError and a 500


@pytest.mark.parametrize("source", ["header", "params field", "query value", "long header", "deep object"])
def test_nested_or_oversized_parameters_are_a_400(service, source):
    image = png_bytes(sample_image(3))
    fields, header = {"body": image}, None
    if source == "header":
        header = DEEP
    elif source == "params field":
        fields = {"image": image, "params": DEEP.encode()}
    elif source == "query value":
        fields = {"body": image, "methods": ("gradcam," * 2000).encode()}
    elif source == "long header":
        header = "methods=" + "gradcam," * 1000
    else:
        header = '{"target": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}"
    good = Request({"body": image}, "good", explain_route=True)
    bad, ok = service.handle([Request(fields, "bad", explain_route=True, header_params=header), good])
    assert bad.status == 400, bad.body[:300]
    error = json.loads(bad.body)["error"]
    assert error["kind"] == "bad_parameter" and ("nested" in error["message"] or "limit" in error["message"]), error
    assert ok.status == 200
