"""Issue 15, gradient methods of a detection's score (the ``boxscore`` extra): RoIAlign as
matrices against torchvision's pooler, the exported route against torch autograd (in the
export's own check), the served maps against pytorch-grad-cam's GradCAM of the same score,
the answer's shape, and the 400s where the extra is missing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from _server_fixture import png_bytes
from camserve.errors import ExportError
from camserve.pipeline import box_score, detection
from camserve.pipeline.request import Request
from camserve.pipeline.service import Service

pgc = pytest.importorskip("pytorch_grad_cam")

SIZE = 320
LABELS = ["__background__", "a", "b", "c", "d"]


@pytest.fixture(scope="module")
def fasterrcnn(tmp_path_factory):
    """torchvision's fasterrcnn_mobilenet_v3_large_320_fpn, random weights with calibrated batch
    norms, exported with the boxscore extra (the detector's own threshold lowered to 0)."""
    from camserve.export.detection import calibrate_batch_norms, export_detection

    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=len(LABELS)).eval()
    calibrate_batch_norms(model.backbone.body, (SIZE, SIZE))
    out = tmp_path_factory.mktemp("frcnn-boxscore")
    manifest = export_detection(model, out, input_size=SIZE, labels=LABELS, model_name="frcnn", min_score=0.0,
                                extras=["boxscore"])
    return out, manifest, model


@pytest.fixture(scope="module")
def service(fasterrcnn):
    return Service(detection.DetectionSession(fasterrcnn[0], intra_op_threads=2))


def _scene(seed: int) -> np.ndarray:
    from camserve.export.detection import _images

    return _images((SIZE, SIZE), seed)[0].numpy()


