"""Issue 15, object detection: the detection graph (boxes, scores, labels, the feature
pyramid's activations) against PyTorch, EigenCAM against pytorch-grad-cam's Faster R-CNN
recipe on the same activations, boxes renormalization, and localization on a trained toy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from _detection_fixture import exported_detector, shapes_detector
from camserve.pipeline import detection
from camserve.pipeline.summary import summarize

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.image import scale_cam_image  # noqa: E402
from pytorch_grad_cam.utils.reshape_transforms import fasterrcnn_reshape_transform  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection  # noqa: E402

TOL = 1e-4
SIZE = 320


@pytest.fixture(scope="module")
def fasterrcnn(tmp_path_factory):
    """torchvision's fasterrcnn_mobilenet_v3_large_320_fpn with random weights, its batch norms
    calibrated on scenes: with the default running statistics the pyramid's maps are ~1e-8 and
    every detection gets the same score."""
    from camserve.export.detection import calibrate_batch_norms, export_detection

    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5).eval()
    calibrate_batch_norms(model.backbone.body, (SIZE, SIZE))
    out = tmp_path_factory.mktemp("frcnn")
    manifest = export_detection(model, out, input_size=SIZE, labels=["__background__", "a", "b", "c", "d"],
                                model_name="frcnn", min_score=0.0)
    return out, manifest, model


def _scene(seed: int) -> np.ndarray:
    from camserve.export.detection import _images

    return _images((SIZE, SIZE), seed)[0].numpy()


def test_export_records_kind_layer_and_parity(fasterrcnn):
    out, manifest, _ = fasterrcnn
    assert manifest.detection and manifest.kind == "detection"
    assert manifest.target_layers[0].name == "backbone" and manifest.target_layers[0].layout == "NCHW"
    parity = manifest.parity
    assert max(parity["detections"]) > 0 and max(parity["boxes_compared"]) > 0, parity
    for name in ("boxes", "scores", "activations_0"):
        assert parity["outputs"][name]["share_off"] <= parity["max_share_off"], parity
    # the forward-only graph (the benchmark's baseline) answers the same detections
    import onnxruntime as ort

    forward = ort.InferenceSession(str(out / manifest.forward_graph_file), providers=["CPUExecutionProvider"])
    image = _scene(5)
    boxes, scores, labels = forward.run(None, {"image": image})
    det = detection.DetectionSession(out).run(image)
    np.testing.assert_allclose(scores, det.scores[0], atol=1e-5)
    np.testing.assert_allclose(boxes, det.boxes[0], atol=1e-3)
    np.testing.assert_array_equal(labels, det.labels[0])


def test_eigencam_matches_the_oracle_on_the_same_activations(fasterrcnn):
    """pytorch-grad-cam's EigenCAM step by step (2-D projection, ReLU, scale) on ONNX Runtime's
    activations, against ours on the same arrays."""
    out, _, _ = fasterrcnn
    session = detection.DetectionSession(out, intra_op_threads=2)
    images = np.concatenate([_scene(1), _scene(2)])
    acts = session.run(images).activations
    ours = detection.eigencam_maps(acts, (SIZE, SIZE))
    raw = np.maximum(get_2d_projection(acts), 0)
    oracle = scale_cam_image(scale_cam_image(raw, (SIZE, SIZE)))  # per layer, then the mean of one layer
    assert ours.shape == oracle.shape == (2, SIZE, SIZE)
    assert np.abs(ours - oracle).max() <= TOL


def test_eigencam_matches_the_oracle_end_to_end(fasterrcnn):
    """The oracle's Faster R-CNN tutorial (EigenCAM over ``model.backbone`` with
    ``fasterrcnn_reshape_transform``) on the PyTorch model, against our graph + numpy."""
    out, _, model = fasterrcnn
    image = _scene(3)
    with pgc.EigenCAM(model, target_layers=[model.backbone], reshape_transform=fasterrcnn_reshape_transform) as cam:
        oracle = cam(torch.from_numpy(image), targets=[lambda _out: torch.zeros(())])
    ours = detection.eigencam_maps(detection.DetectionSession(out).run(image).activations, (SIZE, SIZE))
    assert np.abs(ours - oracle).max() <= TOL


def _renormalize_loop(cams: np.ndarray, index: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    out = np.zeros_like(cams)
    for i, (x1, y1, x2, y2) in zip(index, boxes):
        crop = cams[i, y1:y2, x1:x2]
        if crop.size:
            normed = (crop - crop.min()) / (1e-7 + crop.max() - crop.min())
            out[i, y1:y2, x1:x2] = np.maximum(out[i, y1:y2, x1:x2], normed)
    for i in range(len(out)):
        out[i] = (out[i] - out[i].min()) / (1e-7 + out[i].max() - out[i].min())
    return out


def test_renormalize_in_boxes_matches_a_loop_and_ignores_box_order():
    rng = np.random.default_rng(0)
    cams = rng.random((3, 40, 50)).astype(np.float32)
    raw = rng.uniform(-10, 60, size=(40, 4))
    boxes = detection.box_pixels(np.concatenate([np.minimum(raw[:, :2], raw[:, 2:]), np.maximum(raw[:, :2], raw[:, 2:])], 1), (40, 50))
    index = rng.integers(0, 2, size=40)  # image 2 has no box: all zero
    ours = detection.renormalize_in_boxes(cams, index, boxes)
    np.testing.assert_allclose(ours, _renormalize_loop(cams, index, boxes), atol=1e-6)
    assert not ours[2].any()
    order = rng.permutation(40)
    np.testing.assert_array_equal(ours, detection.renormalize_in_boxes(cams, index[order], boxes[order]))
    # outside every box the map is 0
    inside = np.zeros((40, 50), bool)
    for (x1, y1, x2, y2) in boxes[index == 0]:
        inside[y1:y2, x1:x2] = True
    assert not ours[0][~inside].any()


def test_box_pixels_truncate_and_clip():
    np.testing.assert_array_equal(detection.box_pixels(np.array([[-3.2, 1.9, 12.7, 99.0]]), (20, 10)), [[0, 1, 10, 20]])


def test_keep_filters_by_threshold_class_and_topk():
    det = detection.Detections(boxes=[np.zeros((4, 4)), np.zeros((0, 4))],
                               scores=[np.array([0.2, 0.9, 0.6, 0.7]), np.zeros(0)],
                               labels=[np.array([1, 2, 1, 3]), np.zeros(0, np.int64)], activations=np.zeros((2, 1, 1, 1)))
    assert [k.tolist() for k in detection.keep(det, 0.5)] == [[1, 3, 2], []]
    assert [k.tolist() for k in detection.keep(det, 0.1, classes=(1,))] == [[2, 0], []]
    assert [k.tolist() for k in detection.keep(det, 0.1, topk=2)] == [[1, 3], []]


def test_detector_graph_refuses_other_kinds(tmp_path):
    from _shapes_fixture import exported_shapes
    from camserve.errors import ManifestError

    export_dir, _ = exported_shapes()
    with pytest.raises(ManifestError, match="not a detector"):
        detection.DetectionSession(export_dir)


def test_eigencam_peaks_inside_the_detected_shape():
    """The trained shapes detector: its box and class are right, and the served map (EigenCAM
    of the backbone, renormalized in the detected box) peaks inside the shape's true box."""
    from camserve.demo import shapes
    from camserve.demo.detector import LABELS

    _, iou = shapes_detector()
    assert iou >= 0.5, f"box head mean IoU {iou:.2f}"
    out, manifest = exported_detector()
    session = detection.DetectionSession(out, intra_op_threads=2)
    data = shapes.make_shapes(100, shapes.HELDOUT_SEED_OFFSET + 5, manifest.input_size[0])
    images = data.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    result = detection.explain(session, images, threshold=0.0)
    labels = np.array([result.detections.labels[i][k[0]] for i, k in enumerate(result.kept)])
    assert (labels - 1 == data.labels).mean() >= 0.9 and LABELS[labels[0]] == shapes.CLASSES[labels[0] - 1]
    x, y = summarize(result.cams).peak.T
    b = data.boxes
    hits = (b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3])
    assert hits.mean() >= 0.90, f"peak inside the shape's box for {hits.mean():.0%} of 100 images"
    raw = summarize(detection.eigencam_maps(result.detections.activations, manifest.input_size)).peak
    raw_hits = (b[:, 0] <= raw[:, 0]) & (raw[:, 0] <= b[:, 2]) & (b[:, 1] <= raw[:, 1]) & (raw[:, 1] <= b[:, 3])
    assert raw_hits.mean() >= 0.90, f"raw EigenCAM peak inside the box for {raw_hits.mean():.0%}"


