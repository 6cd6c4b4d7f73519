"""Issue 15, embedding models through the request pipeline, the CLI and a real TorchServe."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _server_fixture import INPUT, multipart, png_bytes, sample_image, tiny_model
from camserve import concepts
from camserve.cli import main
from camserve.pipeline import imageio
from camserve.pipeline.request import Request
from camserve.pipeline.runtime import GraphSession
from camserve.pipeline.service import Service


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The tiny CNN without its classifier (a 16-d embedding), with two registered concepts."""
    from torch import nn

    from camserve.export import export_model

    out = tmp_path_factory.mktemp("emb")
    model = nn.Sequential(*list(tiny_model(0).children())[:-1]).eval()
    export_model(model, ["2"], out, input_size=INPUT, model_name="emb", mean=(0.5, 0.45, 0.4), std=(0.25, 0.25, 0.3),
                 kind="embedding")
    folder = tmp_path_factory.mktemp("concept-images")
    for name, seeds in (("warm", (11, 12)), ("cold", (13,))):
        paths = []
        for s in seeds:
            paths.append(folder / f"{name}{s}.png")
            paths[-1].write_bytes(png_bytes(sample_image(s)))
        assert main(["concepts", "add", str(out), "--name", name, *map(str, paths)]) == 0
    return out


def embed(session, seeds) -> np.ndarray:
    m = session.manifest
    rgb = [imageio.decode(png_bytes(sample_image(s)), 10**8) for s in seeds]
    return session.forward_logits(imageio.preprocess(rgb, m.input_size, m.mean, m.std, m.channel_order))


def test_concepts_cli_stores_mean_embeddings(export, capsys):
    session = GraphSession(export, intra_op_threads=1)
    registry = concepts.load(export)
    assert list(registry) == ["warm", "cold"]
    np.testing.assert_allclose(registry["warm"], embed(session, (11, 12)).mean(axis=0), rtol=1e-5, atol=1e-6)
    assert main(["concepts", "list", str(export)]) == 0
    assert "warm\t16 dims" in capsys.readouterr().out
    assert main(["concepts", "add", str(export), "--name", "bad name!", str(export / "manifest.json")]) == 2
    assert "concept name 'bad name!'" in capsys.readouterr().err


def ask(service, params: str, concept_seed: int | None = None):
    fields = {"image": png_bytes(sample_image(3))}
    if concept_seed is not None:
        fields["concept_image"] = png_bytes(sample_image(concept_seed))
    response = service.handle([Request(fields, "r", explain_route=True, header_params=params)])[0]
    return response.status, json.loads(response.body)


def test_explanations_name_the_concept_and_its_similarity(export):
    session = GraphSession(export, intra_op_threads=1)
    service = Service(session)
    status, body = ask(service, "concept=warm,cold&methods=gradcam,layercam", concept_seed=14)
    assert status == 200, body
    image = body["images"][0]
    assert image["predictions"] == [] and image["field"] == "image"  # the concept part is not explained
    e = embed(session, (3,))
    f = np.stack([concepts.load(export)["warm"], concepts.load(export)["cold"], embed(session, (14,))[0]])
    expected = concepts.cosine(np.repeat(e, 3, axis=0), f)
    targets = [x["target"] for x in image["explanations"] if x["method"] == "gradcam"]
    assert [t["label"] for t in targets] == ["warm", "cold", "concept image"]
    np.testing.assert_allclose([t["score"] for t in targets], expected, atol=1e-5)


@pytest.mark.parametrize("params, concept_seed, needle", [
    ("concept=hot", None, "unknown concept 'hot'"),
    ("methods=gradcam", None, "name a concept"),
    ("concept=warm&metrics=drop", None, "embedding models"),
    ("concept=warm", 999, "concept_image"),  # bytes that are no image: refused, named
])
def test_bad_concept_asks_are_400s_naming_the_problem(export, params, concept_seed, needle):
    service = Service(GraphSession(export, intra_op_threads=1))
    fields = {"image": png_bytes(sample_image(3))}
    if concept_seed == 999:
        fields["concept_image"] = b"not an image"
    elif concept_seed is not None:
        fields["concept_image"] = png_bytes(sample_image(concept_seed))
    response = service.handle([Request(fields, "r", explain_route=True, header_params=params)])[0]
    body = json.loads(response.body)
    assert 400 <= response.status < 500 and needle in body["error"]["message"], body


def test_a_classifier_refuses_concepts(tmp_path):
    from _server_fixture import tiny_export

    service = Service(GraphSession(tiny_export(tmp_path), intra_op_threads=1))
    status, body = ask(service, "concept=warm")
    assert status == 400 and "embedding models" in body["error"]["message"]


@pytest.mark.server
def test_served_on_torchserve(export, tmp_path):
    from _server_fixture import http
    from camserve.config import PORT_FIELDS, load_config
    from camserve.serving.torchserve.archive import build_archive
    from camserve.serving.torchserve.server import start, stop

    store = tmp_path / "store"
    store.mkdir()
    build_archive(export, name="emb", version="1.0", model_store=store)  # carries concepts.npz
    config = load_config(env={}, overrides={"server": {p: 0 for p in PORT_FIELDS}, "runtime": {"ort_threads": 1},
                                            "audit": {"enabled": False}})
    instance = start(config, run_dir=tmp_path / "run", model_store=store)
    try:
        local = Service(GraphSession(export, intra_op_threads=1))
        for params, with_image in (("concept=cold&output=summary", False), ("output=summary", True),
                                   ("concept=hot", False)):
            parts = [("image", "image/png", png_bytes(sample_image(3)))]
            if with_image:
                parts.append(("concept_image", "image/png", png_bytes(sample_image(14))))
            data, ctype = multipart(parts)
            status, _, body = http("POST", f"{instance.inference_url}/explanations/emb", data,
                                   {"Content-Type": ctype, "X-Camserve-Params": params,
                                    "Authorization": f"Bearer {instance.key('inference')}"})
            served = json.loads(body)
            local_status, expected = ask(local, params, 14 if with_image else None)
            assert status == local_status, served
            if status == 200:
                assert served["images"] == expected["images"]
            else:
                assert "unknown concept 'hot'" in served["error"]["message"]
    finally:
        stop(tmp_path / "run")
