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


def test_client_mask_target_matches_the_oracle(deeplab):
    """``regions``: the oracle's SemanticSegmentationTarget with the client's mask (a box, a
    soft mask) instead of the predicted one; rows with -1 keep the predicted mask."""
    session, model = deeplab
    assert session.has_region
    images = _images(3, seed=4)
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(1).numpy()
    box = np.zeros((64, 64), np.float32)
    box[10:40, 20:50] = 1.0
    soft = np.random.default_rng(5).random((64, 64)).astype(np.float32)
    regions = np.stack([box, -np.ones((64, 64), np.float32), soft])
    classes = [3, int(np.bincount(predicted[1].ravel()).argmax()), 7]
    out = explain(session, images, [[c] for c in classes], ["gradcam", "hirescam"], regions=regions)
    masks = [box, (predicted[1] == classes[1]).astype(np.float32), soft]
    layer = model.model.backbone["16"]
    for method, cls in (("gradcam", pgc.GradCAM), ("hirescam", pgc.HiResCAM)):
        with cls(model, [layer]) as cam:
            ref = cam(torch.from_numpy(images), targets=[SemanticSegmentationTarget(c, m) for c, m in zip(classes, masks)])
        assert np.abs(np.concatenate(out.cams[method]) - ref).max() <= TOL, method
    with pytest.raises(InputError, match="must name classes"):
        explain(session, images, [TopK(1)] * 3, ["gradcam"], regions=regions)
    with pytest.raises(InputError, match="aug_smooth"):
        explain(session, images, [[1]] * 3, ["gradcam"], regions=regions, aug_smooth=True)
    with pytest.raises(InputError, match=r"regions must have shape \[3, 64, 64\]"):
        explain(session, images, [[1]] * 3, ["gradcam"], regions=regions[:, :32])


def test_device_post_processing_explains_the_same_masks(deeplab):
    from _device_twin import assert_same_explanations, device_twin

    session, _ = deeplab
    images = _images(2, seed=11)
    regions = np.full((2, 64, 64), -1.0, dtype=np.float32)  # image 0: its predicted pixels
    regions[1, 10:40, 20:50] = 1.0  # image 1: a client's box
    methods = ["gradcam", "hirescam", "eigencam"]
    twin = device_twin(session)
    assert_same_explanations(explain(twin, images, [[3], [5]], methods, regions=regions),
                             explain(session, images, [[3], [5]], methods, regions=regions), methods)
    assert_same_explanations(explain(twin, images, [TopK(2)] * 2, methods[:2]),
                             explain(session, images, [TopK(2)] * 2, methods[:2]), methods[:2])


def test_low_resolution_cotangent_is_the_upsampling_backward():
    """The export starts the backward at the head's output: the full-resolution cotangent
    (ranked, weighted and client-region rows) taken back through the bilinear upsampling at
    low resolution must equal autograd's gradient there."""
    from camserve.export import trace

    gen = torch.Generator().manual_seed(0)
    low = torch.randn(3, 5, 7, 9, generator=gen, requires_grad=True)
    logits = torch.nn.functional.interpolate(low, size=(30, 41), mode="bilinear", align_corners=False)
    cotangent = torch.zeros(3, 5)
    cotangent[1, 2], cotangent[1, 4], cotangent[2, 3] = 0.5, -2.0, 1.5
    rank = torch.tensor([1, -1, -1])  # row 0: the class of second-largest predicted area
    region = torch.full((3, 1, 30, 41), -1.0)
    region[2, 0, 5:20, 3:30] = 1.0  # row 2: a client's box
    full = trace.segmentation_cotangent(logits, cotangent, rank, region)
    (expected,) = torch.autograd.grad(logits, low, grad_outputs=full)
    got = trace.low_resolution_cotangent(logits, low, cotangent, rank, region)
    assert expected[0].abs().sum() > 0 and expected[2].abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


class _TinySegmenter(torch.nn.Module):
    def __init__(self, after: float = 0.0) -> None:
        super().__init__()
        self.backbone = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.classifier = torch.nn.Conv2d(4, 5, 1)
        self.after = after

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = torch.nn.functional.interpolate(self.classifier(self.backbone(x)), size=x.shape[-2:], mode="bilinear",
                                              align_corners=False)
        return {"out": out + self.after}


def test_backward_starts_at_the_head_only_where_the_model_just_upsamples_it():
    from camserve.export import trace

    model = SegmentationOutput(_TinySegmenter()).eval()
    backbone = model.model.backbone
    assert trace.upsampled_head(model, [backbone], (32, 32)) is model.model.classifier
    assert trace.upsampled_head(model, [model.model.classifier], (32, 32)) is None  # the head is the target layer
    shifted = SegmentationOutput(_TinySegmenter(after=1.0)).eval()  # something after the upsampling
    assert trace.upsampled_head(shifted, [shifted.model.backbone], (32, 32)) is None


def test_segmentation_refuses_what_it_cannot_explain(deeplab):
    session, _ = deeplab
    images = _images(1, seed=2)
    with pytest.raises(InputError, match="scorecam"):
        explain(session, images, [[0]], ["scorecam"])
    with pytest.raises(InputError, match="score=softmax"):
        explain(session, images, [[0]], ["gradcam"], score="softmax")


def test_class_cam_peaks_inside_the_shape_of_a_trained_segmenter(tmp_path):
    """A per-pixel head trained in seconds on the shapes classifier's backbone: the CAM of the
    shape's class over its predicted pixels peaks inside the shape's box (measured on 100
    held-out images: GradCAM 98%, GradCAM++ 100%, LayerCAM 100%; the top-1 class by area is
    the background, whose map peaks off the shape)."""
    from _shapes_fixture import trained_shapes
    from camserve.demo import segmenter, shapes
    from camserve.export import export_model
    from camserve.pipeline.summary import summarize

    model, info = trained_shapes()
    seg = segmenter.build_segmenter(model, info.mean, info.std)
    iou = segmenter.train_head(seg, info)
    assert iou >= 0.6, f"segmenter head: held-out shape-mask IoU {iou:.2f}"
    export_model(seg, ["backbone"], tmp_path, input_size=info.input_size, labels=segmenter.LABELS, model_name="shapes-seg",
                 kind="segmentation", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    session = GraphSession(tmp_path, intra_op_threads=2)
    data = shapes.make_shapes(100, shapes.HELDOUT_SEED_OFFSET + 9, info.input_size)
    images = data.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    b = data.boxes
    out = explain(session, images, [[int(c) + 1] for c in data.shapes], ["gradcam", "gradcam++", "layercam"])
    for method, cams in out.cams.items():
        x, y = summarize(np.concatenate(cams)).peak.T
        hits = (b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3])
        assert hits.mean() >= 0.9, f"{method}: peak inside the shape's box on {hits.mean():.0%} of 100 images"
    background = explain(session, images, [[0]] * 100, ["gradcam"]).cams["gradcam"]
    x, y = summarize(np.concatenate(background)).peak.T
    assert ((b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3])).mean() < 0.5