def _cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "camserve.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_exports_a_single_stage_detector_with_coco_labels(tmp_path):
    """ssdlite320_mobilenet_v3_large (single-stage) through the CLI: its last pyramid level is
    1x1, so the maps are taken at level 0; labels come from torchvision's COCO categories."""
    import json

    res = _cli("export", "torchvision:ssdlite320_mobilenet_v3_large", "--kind", "detection", "--fpn-level", "0",
               "--min-score", "0.0", "--out", str(tmp_path / "ssd"))
    assert res.returncode == 0, res.stderr
    assert "parity with PyTorch" in res.stderr and "exported detector ssdlite320_mobilenet_v3_large" in res.stdout
    manifest = json.loads((tmp_path / "ssd" / "manifest.json").read_text())
    assert manifest["kind"] == "detection" and manifest["input_size"] == [320, 320]
    assert manifest["labels"][1] == "person" and manifest["target_layers"][0]["shape"][1:] == [20, 20]
    session = detection.DetectionSession(tmp_path / "ssd", intra_op_threads=2)
    out = detection.explain(session, _scene(4), threshold=0.0)
    assert out.cams.shape == (1, 320, 320) and len(out.kept[0]) == len(out.detections.scores[0]) > 0


@pytest.mark.parametrize("args, needle", [
    (["--kind", "detection", "--target-layer", "backbone", "--target-layer", "rpn"], "one target layer"),
    (["--target-layer", "layer4", "--fpn-level", "0"], "--kind detection only"),
    (["--kind", "classifier"], "--target-layer is required"),
    (["--kind", "detection", "--extras", "boxscore,guided"], "a detector takes only --extras boxscore"),
    (["--target-layer", "backbone", "--extras", "boxscore"], "--extras boxscore applies to --kind detection only"),
])
def test_cli_detection_errors_exit_2(tmp_path, capsys, args, needle):
    from camserve.cli import main

    code = main(["export", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", *args, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err
