"""The export step on small models: graph contract, parity, manifest, errors, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from camserve.errors import CamserveError, ExportError
from camserve.export import export_model, load_weights
from camserve.export.layouts import infer_layout
from camserve.export.resolve import resolve_layer
from camserve.manifest import Manifest, sha256_file
from camserve.pipeline.runtime import GraphSession


def _autograd(model: nn.Module, layer: nn.Module, image: torch.Tensor, cotangent: torch.Tensor):
    """Plain PyTorch: logits, the layer's output and d(sum(cot * logits))/d(output)."""
    saved = {}

    def hook(_m, _i, out):
        out.retain_grad()
        saved["act"] = out

    handle = layer.register_forward_hook(hook)
    image = image.clone().requires_grad_(True)  # so the layer output is part of the graph
    logits = model(image)
    handle.remove()
    (logits * cotangent).sum().backward()
    return logits.detach().numpy(), saved["act"].detach().numpy(), saved["act"].grad.numpy()


def test_graph_contract_and_manifest(resnet18_export):
    out, manifest, _ = resnet18_export
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()
    loaded = Manifest.load(out)
    assert loaded == manifest
    assert loaded.graph_sha256 == sha256_file(out / "model.onnx")
    assert loaded.input_size == (64, 64) and loaded.num_outputs == 1000
    (layer,) = loaded.target_layers
    assert (layer.name, layer.layout, layer.shape) == ("layer4.1", "NCHW", (512, 2, 2))
    assert loaded.opset >= 18 and loaded.ir_version <= 11
    assert {"torch", "onnx", "onnxruntime", "camserve"} <= set(loaded.packages)
    figures = loaded.parity["outputs"]
    assert set(figures) == {"logits", "activations_0", "gradients_0"}
    assert all(f["max_rel_err"] < 1e-4 for f in figures.values())
    sess = GraphSession(out)
    names = [i.name for i in sess.session.get_inputs()]
    assert names == ["image", "cotangent", "target_rank"]
    assert [o.name for o in sess.session.get_outputs()] == ["logits", "activations_0", "gradients_0"]


@pytest.mark.parametrize("batch", [1, 4])
def test_matches_autograd_and_gradients_follow_inputs(resnet18_export, batch):
    out, _, model = resnet18_export
    sess = GraphSession(out)
    _, layer = resolve_layer(model, "layer4.-1")
    rng = np.random.default_rng(batch)
    grads = []
    for _ in range(2):  # two different inputs: gradients must not be baked-in constants
        image = rng.standard_normal((batch, 3, 64, 64)).astype(np.float32)
        cot = rng.standard_normal((batch, 1000)).astype(np.float32)
        got = sess.run(image, cot)
        ref = _autograd(model, layer, torch.from_numpy(image), torch.from_numpy(cot))
        for ours, theirs in zip((got.logits, got.activations[0], got.gradients[0]), ref):
            np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())
        grads.append(got.gradients[0])
    assert not np.allclose(grads[0], grads[1])


def test_target_rank_is_one_hot_of_ranked_logit(resnet18_export):
    out, _, _ = resnet18_export
    sess = GraphSession(out)
    image = np.random.default_rng(3).standard_normal((3, 3, 64, 64)).astype(np.float32)
    ranked = sess.run(image, target_rank=np.array([0, 2, -1]))
    order = np.argsort(-ranked.logits, axis=1)
    cot = np.zeros((3, 1000), np.float32)
    cot[0, order[0, 0]] = 1.0
    cot[1, order[1, 2]] = 1.0
    explicit = sess.run(image, cot)
    np.testing.assert_allclose(ranked.gradients[0][:2], explicit.gradients[0][:2], rtol=1e-5, atol=1e-7)
    assert not np.any(ranked.gradients[0][2])  # rank -1 with a zero cotangent row
    assert np.any(ranked.gradients[0][0])


def test_head_graph_reproduces_logits(resnet18_export):
    out, manifest, _ = resnet18_export
    assert manifest.head_graph_file == "head.onnx" and manifest.head_inputs == ("activations",)
    sess = GraphSession(out)
    image = np.random.default_rng(4).standard_normal((2, 3, 64, 64)).astype(np.float32)
    res = sess.run(image)
    np.testing.assert_allclose(sess.head_logits(res.activations[0]), res.logits, rtol=1e-4, atol=1e-4)


def test_corrupted_graph_is_refused(resnet18_export, tmp_path):
    out, _, _ = resnet18_export
    for name in ("model.onnx", "manifest.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    with open(tmp_path / "model.onnx", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00" * 16)
    with pytest.raises(CamserveError, match="sha256"):
        GraphSession(tmp_path)


class TwoLayer(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))


def test_unknown_layer_lists_nearest_names():
    with pytest.raises(CamserveError, match=r"unknown target layer 'features\.9'.*features\.[0-2]"):
        resolve_layer(TwoLayer(), "features.9")
    with pytest.raises(CamserveError, match="nearest valid names: .*head"):
        resolve_layer(TwoLayer(), "haed")


def test_negative_index_resolves_to_canonical_name():
    assert resolve_layer(TwoLayer(), "features.-1")[0] == "features.2"


