"""FullGrad, ShapleyCAM, Guided Backprop and Guided Grad-CAM from ONNX Runtime outputs of the
extra graphs (``camserve export --extras``) vs pytorch-grad-cam 1.5.7 on the same weights.

torchvision's random init leaves every BatchNorm bias at 0 after folding (mean 0, var 1,
gamma 1, beta 0), which would make FullGrad's layer terms vanish; :func:`randomize_bn`
gives the BatchNorms random statistics first. Inputs are 64 px to keep exports at seconds;
the architectures are the full ones.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cam_reference import reinit_zero_linears, vit_reshape

pgc = pytest.importorskip("pytorch_grad_cam")
export = pytest.importorskip("camserve.export")
from pytorch_grad_cam.utils.image import deprocess_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget  # noqa: E402

from camserve.cam import TopK, explain  # noqa: E402
from camserve.cam.guided import deprocess  # noqa: E402
from camserve.cam.scaling import minmax, resize_maps  # noqa: E402
from camserve.export.extras import fullgrad_function  # noqa: E402
from camserve.pipeline.runtime import GraphSession, extra_session_options  # noqa: E402

TOL = 1e-4
SIZE = 64


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(c, generator=g))
    return model


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


class Exported:
    def __init__(self, model: nn.Module, layer: str, out_dir, extras: tuple[str, ...], reshape=None, check: bool = False):
        self.model, self.reshape = model.eval(), reshape
        from camserve.export.resolve import resolve_layer

        self.layer = resolve_layer(model, layer)[1]
        self.dir = out_dir
        export.export_model(model, [layer], out_dir, input_size=SIZE, model_name="t", extras=extras, check=check)
        for p in model.parameters():  # export_model leaves them requires_grad=False; pytorch-grad-cam needs a graph
            p.requires_grad_(True)
        self.session = GraphSession(out_dir, intra_op_threads=2)

    def ours(self, x: np.ndarray, classes: list[int], methods: list[str], **kw):
        return explain(self.session, x, [[c] for c in classes], methods, **kw)

    def reference(self, method: str, x: np.ndarray, classes: list[int], eigen_smooth: bool = False) -> np.ndarray:
        t = torch.from_numpy(x)
        with contextlib.redirect_stdout(io.StringIO()):
            if method == "fullgrad":
                cam = pgc.FullGrad(self.model, [])
                targets = [ClassifierOutputTarget(c) for c in classes]
            elif method == "shapleycam":
                cam = pgc.ShapleyCAM(self.model, [self.layer], reshape_transform=self.reshape)
                targets = [ClassifierOutputReST(c) for c in classes]
            else:
                cam = pgc.GradCAM(self.model, [self.layer], reshape_transform=self.reshape)
                targets = [ClassifierOutputTarget(c) for c in classes]
            # ShapleyCAM's double backward: CPU flash attention has none, the math kernel has
            # (the oracle fails on torchvision ViTs without this; camserve traces with it).
            with sdpa_kernel(SDPBackend.MATH):
                result = cam(t, targets, eigen_smooth=eigen_smooth)
            with contextlib.suppress(RuntimeError):  # 1.5.7's release() cannot detach ViT's views in place
                cam.activations_and_grads.release()
            return result

    def reference_guided(self, x: np.ndarray, classes: list[int]) -> np.ndarray:
        """pytorch-grad-cam's guided gradient [R, H, W, 3], one image at a time (it answers image 0).

        It swaps the model's ReLU modules and puts *new* ones back, so hooks on a ReLU target
        layer (vgg16's ``features.29``) stop firing afterwards: the model is copied first."""
        import copy

        model = pgc.GuidedBackpropReLUModel(copy.deepcopy(self.model), device="cpu")
        return np.stack([model(torch.from_numpy(x[i : i + 1]), target_category=c) for i, c in enumerate(classes)])


@contextlib.contextmanager
def functional_relus(masks: list[np.ndarray] | None = None):
    """While active, ``torch.nn.functional.relu`` appends its input to the yielded list (call
    order) and, given ``masks``, answers ``x * masks[i]``: :func:`camserve.export.kinks.relu_calls`
    for models whose ReLUs are functional (inception_v3's ``BasicConv2d``)."""
    import torch.nn.functional as F

    calls: list[torch.Tensor] = []
    original = F.relu

    def relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        calls.append(x.detach().clone())
        if masks is None:
            return original(x, inplace=inplace)
        return x * torch.from_numpy(masks[len(calls) - 1].astype(np.float32))

    F.relu = relu
    try:
        yield calls
    finally:
        F.relu = original


def fullgrad_on_graph_decisions(exp: Exported, x: np.ndarray, classes: list[int]) -> tuple[np.ndarray, int]:
    """pytorch-grad-cam's FullGrad with every ``nn.ReLU`` deciding on/off as ONNX Runtime's
    ``fullgrad.onnx`` did (same session options as served), and how many units that changed.

    A ReLU input within float rounding of 0 can land on either side in two float32 runtimes;
    the unit's gradient is then on in one and off in the other, and FullGrad's per-channel
    min-max scales that difference to the channel's full range (measured: resnet50 8.8e-4 and
    vgg16 2.8e-3 on one image each, from two and one such units, at 1.5e-7 and 3e-10 of their
    layer's scale). The export's parity check has the same rule (``camserve.export.kinks``);
    :func:`kinks.graph_masks` accepts the graph's decisions only where every unit they differ
    on is within 1e-5 of 0 relative to its layer, so a wrong graph still fails."""
    from camserve.export import kinks

    entry = exp.session.manifest.extras["fullgrad"]
    options = extra_session_options(2, entry.get("ort_level", "basic"), bool(entry.get("ort_prepacking", True)))
    probe = kinks.graph_relus(exp.dir / entry["file"], options)
    feeds = {"image": x, "cotangent": np.eye(10, dtype=np.float32)[classes], "target_rank": np.full(len(x), -1, np.int64)}
    with kinks.relu_calls(exp.model) as calls:
        exp.reference("fullgrad", x, classes)
    found = kinks.graph_masks(probe(feeds), calls, 1e-5)
    assert found is not None, "ONNX Runtime's ReLU decisions differ from PyTorch's beyond float rounding of 0"
    masks, flips = found
    with kinks.relu_calls(exp.model, masks):
        return exp.reference("fullgrad", x, classes), flips


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory) -> Exported:
    torch.manual_seed(3)
    model = randomize_bn(torchvision.models.resnet50(num_classes=10), 3)
    return Exported(model, "layer4", tmp_path_factory.mktemp("x-resnet50"), ("fullgrad", "guided", "shapley"))


