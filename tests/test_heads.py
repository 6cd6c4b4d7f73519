"""Issue 15, sigmoid and binary heads: pytorch-grad-cam's ClassifierOutputSoftmaxTarget and
BinaryClassifierOutputTarget from ONNX Runtime outputs, multi-label predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from camserve.cam import TopK, explain
from camserve.errors import InputError
from camserve.pipeline.runtime import GraphSession

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget, ClassifierOutputSoftmaxTarget  # noqa: E402

from test_extra_methods import randomize_bn  # noqa: E402

TOL = 1e-4
METHODS = ["gradcam", "gradcam++", "layercam", "hirescam"]
CLASSES = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "layercam": pgc.LayerCAM, "hirescam": pgc.HiResCAM}


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def _reference(method: str, model: nn.Module, images: np.ndarray, targets: list) -> np.ndarray:
    with CLASSES[method](model, [model.layer4[-1]]) as cam:
        return cam(torch.from_numpy(images), targets=targets)


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    """resnet18 with a one-output sigmoid head (random weights, BN statistics randomized)."""
    from camserve.export import export_model

    torch.manual_seed(1)
    model = randomize_bn(torchvision.models.resnet18(), seed=1)
    model.fc = nn.Linear(512, 1)
    model.eval()
    with torch.no_grad():  # centre the output on the test images, so both categories are predicted
        model.fc.bias -= torch.median(model(torch.from_numpy(_images(6, seed=4)))[:, 0])
    out = tmp_path_factory.mktemp("binary")
    export_model(model, ["layer4.-1"], out, input_size=64, labels=["defect"], model_name="binary",
                 output_activation="sigmoid", threshold=0.4)
    return GraphSession(out, intra_op_threads=2), model


@pytest.fixture(scope="module")
def softmax_model(resnet18_export):
    out, _manifest, model = resnet18_export
    return GraphSession(out, intra_op_threads=2), model


def test_softmax_target_matches_the_oracle(softmax_model):
    session, model = softmax_model
    images = _images(3, seed=2)
    classes = [[5], [17, 3], [900]]
    out = explain(session, images, classes, METHODS, score="softmax")
    rows = [i for i, c in enumerate(classes) for _ in c]
    flat = [c for cs in classes for c in cs]
    for method in METHODS:
        ref = _reference(method, model, images[rows], [ClassifierOutputSoftmaxTarget(c) for c in flat])
        ours = np.concatenate(out.cams[method])
        assert ref.max() > 0.5 and np.abs(ours - ref).max() <= TOL, method
        # and it is not the logit target's map: the test can tell the two apart
    logit = np.concatenate(explain(session, images, classes, ["gradcam"]).cams["gradcam"])
    assert np.abs(logit - np.concatenate(out.cams["gradcam"])).max() > 1e-2
    ranked = explain(session, images, [TopK(2)] * 3, ["gradcam"], score="softmax")
    assert [len(c) for c in ranked.classes] == [2, 2, 2]


@pytest.mark.parametrize("category", [0, 1])
def test_binary_target_matches_the_oracle(binary, category):
    session, model = binary
    assert session.manifest.binary and session.manifest.threshold == 0.4
    images = _images(4, seed=3)
    out = explain(session, images, [[category]] * 4, METHODS)
    assert out.classes == [[category]] * 4
    for method in METHODS:
        ref = _reference(method, model, images, [BinaryClassifierOutputTarget(category)] * 4)
        ours = np.concatenate(out.cams[method])
        assert np.abs(ours - ref).max() <= TOL, (method, category)


def test_binary_top1_explains_the_predicted_category(binary):
    session, model = binary
    images = _images(6, seed=4)
    with torch.no_grad():
        z = model(torch.from_numpy(images))[:, 0].numpy()
    predicted = (z > 0).astype(int)
    assert 0 < predicted.sum() < 6  # both categories occur
    out = explain(session, images, [TopK(1)] * 6, ["gradcam"])
    assert [c[0] for c in out.classes] == predicted.tolist()
    both = explain(session, images, [TopK(2)] * 6, ["gradcam"])
    assert [c for c in both.classes] == [[int(p), 1 - int(p)] for p in predicted]
    with pytest.raises(InputError, match="out of range"):
        explain(session, images[:1], [[2]], ["gradcam"])


def test_scores_that_do_not_apply_are_refused(softmax_model):
    session, _ = softmax_model
    images = _images(1, seed=5)
    with pytest.raises(InputError, match="binary needs a sigmoid head"):
        explain(session, images, [[1]], ["gradcam"], score="binary")
    with pytest.raises(InputError, match="scorecam"):
        explain(session, images, [[1]], ["gradcam", "scorecam"], score="softmax")
    with pytest.raises(InputError, match="unknown score 'probability'"):
        explain(session, images, [[1]], ["gradcam"], score="probability")