def _ask(service, image_chw: np.ndarray, params: str):
    rgb = (image_chw[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)
    response = service.handle([Request({"body": png_bytes(rgb)}, "r", explain_route=True, header_params=params)])[0]
    return response.status, json.loads(response.body)


def test_export_records_the_extra_with_its_route_checked(fasterrcnn):
    out, manifest, _ = fasterrcnn
    entry = manifest.extras["boxscore"]
    assert (out / entry["file"]).is_file() and entry["outputs"] == ["scores", "gradients"]
    geom = box_score.Geometry.from_dict(entry["geometry"])
    assert geom.names == ("0", "1") and geom.shapes == ((256, 10, 10), (256, 10, 10))
    assert geom.transformed_size == (SIZE, SIZE) and geom.output_size == 7 and geom.sampling_ratio == 2
    parity = entry["parity"]
    assert parity["boxes"] >= 8 and parity["max_rel_gradient_diff"] <= 1e-4 and parity["max_score_diff"] <= 1e-4
    import onnx

    names = [o.name for o in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.output]
    assert names == ["boxes", "scores", "labels", "activations_0", "rois", "level_0", "level_1"]


def test_roi_matrices_are_torchvisions_multiscale_roi_align():
    """Three levels (strides 4, 8, 16), boxes of every size, partly outside the image, thin and
    at the border: the matrices' pooling and level choice are torchvision's."""
    from torchvision.ops import MultiScaleRoIAlign

    rng = np.random.default_rng(0)
    feats = {n: torch.from_numpy(rng.standard_normal((1, 8, s, s)).astype(np.float32)) for n, s in (("a", 128), ("b", 64), ("c", 32))}
    x1y1 = rng.uniform(-20, 500, (96, 2))
    wh = np.exp(rng.uniform(np.log(0.3), np.log(500), (96, 2)))
    rois = np.concatenate([x1y1, x1y1 + wh], axis=1).astype(np.float32)
    rois[:4] = [[0, 0, 512, 512], [511.5, 0, 512, 40], [-5, -5, 2, 2], [60, 60, 60.2, 61]]
    pooler = MultiScaleRoIAlign(["a", "b", "c"], 7, 2)
    with torch.no_grad():
        ref = pooler(feats, [torch.from_numpy(rois)], [(512, 512)]).numpy()
    geom = box_score.Geometry(names=("a", "b", "c"), shapes=((8, 128, 128), (8, 64, 64), (8, 32, 32)),
                              scales=tuple(pooler.scales), k_min=pooler.map_levels.k_min, k_max=pooler.map_levels.k_max,
                              canonical_scale=224.0, canonical_level=4.0, eps=1e-6, sampling_ratio=2, output_size=7,
                              transformed_size=(512, 512))
    level, mats = box_score.roi_matrices(geom, rois)
    np.testing.assert_array_equal(level, pooler.map_levels([torch.from_numpy(rois)]).numpy())
    assert len(set(level.tolist())) == 3
    ours = box_score.pool([f.numpy()[0] for f in feats.values()], mats)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam"])
def test_maps_match_pytorch_grad_cam_on_each_detections_score(fasterrcnn, method):
    """pytorch-grad-cam on the eager model, target layer the FPN block whose output the box head
    pools (every box of this detector maps to level 0), target the detection's score."""
    out, _, model = fasterrcnn
    session = detection.DetectionSession(out, intra_op_threads=2)
    image = _scene(7)
    ours = detection.explain(session, image, threshold=0.0, topk=4, methods=(method,))
    kept, cams = ours.kept[0], ours.box_cams[method][0]
    with torch.no_grad():
        eager = model(list(torch.from_numpy(image)))[0]
    cls = {"gradcam": pgc.GradCAM, "hirescam": pgc.HiResCAM, "layercam": pgc.LayerCAM}[method]
    checked = 0
    for j, d in enumerate(kept):
        score = ours.detections.scores[0][d]
        tied = np.sum(np.abs(ours.detections.scores[0] - score) < 1e-6) > 1
        match = np.flatnonzero(np.abs(eager["scores"].numpy() - score) < 1e-5)
        if tied or len(match) != 1:
            continue
        with cls(model, target_layers=[model.backbone.fpn.layer_blocks[0]]) as cam:
            ref = cam(torch.from_numpy(image), targets=[lambda o, k=int(match[0]): o["scores"][k]])[0]
        np.testing.assert_allclose(cams[j], ref, atol=1e-4)
        checked += 1
    assert checked >= 2


def test_maps_taken_in_chunks_are_the_same(fasterrcnn, monkeypatch):
    """Boxes one at a time (the memory bound met at its smallest) give the maps of all at once."""
    session = detection.DetectionSession(fasterrcnn[0], intra_op_threads=2)
    image = _scene(9)
    whole = detection.explain(session, image, threshold=0.0, topk=6, methods=("gradcam++", "hirescam"))
    monkeypatch.setattr(box_score, "CHUNK_BYTES", 1)
    single = detection.explain(session, image, threshold=0.0, topk=6, methods=("gradcam++", "hirescam"))
    for method in ("gradcam++", "hirescam"):
        assert whole.box_cams[method][0].shape == (6, SIZE, SIZE)
        np.testing.assert_allclose(single.box_cams[method][0], whole.box_cams[method][0], rtol=0, atol=1e-6)


def test_answer_has_one_explanation_per_detection_and_method(service):
    status, body = _ask(service, _scene(11), "methods=gradcam,eigencam,hirescam&target=top3&threshold=0.01&output=summary,png,overlay")
    assert status == 200, body
    image = body["images"][0]
    found = image["predictions"]
    assert len(found) == 3
    methods = [e["method"] for e in image["explanations"]]
    assert methods == ["gradcam"] * 3 + ["eigencam"] + ["hirescam"] * 3
    for e in image["explanations"]:
        assert e["png"] and e["overlay"] and not e["summary"]["degenerate"]
        if e["method"] != "eigencam":
            d = found[e["target"]["detection"]]
            assert {k: e["target"][k] for k in ("index", "label", "score")} == {k: d[k] for k in ("index", "label", "score")}
    hires = [e for e in image["explanations"] if e["method"] == "hirescam"]
    for e in hires:  # its gradient lives where the proposal was pooled: the peak is near the detection
        x, y = e["summary"]["peak"]
        x1, y1, x2, y2 = found[e["target"]["detection"]]["box"]
        assert x1 - 64 <= x <= x2 + 64 and y1 - 64 <= y <= y2 + 64


def test_methods_need_the_extra_and_a_two_stage_detector(fasterrcnn, tmp_path):
    from _detection_fixture import exported_detector, shapes_detector

    toy = Service(detection.DetectionSession(exported_detector()[0], intra_op_threads=1))
    status, body = _ask(toy, np.zeros((1, 3, 64, 64), np.float32), "methods=gradcam")
    assert status == 400 and "--extras boxscore" in body["error"]["message"], body
    status, body = _ask(toy, np.zeros((1, 3, 64, 64), np.float32), "methods=fullgrad")
    assert status == 400 and "eigencam" in body["error"]["message"], body
    from camserve.export.detection import export_detection

    with pytest.raises(ExportError, match="two-stage detector"):
        export_detection(shapes_detector()[0], tmp_path / "toy", input_size=64, labels=["bg", "a", "b", "c"],
                         extras=["boxscore"], check=False)
    with pytest.raises(ExportError, match="unknown extra 'fullgrad' for a detector"):
        export_detection(fasterrcnn[2], tmp_path / "x", input_size=SIZE, extras=["fullgrad"], check=False)


def test_cli_refuses_the_extra_for_a_single_stage_detector(tmp_path, capsys):
    from camserve.cli import main

    code = main(["export", "torchvision:ssdlite320_mobilenet_v3_large", "--kind", "detection", "--extras", "boxscore",
                 "--out", str(tmp_path / "ssd")])
    err = capsys.readouterr().err
    assert code == 2 and "needs a two-stage detector" in err and err.count("\n") == 1, err
    assert not (tmp_path / "ssd" / "manifest.json").exists()


@pytest.mark.server
def test_served_on_torchserve(fasterrcnn, service, tmp_path):
    from _server_fixture import http, serving

    image = _scene(13)
    params = "methods=gradcam,hirescam&target=top2&threshold=0.01&output=summary,array"
    with serving({"frcnn": fasterrcnn[0]}, tmp_path) as instance:
        rgb = (image[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)
        status, _, body = http("POST", f"{instance.inference_url}/explanations/frcnn", png_bytes(rgb),
                               {"Content-Type": "image/png", "X-Camserve-Params": params,
                                "Authorization": f"Bearer {instance.key('inference')}"})
    served = json.loads(body)
    assert status == 200, served
    _, expected = _ask(service, image, params)
    assert served["images"] == expected["images"]
    assert [e["method"] for e in served["images"][0]["explanations"]] == ["gradcam"] * 2 + ["hirescam"] * 2


@pytest.mark.server
def test_served_on_kserve_with_the_audit_record(fasterrcnn, service, tmp_path):
    import importlib.util

    from _server_fixture import kserve_explain, without_field

    if importlib.util.find_spec("kserve") is None:
        pytest.skip("camserve[kserve] is not installed")
    from camserve.audit import open_sink
    from camserve.cli import kserve as kserve_cli
    from camserve.config import AuditConfig

    image = _scene(17)
    rgb = (image[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)
    try:
        state = kserve_cli.start([str(fasterrcnn[0])], run_dir=tmp_path / "ks", names=["frcnn"], http_port=0, grpc_port=0, grpc=False)
        status, answer = kserve_explain(state["url"], "frcnn", png_bytes(rgb),
                                        {"methods": "layercam", "target": "top2", "threshold": 0.01, "output": "summary"})
        assert status == 200, answer[:300]
        _, expected = _ask(service, image, "methods=layercam&target=top2&threshold=0.01&output=summary")
        assert without_field(json.loads(answer)["explanations"]) == without_field(expected["images"])
        sink = open_sink(AuditConfig(path=str(tmp_path / "ks" / "audit")))
        try:
            record = list(sink.rows())[-1].record()
        finally:
            sink.close()
        targets = [e["target"]["detection"] for e in record["images"][0]["explanations"]]
        assert targets == [0, 1] and all(e["method"] == "layercam" for e in record["images"][0]["explanations"])
    finally:
        kserve_cli.stop(tmp_path / "ks")