@pytest.fixture(scope="module")
def vgg16(tmp_path_factory) -> Exported:
    torch.manual_seed(4)
    model = torchvision.models.vgg16(num_classes=10)
    model.avgpool = nn.AdaptiveAvgPool2d(2)  # 64 px inputs end at 2 x 2 after the five pools
    model.classifier[0] = nn.Linear(512 * 4, 4096)
    return Exported(model, "features.29", tmp_path_factory.mktemp("x-vgg16"), ("fullgrad", "guided", "shapley"))


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_fullgrad_and_shapleycam_match_the_oracle(name: str, request) -> None:
    exp: Exported = request.getfixturevalue(name)
    x, classes = images(2, 5), [3, 7]
    out = exp.ours(x, classes, ["fullgrad", "shapleycam"])
    for method in ("fullgrad", "shapleycam"):
        ours = np.concatenate(out.cams[method])
        ref = fullgrad_on_graph_decisions(exp, x, classes)[0] if method == "fullgrad" else exp.reference(method, x, classes)
        assert ref.max() > 0.5, f"{name} {method}: reference map is degenerate"
        diff = float(np.abs(ours - ref).max())
        assert diff <= TOL, f"{name} {method}: max abs diff {diff:.2e}"
    # FullGrad's math, exactly: the exported function run by PyTorch vs the oracle
    fn, _ = fullgrad_function(exp.model, (SIZE, SIZE))
    maps = fn(torch.from_numpy(x), torch.eye(10)[classes], torch.tensor([-1, -1]))[1:]
    eager = minmax(minmax(sum(resize_maps(m.detach().numpy(), (SIZE, SIZE)) for m in maps)))
    assert float(np.abs(eager - exp.reference("fullgrad", x, classes)).max()) <= TOL


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_guided_methods_match_the_oracle(name: str, request) -> None:
    exp: Exported = request.getfixturevalue(name)
    x, classes = images(2, 6), [1, 8]
    cam = exp.reference("gradcam", x, classes)  # first: the oracle's guided model puts new ReLU modules back
    gb = exp.session.run_extra("guided", x, np.eye(10, dtype=np.float32)[classes])["guided"].transpose(0, 2, 3, 1)
    ref_gb = exp.reference_guided(x, classes)
    scale = np.abs(ref_gb).max(axis=(1, 2, 3), keepdims=True)
    assert float((np.abs(gb - ref_gb) / scale).max()) <= TOL
    out = exp.ours(x, classes, ["guidedbackprop", "guidedgradcam"])
    for method, term in (("guidedbackprop", ref_gb), ("guidedgradcam", ref_gb * cam[..., None])):
        ours = np.concatenate(out.pictures[method])
        ref = np.stack([deprocess_image(t) for t in term])
        assert ours.shape == ref.shape == (2, SIZE, SIZE, 3)
        levels = np.abs(ours.astype(int) - ref.astype(int))
        assert levels.max() <= 1 and (levels > 0).mean() < 1e-3, f"{name} {method}: {levels.max()} levels"
        np.testing.assert_array_equal(deprocess(term), ref)  # the same formula on the oracle's own gradient


