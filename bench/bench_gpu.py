"""The explain graph against the forward-only graph on a GPU (ONNX Runtime's CUDA provider),
and where the CAM post-processing is cheapest: on the host in numpy (camserve's request path)
or on the device in torch.

For each model (random weights, exported here with ``check=False``, or taken from
``--exports``): the forward-only graph (``forward.onnx``) and the explain graph
(``model.onnx``) in CUDA sessions, alternating (medians of ``--repeats``):

- ``forward``: image in, logits back to the host (``GraphSession.forward_logits``);
- ``explain graph``: image in, logits + activations + gradients back to the host;
- ``forward, IOBinding`` / ``explain graph, IOBinding``: the image bound on the device once,
  every output left on it (the fair pair: neither pays for the transfers);
- ``explain graph, no one-hot shortcut, IOBinding``: the same graph with
  :mod:`camserve.export.one_hot`'s two rewrites undone (:func:`without_shortcut`). On CUDA
  both read a value computed on the device from the CPU (``If``'s condition, ``TopK``'s
  ``k``), which can stall the stream where the forward is launch-bound; this row says
  whether they pay for themselves there as they do on the CPU;
- ``explain() + gradcam``: camserve's whole CAM call (graph + numpy post-processing);
- ``explain() + gradcam, device post``: the same with ``runtime.post_processing = device``
  (:mod:`camserve.cam.device`: the post-processing as an ONNX graph in the same provider,
  on the outputs left on the device; ``auto`` picks it on CUDA);
- ``gradcam post-processing``: numpy on the host (from host arrays) against torch on the
  device (from the IOBinding outputs, the map copied back), NCHW layers only, and camserve's
  ONNX post-processing graph on the device (every layout; maps and ratios copied back).

    python bench/bench_gpu.py [--models resnet50 vit_b_16] [--batches 1 8 32] [--repeats 20]
                              [--exports DIR ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from _alternate import medians  # noqa: E402  (first: it sets the BLAS threads)
import numpy as np  # noqa: E402

LAYERS = {"resnet50": "layer4.-1", "resnet18": "layer4.-1", "vit_b_16": "encoder.layers.-1.ln_1"}
#: "cpu" dry-runs this script where no GPU is (the same code paths on the CPU provider)
DEVICE = os.environ.get("BENCH_GPU_DEVICE", "cuda")
PROVIDERS = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"] if DEVICE == "cuda" else ["CPUExecutionProvider"]


def export(name: str, work: Path) -> Path:
    import torch
    import torchvision

    from camserve.export import export_model

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    for m in model.modules():  # zero-initialized heads (ViT) get random weights
        if isinstance(m, torch.nn.Linear) and not torch.any(m.weight):
            torch.nn.init.normal_(m.weight, std=0.02)
    out = work / name
    export_model(model, [LAYERS[name]], out, input_size=224, model_name=name, check=False)
    return out


def without_shortcut(src: Path, dst: Path) -> bool:
    """Write ``src`` (an explain graph) to ``dst`` with the one-hot shortcut undone: the ``If``
    replaced by its ``MatMul`` branch, ``TopK`` sorting every class again, and the nodes
    that fed only those removed. False (nothing written) where ``src`` has neither."""
    import onnx

    model = onnx.load(str(src))
    graph = model.graph
    nodes = list(graph.node)
    changed = False
    for i, node in enumerate(nodes):
        if node.op_type == "If" and node.input[0].endswith("__all_ranked"):
            branch = next(a.g for a in node.attribute if a.name == "else_branch")
            (matmul,) = branch.node
            nodes[i] = onnx.helper.make_node("MatMul", list(matmul.input), list(node.output), name=f"{node.name}__matmul")
            changed = True
        elif node.op_type == "TopK" and node.input[1].endswith("__k"):
            last = next((n for n in nodes if f"{node.output[1]}__last_rank" in n.output), None)  # Sub(K, 1)
            if last is not None:
                node.input[1] = last.input[0]  # K: every class
            else:  # exports before session 16: Min(wanted, K)
                node.input[1] = next(n for n in nodes if node.input[1] in n.output).input[1]
            changed = True
    if not changed:
        return False
    needed = {o.name for o in graph.output}
    kept: list = []
    for node in reversed(nodes):  # drop what nothing reads any more
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    needed.update(i for n in a.g.node for i in n.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    onnx.save(model, str(dst))
    return True


def torch_gradcam(acts: Any, grads: Any, size: tuple[int, int]) -> np.ndarray:
    """GradCAM on the device (NCHW): weights, weighted sum, ReLU, bilinear resize, min-max."""
    import torch

    cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = cam.amin(dim=(1, 2), keepdim=True)
    cam = (cam - lo) / (cam.amax(dim=(1, 2), keepdim=True) - lo + 1e-7)
    return cam.cpu().numpy()


def bench_model(directory: Path, batches: list[int], repeats: int) -> list[dict[str, Any]]:
    import onnxruntime as ort
    import torch

    from camserve.cam import explain
    from camserve.cam.methods import gradcam_weights
    from camserve.cam.scaling import combine_layers
    from camserve.pipeline.runtime import GraphSession

    session = GraphSession(directory, providers=PROVIDERS, post_processing="host")
    # the same graph with the gradient methods' post-processing in ONNX Runtime on its outputs
    # where they are (camserve.cam.device; what runtime.post_processing=auto picks on CUDA)
    on_device = GraphSession(directory, providers=PROVIDERS, post_processing="device")
    if DEVICE == "cuda" and "CUDAExecutionProvider" not in session.session.get_providers():
        raise RuntimeError(f"no CUDA provider in the session: {session.session.get_providers()}")
    m = session.manifest
    layer = m.target_layers[0]
    plain = None  # the graph without the one-hot shortcut, where it has one (written beside, not into, the export)
    plain_file = Path(tempfile.mkdtemp(prefix="camserve-gpu-plain-")) / "model.onnx"
    if without_shortcut(directory / "model.onnx", plain_file):
        plain = ort.InferenceSession(str(plain_file), session.options, providers=PROVIDERS)
    rows = []
    for n in batches:
        x = np.random.default_rng(n).standard_normal((n, 3, *m.input_size)).astype(np.float32)
        cot = np.zeros((n, m.num_outputs), np.float32)
        rank = np.zeros(n, np.int64)
        binding = session.session.io_binding()
        binding.bind_ortvalue_input("image", ort.OrtValue.ortvalue_from_numpy(x, DEVICE, 0))
        binding.bind_cpu_input("cotangent", cot)
        binding.bind_cpu_input("target_rank", rank)
        names = [o.name for o in session.session.get_outputs()]
        # outputs into torch buffers on the device (shapes from one run)
        shapes = [o.shape for o in session.session.run(None, {"image": x, "cotangent": cot, "target_rank": rank})]
        buffers = [torch.empty(s, dtype=torch.float32, device=DEVICE) for s in shapes]
        for name, buf in zip(names, buffers):
            binding.bind_output(name, DEVICE, 0, np.float32, list(buf.shape), buf.data_ptr())

        def bound() -> None:
            session.session.run_with_iobinding(binding)

        if plain is not None:  # the same bindings on the graph without the one-hot shortcut
            pbinding = plain.io_binding()
            pbinding.bind_ortvalue_input("image", ort.OrtValue.ortvalue_from_numpy(x, DEVICE, 0))
            pbinding.bind_cpu_input("cotangent", cot)
            pbinding.bind_cpu_input("target_rank", rank)
            pbuffers = [torch.empty(s, dtype=torch.float32, device=DEVICE) for s in shapes]
            for name, buf in zip(names, pbuffers):
                pbinding.bind_output(name, DEVICE, 0, np.float32, list(buf.shape), buf.data_ptr())
            plain.run_with_iobinding(pbinding)
            bound()
            worst = max(float((a - b).abs().max()) for a, b in zip(buffers, pbuffers))
            print(f"{m.model_name} N={n}: without the shortcut the outputs differ by at most {worst:.2e}", file=sys.stderr, flush=True)

        forward = session.forward  # the forward-only graph, bound the same way: image and logits on the device
        fbinding = forward.io_binding()
        fbinding.bind_ortvalue_input("image", ort.OrtValue.ortvalue_from_numpy(x, DEVICE, 0))
        logits_buf = torch.empty(shapes[0], dtype=torch.float32, device=DEVICE)
        fbinding.bind_output("logits", DEVICE, 0, np.float32, list(logits_buf.shape), logits_buf.data_ptr())

        def forward_bound() -> None:
            forward.run_with_iobinding(fbinding)

        host = session.run(x, cot, target_rank=rank)
        left = on_device.run_on_device(x, cot, target_rank=rank)  # activations and gradients stay on the device
        calls = {
            "forward": lambda: session.forward_logits(x),
            "explain graph": lambda: session.run(x, cot, target_rank=rank),
            "forward, IOBinding": forward_bound,
            "explain graph, IOBinding": bound,
            **({"explain graph, no one-hot shortcut, IOBinding": lambda: plain.run_with_iobinding(pbinding)} if plain is not None else {}),
            "explain() + gradcam": lambda: explain(session, x, [[3]] * n, ["gradcam"]),
            "explain() + gradcam, device post": lambda: explain(on_device, x, [[3]] * n, ["gradcam"]),
            "gradcam post, ONNX (device)": lambda: on_device.post.run("gradcam", left.values, tuple(m.input_size)),
        }
        if layer.layout == "NCHW":
            calls["gradcam post, numpy (host)"] = lambda: combine_layers(
                [np.maximum((gradcam_weights(host.activations[0], host.gradients[0])[:, :, None, None]
                             * host.activations[0]).sum(axis=1), 0)], tuple(m.input_size))
            calls["gradcam post, torch (device)"] = lambda: torch_gradcam(buffers[1], buffers[2], tuple(m.input_size))
        med = medians(calls, repeats)
        base = med["forward"]
        for name, seconds in med.items():
            rows.append({"model": m.model_name, "batch": n, "run": name, "ms": seconds * 1000, "vs_forward": seconds / base})
            print(f"{m.model_name} N={n} {name:30s} {seconds * 1000:8.2f} ms {seconds / base:6.2f}x", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet50", "vit_b_16"], help="models to export here (none: --exports only)")
    parser.add_argument("--exports", nargs="*", default=[], help="export directories to bench instead of exporting")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch  # its CUDA libraries first: ONNX Runtime's CUDA provider uses the same ones

    if DEVICE == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}; torch {torch.__version__}, "
          f"cuda {torch.cuda.is_available()}", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="camserve-gpu-"))
    dirs = [Path(d) for d in args.exports]
    for name in args.models:
        start = time.perf_counter()
        try:
            dirs.append(export(name, work))
            print(f"exported {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - the other models still run
            print(f"export of {name} failed: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr, flush=True)
    rows = []
    for d in dirs:
        rows += bench_model(d, args.batches, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print("| model | N | run | ms | / forward |\n|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['run']} | {r['ms']:.2f} | {r['vs_forward']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