def test_several_layers_and_labels(tmp_path):
    torch.manual_seed(1)
    model = TwoLayer()
    m = export_model(model, ["features.0", "features.-1"], tmp_path, input_size=(16, 24), labels=list("abcd"))
    assert [lay.name for lay in m.target_layers] == ["features.0", "features.2"]
    assert [lay.shape for lay in m.target_layers] == [(8, 16, 24), (8, 8, 12)]
    assert m.labels == ("a", "b", "c", "d")
    assert all(p.requires_grad for p in model.parameters())  # the caller's model is left as it was
    res = GraphSession(tmp_path).run(np.ones((2, 3, 16, 24), np.float32), np.eye(4, dtype=np.float32)[:2])
    assert [a.shape for a in res.activations] == [(2, 8, 16, 24), (2, 8, 8, 12)]
    with pytest.raises(CamserveError, match="3 labels given but the model has 4 outputs"):
        export_model(model, ["features.0"], tmp_path / "x", input_size=16, labels=list("abc"))


class CumMaxHead(TwoLayer):
    def forward(self, x):
        return torch.cummax(self.head(self.features(x).mean(dim=(2, 3))), dim=1).values


def test_unexportable_op_is_named(tmp_path):
    with pytest.raises(ExportError, match="cummax"):
        export_model(CumMaxHead(), ["features.-1"], tmp_path, input_size=16, check=False)
    assert not (tmp_path / "model.onnx").exists()


class TupleLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.rnn(x.flatten(2).transpose(1, 2))
        return self.head(out[:, -1])


def test_layer_returning_tuple_is_named(tmp_path):
    with pytest.raises(ExportError, match="rnn|tuple"):
        export_model(TupleLayer(), ["rnn"], tmp_path, input_size=4)


def test_layout_inference():
    assert infer_layout("l", (2048, 7, 7), (224, 224)).layout == "NCHW"
    assert infer_layout("l", (7, 7, 768), (224, 224)).layout == "NHWC"
    vit = infer_layout("l", (197, 768), (224, 224))
    assert (vit.layout, vit.grid, vit.prefix_tokens) == ("tokens", (14, 14), 1)
    wide = infer_layout("l", (1 + 7 * 14, 64), (112, 224))
    assert (wide.grid, wide.prefix_tokens) == ((7, 14), 1)
    with pytest.raises(ExportError, match="neither"):
        infer_layout("l", (5,), (224, 224))


def test_weights_only_state_dict(tmp_path):
    torch.manual_seed(2)
    src = TwoLayer()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = TwoLayer()
    load_weights(dst, tmp_path / "w.pt")
    assert torch.equal(dst.head.weight, src.head.weight)
    torch.save({"bad": object()}, tmp_path / "evil.pt")  # arbitrary pickled object: refused, on one line
    with pytest.raises(CamserveError, match="weights_only load failed: UnpicklingError: .*object") as info:
        load_weights(TwoLayer(), tmp_path / "evil.pt")
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    torch.save({"head.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CamserveError, match="does not fit the model"):
        load_weights(TwoLayer(), tmp_path / "other.pt")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "camserve.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_export_and_errors(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"thing {i}" for i in range(1000)) + "\n")
    res = _cli("export", "torchvision:squeezenet1_1", "--target-layer", "features.12", "--labels", str(labels),
               "--input-size", "64", "--version", "2.1", "--out", str(tmp_path / "sq"))
    assert res.returncode == 0, res.stderr
    assert "parity with PyTorch autograd" in res.stderr
    manifest = json.loads((tmp_path / "sq" / "manifest.json").read_text())
    assert manifest["model_name"] == "squeezenet1_1" and manifest["model_version"] == "2.1"
    assert manifest["labels"][7] == "thing 7"

    bad = _cli("export", "torchvision:resnet18", "--target-layer", "layer5", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "unknown target layer 'layer5'" in bad.stderr and "layer4" in bad.stderr
    unknown = _cli("export", "torchvision:resnet51", "--target-layer", "layer4", "--out", str(tmp_path / "bad"))
    assert unknown.returncode == 2 and "resnet50" in unknown.stderr
    missing = _cli("export", "torchvision:resnet18", "--target-layer", "layer4", "--weights", str(tmp_path / "none.pt"),
                   "--out", str(tmp_path / "bad"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_factory_spec_and_bad_specs():
    from camserve.export import load_model

    assert isinstance(load_model("camserve.demo.shapes:build_model"), nn.Module)
    with pytest.raises(CamserveError, match="'nosuch.module:f'"):
        load_model("nosuch.module:f")
    with pytest.raises(CamserveError, match="not a torch.nn.Module"):
        load_model("camserve.errors:CamserveError")  # callable, but returns an exception, not a module
    with pytest.raises(CamserveError, match="must be 'torchvision:NAME'"):
        load_model("resnet50")


def test_parity_failure_writes_nothing(tmp_path, monkeypatch):
    from camserve.errors import ParityError
    from camserve.export import parity

    def off_by_a_lot(name, ours, ref, tol=parity.TOL):
        return {"max_rel_err": 0.5, "share_off": 0.2, "scale": 1.0}

    monkeypatch.setattr(parity, "compare", off_by_a_lot)
    with pytest.raises(ParityError, match="disagree"):
        export_model(TwoLayer(), ["features.-1"], tmp_path, input_size=16)
    assert list(tmp_path.iterdir()) == []