def test_fullgrad_without_biases_is_the_input_term(tmp_path) -> None:
    """Bias-free convs, no BatchNorm: no layer term, FullGrad is the input term alone."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, bias=False),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    exp = Exported(model, "2", tmp_path / "nobias", ("fullgrad",), check=True)
    assert exp.session.manifest.extras["fullgrad"]["outputs"] == ["logits", f"fullgrad_{SIZE}x{SIZE}"]
    x = images(2, 7)
    ours = np.concatenate(exp.ours(x, [0, 3], ["fullgrad"]).cams["fullgrad"])
    assert float(np.abs(ours - exp.reference("fullgrad", x, [0, 3])).max()) <= TOL


def test_shapleycam_on_vit_tokens(tmp_path) -> None:
    """pytorch-grad-cam 1.5.7 cannot run ShapleyCAM on token layouts (its base class rejects
    the un-reshaped 3-d activations: "Invalid activation shape. Get 3."), so the reference is
    its formula on PyTorch's own double backward: ``w_c = mean_ij (g - hvp / 2)`` after the
    token reshape, ``relu(sum_c w_c A_c)``, min-max, resize, min-max."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    from camserve.export.extras import shapley_function

    torch.manual_seed(6)
    model = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                                                 mlp_dim=64, num_classes=7)
    reinit_zero_linears(model)  # torchvision zero-initializes the head: no gradient at all
    exp = Exported(model, "encoder.layers.-1.ln_1", tmp_path / "vit", ("shapley",), reshape=vit_reshape(4))
    x, classes = images(2, 8), [2, 5]
    out = exp.ours(x, classes, ["shapleycam"])
    fn, _ = shapley_function(model, [exp.layer])
    with sdpa_kernel(SDPBackend.MATH):
        _, acts, grads = fn(torch.from_numpy(x), torch.eye(7)[classes], torch.tensor([-1, -1]))
    a, g = vit_reshape(4)(acts).detach().numpy(), vit_reshape(4)(grads).detach().numpy()
    per_layer = scale_cam_image(np.maximum((g.mean(axis=(2, 3))[:, :, None, None] * a).sum(axis=1), 0), (SIZE, SIZE))
    ref = scale_cam_image(np.maximum(per_layer, 0))  # the oracle's layer aggregation: ReLU, mean of one, min-max
    assert ref.max() > 0.5
    assert float(np.abs(np.concatenate(out.cams["shapleycam"]) - ref).max()) <= TOL


