"""Issue 15, semantic segmentation: pytorch-grad-cam's SemanticSegmentationTarget over the
predicted mask, traced into the explain graph, from ONNX Runtime outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from camserve.cam import TopK, explain
from camserve.errors import InputError
from camserve.export.resolve import SegmentationOutput
from camserve.pipeline.runtime import GraphSession

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget  # noqa: E402

TOL = 1e-4
CLASSES = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "layercam": pgc.LayerCAM,
           "hirescam": pgc.HiResCAM, "eigencam": pgc.EigenCAM, "segeigencam": pgc.SegEigenCAM}


@pytest.fixture(scope="module")
def deeplab(tmp_path_factory):
    """torchvision's deeplabv3_mobilenet_v3_large, random weights, at 64 px."""
    from camserve.export import export_model

    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    out = tmp_path_factory.mktemp("deeplab")
    manifest = export_model(model, ["backbone.16"], out, input_size=64, model_name="deeplab", kind="segmentation")
    assert manifest.segmentation and manifest.num_outputs == 21 and manifest.target_layers[0].name == "backbone.16"
    return GraphSession(out, intra_op_threads=2), SegmentationOutput(model).eval()


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def test_predicted_mask_target_matches_the_oracle(deeplab):
    session, model = deeplab
    images = _images(3, seed=1)
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(1).numpy()  # [N, 64, 64]
    areas = [np.bincount(p.ravel(), minlength=21) for p in predicted]
    top = [int(np.argmax(a)) for a in areas]
    second = [int(np.argsort(-a, kind="stable")[1]) if (a > 0).sum() > 1 else top[i] for i, a in enumerate(areas)]
    out = explain(session, images, [TopK(1)] * 3, list(CLASSES))
    assert [c[0] for c in out.classes] == top  # top-1 = the class covering most pixels
    assert out.logits.shape == (3, 21, 64, 64)
    layer = model.model.backbone["16"]
    for method, cls in CLASSES.items():
        with cls(model, [layer]) as cam:
            ref = cam(torch.from_numpy(images),
                      targets=[SemanticSegmentationTarget(c, (p == c).astype(np.float32)) for c, p in zip(top, predicted)])
        ours = np.concatenate(out.cams[method])
        assert ref.max() > 0.5 and np.abs(ours - ref).max() <= TOL, method
    explicit = explain(session, images, [[c] for c in second], ["gradcam"])
    with pgc.GradCAM(model, [layer]) as cam:
        ref = cam(torch.from_numpy(images),
                  targets=[SemanticSegmentationTarget(c, (p == c).astype(np.float32)) for c, p in zip(second, predicted)])
    assert np.abs(np.concatenate(explicit.cams["gradcam"]) - ref).max() <= TOL


def test_segmentation_refuses_what_it_cannot_explain(deeplab):
    session, _ = deeplab
    images = _images(1, seed=2)
    with pytest.raises(InputError, match="scorecam"):
        explain(session, images, [[0]], ["scorecam"])
    with pytest.raises(InputError, match="score=softmax"):
        explain(session, images, [[0]], ["gradcam"], score="softmax")
