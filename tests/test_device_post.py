"""Post-processing as an ONNX graph (camserve.cam.device): the numpy path's maps and signal
ratios from ONNX Runtime (here its CPU provider), through explain() and the request pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _device_twin import assert_same_explanations
from _server_fixture import png_bytes, sample_image, tiny_export
from camserve import cam
from camserve.cam.device import DEVICE_METHODS, DevicePost, post_graph
from camserve.cam.explain import _array_cams
from camserve.cam.registry import get_method
from camserve.config import ConfigError, RuntimeConfig, load_config
from camserve.manifest import LayerSpec
from camserve.pipeline.render import from_float16
from camserve.pipeline.request import Request
from camserve.pipeline.runtime import DeviceOutputs, GraphOutputs, GraphSession, cuda_available, session_options
from camserve.pipeline.service import Service

LAYOUTS = {
    "nchw": [LayerSpec("l", "NCHW", (24, 7, 7))],
    "two-layers": [LayerSpec("a", "NCHW", (16, 14, 14)), LayerSpec("b", "NCHW", (24, 7, 7))],
    "tokens": [LayerSpec("t", "tokens", (50, 20), grid=(7, 7), prefix_tokens=1)],
    "nhwc": [LayerSpec("h", "NHWC", (7, 5, 12))],
    "input-size": [LayerSpec("s", "NCHW", (8, 32, 32))],
}
SIZE = (32, 32)


def _arrays(layers, rng, nonnegative):
    acts = [rng.standard_normal((4, *spec.shape), dtype=np.float32) for spec in layers]
    if nonnegative:  # after a ReLU, the common case (numpy takes a shortcut there)
        acts = [np.maximum(a, 0) for a in acts]
    grads = [rng.standard_normal((4, *spec.shape), dtype=np.float32) * np.float32(1e-3) for spec in layers]
    for g in grads:
        g[1] = 0  # a row with no gradient: an empty map, ratio 1
    return acts, grads


def _interleave(acts, grads):
    return [v for pair in zip(acts, grads) for v in pair]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("nonnegative", [True, False])
def test_graph_matches_numpy_for_every_method(layout, nonnegative):
    layers = LAYOUTS[layout]
    acts, grads = _arrays(layers, np.random.default_rng(len(layout)), nonnegative)
    post = DevicePost(layers, session_options(1), ["CPUExecutionProvider"])
    out = GraphOutputs(np.zeros((4, 3), np.float32), acts, grads)
    for method in DEVICE_METHODS:
        want_cam, want_ratio = _array_cams(get_method(method), out, acts, layers, False, SIZE)
        got_cam, got_ratio = post.run(method, _interleave(acts, grads), SIZE)
        assert got_cam.shape == want_cam.shape and got_cam.dtype == np.float32, method
        # XGradCAM divides by each channel's activation sum, which signed noise can bring near 0
        tol = 1e-4 if method == "xgradcam" and not nonnegative else 1e-5
        np.testing.assert_allclose(got_cam, want_cam, atol=tol, rtol=0, err_msg=method)
        assert got_ratio.dtype == np.float64
        np.testing.assert_allclose(got_ratio, want_ratio, rtol=1e-4, err_msg=method)
        assert got_ratio[1] == 1.0  # zero gradient: empty, not degenerate


def test_nan_rows_give_nan_ratios_and_leave_the_others_alone():
    layers = LAYOUTS["two-layers"]
    acts, grads = _arrays(layers, np.random.default_rng(7), True)
    acts[1][2, 0, 0, 0] = np.nan  # row 2, second layer only
    post = DevicePost(layers, session_options(1), ["CPUExecutionProvider"])
    out = GraphOutputs(np.zeros((4, 3), np.float32), acts, grads)
    for method in ("gradcam", "hirescam"):
        want_cam, want_ratio = _array_cams(get_method(method), out, acts, layers, False, SIZE)
        got_cam, got_ratio = post.run(method, _interleave(acts, grads), SIZE)
        assert np.isnan(want_ratio[2]) and np.isnan(got_ratio[2]) and np.isnan(got_cam[2]).any()
        keep = [0, 1, 3]
        np.testing.assert_allclose(got_ratio[keep], want_ratio[keep], rtol=1e-4)
        np.testing.assert_allclose(got_cam[keep], want_cam[keep], atol=1e-5, rtol=0)


def test_unknown_method_is_refused_by_name():
    with pytest.raises(ValueError, match="'eigencam' has no device post-processing"):
        post_graph("eigencam", LAYOUTS["nchw"], SIZE)
    assert not DevicePost.supports("gradcam", eigen_smooth=True)  # a projection: numpy
    assert DevicePost.supports("layercam", eigen_smooth=False)


@pytest.fixture(scope="module")
def sessions(resnet18_export):
    out, _, _ = resnet18_export
    return (GraphSession(out, intra_op_threads=1, post_processing="host"),
            GraphSession(out, intra_op_threads=1, post_processing="device"))


class Spy:
    """Records what run_on_device answered, to see whether the arrays came to the host."""

    def __init__(self, session):
        self.session, self.answers = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run_on_device(self, *args, **kwargs):
        answer = self.session.run_on_device(*args, **kwargs)
        self.answers.append(answer)
        return answer


@pytest.mark.parametrize("methods, options, host_copies", [
    (list(DEVICE_METHODS), {}, [False]),
    (["gradcam", "eigencam", "fem"], {}, [True]),  # activation methods read the arrays in numpy
    (["finercam", "hirescam"], {}, [False, False]),  # FinerCAM: GradCAM's graph on its own run
    (["finercam", "kpcacam"], {}, [False]),  # no main gradient run: a forward, then FinerCAM's on the device
    (["gradcam", "layercam"], {"aug_smooth": True}, [False]),
    (["gradcam", "hirescam"], {"eigen_smooth": True}, []),  # projections: all in numpy
])
def test_explain_on_the_device_answers_what_numpy_answers(sessions, methods, options, host_copies):
    host, device = sessions
    assert host.post is None and device.post is not None
    spy = Spy(device)
    images = np.random.default_rng(3).standard_normal((3, 3, 64, 64), dtype=np.float32)
    targets = [cam.TopK(2), [5, 7], cam.TopK(1)]
    want = cam.explain(host, images, targets, methods, **options)
    got = cam.explain(spy, images, targets, methods, **options)
    assert_same_explanations(got, want, methods)
    # which runs left their arrays on the device, and which of those were copied to the host
    assert all(isinstance(a, DeviceOutputs) for a in spy.answers)
    assert [("_host" in vars(a)) for a in spy.answers] == host_copies


@pytest.mark.parametrize("score", ["softmax", "logit"])
def test_a_score_target_is_post_processed_on_the_device_too(sessions, score):
    host, device = sessions
    images = np.random.default_rng(5).standard_normal((2, 3, 64, 64), dtype=np.float32)
    methods = ["gradcam", "layercam", "kpcacam"]
    assert_same_explanations(cam.explain(device, images, [[1, 2], cam.TopK(1)], methods, score=score),
                             cam.explain(host, images, [[1, 2], cam.TopK(1)], methods, score=score), methods)


def test_the_request_pipeline_answers_the_same_maps(tmp_path):
    export = tiny_export(tmp_path)
    answers = []
    for where in ("host", "device"):
        service = Service(GraphSession(export, intra_op_threads=1, post_processing=where))
        request = Request({"body": png_bytes(sample_image(4))}, "r", explain_route=True,
                          header_params="output=array&target=topk&topk=2&methods=gradcam++,hirescam")
        (response,) = service.handle([request])
        assert response.status == 200, response.body
        answers.append(json.loads(response.body))
    host, device = (a["images"][0] for a in answers)
    assert device["predictions"] == host["predictions"]
    assert len(device["explanations"]) == len(host["explanations"]) == 4
    for h, d in zip(host["explanations"], device["explanations"]):
        assert (h["method"], h["target"]) == (d["method"], d["target"])
        assert d["summary"]["signal_ratio"] == pytest.approx(h["summary"]["signal_ratio"], rel=1e-3)
        # float16 in the answer: equal within its rounding at 1
        np.testing.assert_allclose(from_float16(d["array"]), from_float16(h["array"]), atol=1e-3)


def test_where_post_processing_runs_is_configured_and_checked(resnet18_export):
    assert load_config(env={"CAMSERVE_RUNTIME_POST_PROCESSING": "device"}).runtime.post_processing == "device"
    assert RuntimeConfig().post_processing == "auto"
    with pytest.raises(ConfigError, match="runtime.post_processing must be auto, host or device, got 'gpu'"):
        RuntimeConfig(post_processing="gpu")
    with pytest.raises(ValueError, match="got 'gpu'"):
        GraphSession(resnet18_export[0], post_processing="gpu")
    assert GraphSession(resnet18_export[0], intra_op_threads=1).post is None  # auto on a CPU: numpy


def test_the_torchserve_handler_takes_the_setting(tmp_path, monkeypatch):
    import importlib.util
    import types
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "camserve_handler", Path(__file__).resolve().parent.parent / "handler" / "camserve_handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    export = tiny_export(tmp_path)
    monkeypatch.setenv("CAMSERVE_AUDIT_ENABLED", "false")
    monkeypatch.delenv("CAMSERVE_CONFIG", raising=False)
    for where, on_device in (("device", True), ("host", False), ("auto", False)):  # auto: this host has no GPU
        monkeypatch.setenv("CAMSERVE_RUNTIME_POST_PROCESSING", where)
        handler = module.CamserveHandler()
        handler.initialize(types.SimpleNamespace(system_properties={"model_dir": str(export)}, manifest={}, metrics=None))
        assert (handler.service.session.post is not None) is on_device, where


@pytest.mark.skipif(not cuda_available(), reason="needs a GPU and onnxruntime-gpu: the CUDA provider's kernels for these graphs")
def test_on_cuda_the_arrays_stay_on_the_gpu_and_the_maps_match(resnet18_export):
    host = GraphSession(resnet18_export[0], providers=["CPUExecutionProvider"], post_processing="host")
    gpu = GraphSession(resnet18_export[0], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu.device_type == "cuda" and gpu.post is not None  # auto: on the device under CUDA
    images = np.random.default_rng(8).standard_normal((3, 3, 64, 64), dtype=np.float32)
    left = gpu.run_on_device(images, target_rank=np.zeros(3, np.int64))
    assert all(v.device_name().lower() == "cuda" for v in left.values)
    methods = list(DEVICE_METHODS)
    got, want = (cam.explain(s, images, [cam.TopK(2)] * 3, methods) for s in (gpu, host))
    assert got.classes == want.classes
    for method in methods:  # two runtimes' convolutions: GPU float rounding, not the post-processing's
        for g, w in zip(got.cams[method], want.cams[method]):
            np.testing.assert_allclose(g, w, atol=1e-3, err_msg=method)