def test_topk_rows_and_eigen_smooth(resnet50: Exported) -> None:
    x = images(2, 9)
    out = explain(resnet50.session, x, [TopK(2), [4]], ["shapleycam", "fullgrad"], eigen_smooth=True)
    assert [len(c) for c in out.classes] == [2, 1]
    rows_x = x[[0, 0, 1]]
    classes = [c for cls in out.classes for c in cls]
    ref = resnet50.reference("shapleycam", rows_x, classes, eigen_smooth=True)
    assert float(np.abs(np.concatenate(out.cams["shapleycam"]) - ref).max()) <= TOL
    # FullGrad: eigen_smooth changes nothing in camserve (the graph sums the terms; see docs)
    plain = explain(resnet50.session, x, [TopK(2), [4]], ["fullgrad"])
    np.testing.assert_array_equal(np.concatenate(plain.cams["fullgrad"]), np.concatenate(out.cams["fullgrad"]))


def test_device_post_processing_explains_the_same(resnet50: Exported) -> None:
    """ShapleyCAM's extra graph leaves its arrays on the device for GradCAM's graph there
    (camserve.cam.device); the other extras' methods stay in numpy."""
    from _device_twin import assert_same_explanations, device_twin

    twin = device_twin(resnet50.session)
    calls = []
    original = twin.run_extra_on_device
    twin.run_extra_on_device = lambda name, *a, **k: calls.append(name) or original(name, *a, **k)
    x = images(2, 12)
    methods = ["shapleycam", "fullgrad", "guidedgradcam", "gradcam"]
    got = explain(twin, x, [TopK(1), [4, 6]], methods)
    assert_same_explanations(got, explain(resnet50.session, x, [TopK(1), [4, 6]], methods), methods)
    assert calls == ["shapley"]


def test_served_by_the_pipeline_and_refused_without_the_extra(tmp_path) -> None:
    """The methods go through the one request pipeline: maps, summaries, pictures; a method
    asked of an export without its extra is a 400 naming the export flag."""
    import base64
    import json

    import cv2

    from _server_fixture import png_bytes, sample_image, tiny_export, tiny_model
    from camserve.cli import main
    from camserve.pipeline.request import Request
    from camserve.pipeline.service import Service

    export.export_model(tiny_model(0), ["2"], tmp_path / "x", input_size=32, model_name="tiny",
                        labels=["a", "b", "c", "d", "e"], extras=("fullgrad", "guided", "shapley"), head=True, check=True)
    methods = "fullgrad,shapleycam,guidedbackprop,guidedgradcam"  # (the limit is 4 per request)
    request = Request({"image_0": png_bytes(sample_image(3))}, explain_route=True, images_only=True,
                      header_params=json.dumps({"methods": methods, "target": "topk", "topk": 2}))
    (response,) = Service(GraphSession(tmp_path / "x", intra_op_threads=1)).handle([request])
    assert response.status == 200, response.body[:300]
    entries = json.loads(response.body)["images"][0]["explanations"]
    assert sorted({e["method"] for e in entries}) == sorted(methods.split(",")) and len(entries) == 8
    for e in entries:
        assert e["summary"]["peak"] and "png" in e
        if e["method"].startswith("guided"):
            picture = cv2.imdecode(np.frombuffer(base64.b64decode(e["picture"]), np.uint8), cv2.IMREAD_UNCHANGED)
            assert picture.shape == (32, 32, 3)
    dff_request = Request({"image_0": png_bytes(sample_image(3))}, explain_route=True, images_only=True,
                          header_params=json.dumps({"methods": "dff", "components": 2}))
    (response,) = Service(GraphSession(tmp_path / "x", intra_op_threads=1)).handle([dff_request])
    concepts = json.loads(response.body)["images"][0]["explanations"]
    assert response.status == 200 and [e["concept"]["index"] for e in concepts] == [0, 1]
    assert all(len(e["concept"]["top_classes"]) == 2 and e["target"]["index"] == e["concept"]["top_classes"][0]["index"]
               for e in concepts)
    (refused,) = Service(GraphSession(tiny_export(tmp_path), intra_op_threads=1)).handle([request])
    error = json.loads(refused.body)["error"]
    assert refused.status == 400 and "--extras fullgrad" in error["message"], error
    with pytest.raises(SystemExit) as exit_:  # argparse: one line naming the value, exit 2
        main(["export", "torchvision:resnet18", "--target-layer", "layer4", "--extras", "fullgrad,bogus",
              "--out", str(tmp_path / "never")])
    assert exit_.value.code == 2


