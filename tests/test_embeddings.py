"""Issue 15, embeddings: GradCAM of the cosine similarity to a concept (pytorch-grad-cam's
embeddings tutorial target) from ONNX Runtime outputs, and on a trained net, where it looks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from camserve import concepts as concept_mod
from camserve.cam import TopK, explain
from camserve.errors import InputError
from camserve.pipeline.runtime import GraphSession

pgc = pytest.importorskip("pytorch_grad_cam")

from test_extra_methods import randomize_bn  # noqa: E402

TOL = 1e-4
CLASSES = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "layercam": pgc.LayerCAM, "hirescam": pgc.HiResCAM}


class SimilarityToConcept:
    """The tutorial's target: cosine similarity of the model output to a concept vector."""

    def __init__(self, concept: torch.Tensor) -> None:
        self.concept = concept

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(output, self.concept, dim=0)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    from camserve.export import export_model

    torch.manual_seed(2)
    model = randomize_bn(torchvision.models.resnet18(), seed=2)
    model.fc = nn.Identity()
    model.eval()
    out = tmp_path_factory.mktemp("embedding")
    manifest = export_model(model, ["layer4.-1"], out, input_size=64, model_name="emb", kind="embedding")
    assert manifest.embedding and manifest.num_outputs == 512 and manifest.labels[0] == "dim_0"
    return GraphSession(out, intra_op_threads=2), model


def test_cosine_target_matches_the_oracle(embedder):
    session, model = embedder
    images = _images(3, seed=1)
    with torch.no_grad():
        concepts = model(torch.from_numpy(_images(2, seed=9))).numpy()
    targets = [[0], [1], [0, 1]]
    out = explain(session, images, targets, list(CLASSES), concepts=concepts)
    assert out.classes == targets
    rows = [i for i, t in enumerate(targets) for _ in t]
    flat = [c for t in targets for c in t]
    for method, cls in CLASSES.items():
        with cls(model, [model.layer4[-1]]) as cam:
            ref = cam(torch.from_numpy(images[rows]), targets=[SimilarityToConcept(torch.from_numpy(concepts[c])) for c in flat])
        ours = np.concatenate(out.cams[method])
        assert ref.max() > 0.5 and np.abs(ours - ref).max() <= TOL, method
    # the embedding itself is the graph's output, and the cotangent is the cosine's gradient
    e = session.forward_logits(images)
    with torch.no_grad():
        np.testing.assert_allclose(e, model(torch.from_numpy(images)).numpy(), atol=1e-4)
    et = torch.from_numpy(e[:1].astype(np.float64)).requires_grad_(True)
    torch.nn.functional.cosine_similarity(et, torch.from_numpy(concepts[:1].astype(np.float64))).sum().backward()
    np.testing.assert_allclose(concept_mod.cosine_cotangent(e[:1], concepts[:1]), et.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_device_post_processing_explains_the_same_similarities(embedder):
    from _device_twin import assert_same_explanations, device_twin

    session, model = embedder
    with torch.no_grad():
        concepts = model(torch.from_numpy(_images(2, seed=9))).numpy()
    methods = ["gradcam++", "xgradcam", "gradcamelementwise"]
    images = _images(2, seed=4)
    assert_same_explanations(explain(device_twin(session), images, [[0, 1], [1]], methods, concepts=concepts),
                             explain(session, images, [[0, 1], [1]], methods, concepts=concepts), methods)


def test_embedding_targets_are_concepts(embedder):
    session, _ = embedder
    images = _images(1, seed=3)
    with pytest.raises(InputError, match="concepts"):
        explain(session, images, [[0]], ["gradcam"])
    with pytest.raises(InputError, match="out of range"):
        explain(session, images, [[2]], ["gradcam"], concepts=np.ones((2, 512), np.float32))
    with pytest.raises(InputError, match="concept indices"):
        explain(session, images, [TopK(1)], ["gradcam"], concepts=np.ones((2, 512), np.float32))


def test_similarity_cam_lands_on_the_shape_of_a_trained_embedding_net(tmp_path):
    """The trained shapes CNN without its classifier is an embedding net. A class's concept is
    the mean embedding of a few images of it minus the mean over all of them: its pooled
    post-ReLU features are all positive, so raw means share one dominant direction and the
    similarity's gradient spreads over the background (GradCAM 45%, GradCAM++ 68%, LayerCAM
    77% with raw means). With the centred concepts the similarity CAM peaks inside the shape's
    box on >= 90% of held-out images for GradCAM++ and LayerCAM (97% each when measured);
    GradCAM reaches 83% and is held to 80%."""
    from camserve.demo import shapes as demo
    from camserve.export import export_model
    from camserve.pipeline.summary import summarize
    from _shapes_fixture import trained_shapes

    model, info = trained_shapes()
    embed = copy.deepcopy(model)
    embed.fc = nn.Identity()
    embed.eval()
    export_model(embed, [info.target_layer], tmp_path, input_size=info.input_size, model_name="shapes-emb",
                 kind="embedding", mean=info.mean, std=info.std)
    session = GraphSession(tmp_path, intra_op_threads=2)
    register = demo.make_shapes(60, seed=77, size=info.input_size)
    e = session.forward_logits(demo.normalize(register.images, info.mean, info.std))
    means = np.stack([e[register.labels == c].mean(axis=0) for c in range(len(demo.CLASSES))])
    concepts = means - means.mean(axis=0)
    concept_mod.save(tmp_path, {name: concepts[c] for c, name in enumerate(demo.CLASSES)})
    assert list(concept_mod.load(tmp_path)) == list(demo.CLASSES)
    data = demo.make_shapes(60, seed=2027, size=info.input_size)
    images = demo.normalize(data.images, info.mean, info.std)
    out = explain(session, images, [[int(c)] for c in data.labels], ["gradcam++", "layercam", "gradcam"], concepts=concepts)
    for method, floor in (("gradcam++", 0.9), ("layercam", 0.9), ("gradcam", 0.8)):
        peaks = summarize(np.concatenate(out.cams[method])).peak
        x, y, b = peaks[:, 0], peaks[:, 1], data.boxes
        hits = (b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3])
        assert hits.mean() >= floor, f"{method}: similarity CAM peak inside the shape box on {hits.mean():.0%} of 60 images"
    # the criterion discriminates: another class's concept does not find the shape as often
    other = explain(session, images, [[(int(c) + 1) % len(demo.CLASSES)] for c in data.labels], ["layercam"], concepts=concepts)
    peaks = summarize(np.concatenate(other.cams["layercam"])).peak
    x, y, b = peaks[:, 0], peaks[:, 1], data.boxes
    assert ((b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3])).mean() < 0.9