def test_dff_from_onnx_outputs_matches_the_oracle(tmp_path) -> None:
    """DFF through explain (activations from ONNX Runtime, concepts scored by the head graph)
    vs pytorch-grad-cam's DeepFeatureFactorization with the model's fc on one image."""
    torch.manual_seed(12)
    model = torchvision.models.resnet18(num_classes=10).eval()
    export.export_model(model, ["layer4"], tmp_path / "dff", input_size=SIZE, head=True, check=False)
    session = GraphSession(tmp_path / "dff", intra_op_threads=2)
    x = images(1, 13)
    out = explain(session, x, [[0]], ["dff"], components=4)
    with torch.no_grad():
        concepts, maps, scores = pgc.DeepFeatureFactorization(model, model.layer4, computation_on_concepts=model.fc)(
            torch.from_numpy(x), n_components=4)
    assert float(np.abs(out.cams["dff"][0] - maps[0]).max()) <= TOL
    probs = torch.softmax(torch.as_tensor(scores), dim=-1).numpy()
    top = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(out.concepts[0]["classes"], top)
    np.testing.assert_allclose(out.concepts[0]["scores"], np.take_along_axis(probs, top, 1), atol=1e-5)


@pytest.mark.slow
def test_fullgrad_on_inception_v3_where_the_oracle_breaks(tmp_path) -> None:
    """pytorch-grad-cam pairs bias layers with gradients by position and fails on inception_v3
    (#371: its auxiliary head's BatchNorms never run in eval, 96 biases vs 94 gradients).
    camserve pairs each output with its module: checked against a direct PyTorch FullGrad
    (gradients by module, per-channel min-max, cv2 resize, sum, min-max) on ONNX Runtime's
    ReLU decisions, to 1e-4 (2.1e-4 on PyTorch's own: a unit within rounding of 0)."""
    import cv2

    from camserve.export.extras import bias_layers

    torch.manual_seed(14)
    model = randomize_bn(torchvision.models.inception_v3(num_classes=10, init_weights=True), 14).eval()
    size = 96
    export.export_model(model, ["Mixed_7c"], tmp_path / "inc", input_size=size, extras=("fullgrad",), check=False)
    for p in model.parameters():
        p.requires_grad_(True)
    x = np.random.default_rng(15).standard_normal((1, 3, size, size)).astype(np.float32)
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(AssertionError):
        with pgc.FullGrad(model, []) as oracle:
            oracle(torch.from_numpy(x), [ClassifierOutputTarget(2)])

    session = GraphSession(tmp_path / "inc", intra_op_threads=2)
    ours = explain(session, x, [[2]], ["fullgrad"]).cams["fullgrad"][0][0]
    layers = dict((id(m), b) for m, b in bias_layers(model))

    def gradients(masks=None):
        """The input's and every bias layer's output gradient, by module."""
        outs: list = []
        # a copy goes on: BasicConv2d's in-place ReLU would otherwise turn the recorded BN output
        # into the ReLU's (pytorch-grad-cam's tensor hooks see the gradient before it, as here)
        hooks = [m.register_forward_hook(lambda m, _i, o: outs.append((m, o)) or o.clone()) for m, _ in bias_layers(model)]
        xt = torch.from_numpy(x).requires_grad_(True)
        with functional_relus(masks) as calls:
            logits = model(xt)
        for h in hooks:
            h.remove()
        return outs, torch.autograd.grad(logits[0, 2], [xt, *[o for _, o in outs]]), calls

    # on ONNX Runtime's ReLU decisions, as fullgrad_on_graph_decisions (BasicConv2d's are F.relu)
    from camserve.export import kinks

    entry = session.manifest.extras["fullgrad"]
    probe = kinks.graph_relus(tmp_path / "inc" / entry["file"], extra_session_options(2, entry["ort_level"]))
    found = kinks.graph_masks(probe({"image": x, "cotangent": np.eye(10, dtype=np.float32)[[2]],
                                     "target_rank": np.array([-1])}), gradients()[2], 1e-5)
    assert found is not None, "ONNX Runtime's ReLU decisions differ from PyTorch's beyond float rounding of 0"
    outs, grads, _ = gradients(found[0])

    def norm_resize(t: np.ndarray) -> np.ndarray:  # [C, h, w] -> sum_c resize(minmax(t_c))
        t = t - t.min(axis=(1, 2), keepdims=True)
        t = t / (1e-7 + t.max(axis=(1, 2), keepdims=True))
        return sum(cv2.resize(np.float32(c), (size, size)) for c in t)

    total = norm_resize(np.abs(x[0] * grads[0][0].numpy()))
    for (m, _), g in zip(outs, grads[1:]):
        total = total + norm_resize(np.abs(layers[id(m)][:, None, None].numpy() * g[0].numpy()))
    total = (total - total.min()) / (1e-7 + (total - total.min()).max())
    assert len(outs) == 94 and len(layers) == 96
    assert float(np.abs(ours - total).max()) <= TOL  # ONNX Runtime


@pytest.mark.parametrize("args", [((3, 3), (1, 1), (1, 1), True), ((3, 3), (2, 2), (1, 1), False),
                                  ((3, 3), (1, 1), (1, 1), False), ((2, 2), (2, 2), (0, 0), True)])
def test_avg_pool2d_backward_decomposition(args) -> None:
    """The input gradient an input-gradient graph traces through avg_pool2d (inception_v3)."""
    from camserve.export.decompositions import _avg_pool2d_input_grad

    kernel, stride, padding, count_pad = args
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    y = torch.nn.functional.avg_pool2d(x, kernel, stride, padding, False, count_pad)
    g = torch.randn_like(y)
    (ref,) = torch.autograd.grad(y, x, g)
    ours = _avg_pool2d_input_grad(g, x.detach(), list(kernel), list(stride), list(padding), False, count_pad)
    assert float((ours - ref).abs().max()) <= 1e-6
    with pytest.raises(NotImplementedError, match="ceil_mode"):
        _avg_pool2d_input_grad(g, x.detach(), list(kernel), list(stride), list(padding), True, count_pad)


def test_cli_lists_every_method_with_what_it_needs(capsys) -> None:
    from camserve.cam import available_methods
    from camserve.cli import main

    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in __import__("json").loads(capsys.readouterr().out)}
    assert list(rows) == available_methods()
    assert "--extras fullgrad" in rows["fullgrad"]["needs"] and "--head" in rows["dff"]["needs"]
