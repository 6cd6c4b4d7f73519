"""CAM post-processing as a small ONNX graph, run where the explain graph ran.

On a GPU the explain graph answers in 2-7 ms, and taking its activations and gradients to
the host and reducing them in numpy cost 0.4-2.5x that again (README, "On a GPU": GradCAM's
numpy post-processing 0.66 / 4.7 / 16.7 ms on resnet50 at N = 1 / 8 / 32, torch on the
device 0.5 / 0.7 / 1.2 ms). This module writes the summing gradient methods' whole
post-processing as an ONNX graph over the explain graph's outputs, so that the session runs
it in the same execution provider on outputs left on the device (IOBinding,
:meth:`camserve.pipeline.runtime.GraphSession.run_on_device`): only the final maps
``[R, H, W]`` and signal ratios ``[R]`` come back to the host. The request path stays free
of torch.

The graph is the numpy path op for op in float32 (:mod:`camserve.cam.methods`,
:mod:`camserve.cam.degenerate`, :mod:`camserve.cam.scaling`), per target layer ``l``::

    A, G    = to_nchw(activations_l), to_nchw(gradients_l)           # [R, C, h, w]
    raw     = sum_c w_c A_c  (weights)   or   sum_c E_c  (elements)   # [R, h, w]
    mag     = sum_c |w_c| |A_c|          or   sum_c |E_c|
    ratio_l = max |raw| / max mag   (1 where mag is 0 everywhere, nan where either holds nan)
    s_l     = R_v @ minmax(relu(raw)) @ R_w                           # cv2's INTER_LINEAR matrices
    cam     = minmax(s_0)  (one layer)   or   minmax(mean_l relu(s_l))
    ratio   = min_l ratio_l

Methods: the ones whose terms are elementwise and reductions: GradCAM, GradCAM++, XGradCAM,
HiResCAM, GradCAM element-wise and LayerCAM (:data:`DEVICE_METHODS`), and FinerCAM and
ShapleyCAM through GradCAM's graph on their own runs' arrays (FinerCAM's cotangent, the
``shapley`` extra graph), without ``eigen_smooth`` (a projection: SVD has no ONNX op).
Every other method, and these with smoothing, run in numpy as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from camserve.cam.registry import MethodSpec
from camserve.cam.scaling import EPS, cv2_linear_matrices
from camserve.manifest import LayerSpec

OPSET = 18
IR_VERSION = 8


class _Graph:
    """A tiny ONNX graph builder: each call appends one node and returns its output's name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def __call__(self, op: str, *inputs: str, **attrs: Any) -> str:
        self._count += 1
        out = f"{op.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        self._count += 1
        name = f"const_{self._count}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def axes(self, *axes: int) -> str:
        return self.const(list(axes), np.int64)

    def reduce(self, op: str, x: str, *axes: int, keep: bool = False) -> str:
        return self(op, x, self.axes(*axes), keepdims=int(keep))


# Channel terms (methods.py), on NCHW [R, C, h, w]: weights [R, C] or elements [R, C, h, w].


def _gradcam(g: _Graph, a: str, grad: str) -> str:
    return g.reduce("ReduceMean", grad, 2, 3)


def _gradcam_plus_plus(g: _Graph, a: str, grad: str) -> str:
    g2 = g("Mul", grad, grad)
    alpha = g("Mul", g("Mul", g2, grad), g.reduce("ReduceSum", a, 2, 3, keep=True))
    alpha = g("Add", g("Add", alpha, g("Mul", g2, g.const(2.0))), g.const(1e-6))
    return g.reduce("ReduceSum", g("Mul", g("Div", g2, alpha), g("Relu", grad)), 2, 3)


def _xgradcam(g: _Graph, a: str, grad: str) -> str:
    share = g("Div", g("Mul", grad, a), g("Add", g.reduce("ReduceSum", a, 2, 3, keep=True), g.const(1e-7)))
    return g.reduce("ReduceSum", share, 2, 3)


def _hirescam(g: _Graph, a: str, grad: str) -> str:
    return g("Mul", grad, a)


def _gradcam_elementwise(g: _Graph, a: str, grad: str) -> str:
    return g("Relu", g("Mul", grad, a))


def _layercam(g: _Graph, a: str, grad: str) -> str:
    return g("Mul", g("Relu", grad), a)


#: method -> (form, terms builder); the forms and terms of :mod:`camserve.cam.registry`
DEVICE_METHODS: dict[str, tuple[str, Callable[[_Graph, str, str], str]]] = {
    "gradcam": ("weights", _gradcam),
    "gradcam++": ("weights", _gradcam_plus_plus),
    "xgradcam": ("weights", _xgradcam),
    "hirescam": ("elements", _hirescam),
    "gradcamelementwise": ("elements", _gradcam_elementwise),
    "layercam": ("elements", _layercam),
}


def _to_nchw(g: _Graph, x: str, spec: LayerSpec) -> str:
    """:func:`camserve.cam.layouts.to_nchw` in ONNX."""
    if spec.layout == "NCHW":
        return x
    if spec.layout == "NHWC":
        return g("Transpose", x, perm=[0, 3, 1, 2])
    gh, gw = spec.grid or (0, 0)
    grid = g("Slice", x, g.axes(spec.prefix_tokens), g.axes(spec.shape[0]), g.axes(1))
    return g("Transpose", g("Reshape", grid, g.axes(0, gh, gw, spec.channels)), perm=[0, 3, 1, 2])


def _minmax(g: _Graph, x: str) -> str:
    """:func:`camserve.cam.scaling.minmax` over the last two axes of ``[R, h, w]``."""
    shifted = g("Sub", x, g.reduce("ReduceMin", x, 1, 2, keep=True))
    return g("Div", shifted, g("Add", g.reduce("ReduceMax", shifted, 1, 2, keep=True), g.const(EPS)))


def _resize(g: _Graph, x: str, src: tuple[int, int], size: tuple[int, int]) -> str:
    """:func:`camserve.cam.scaling.resize_maps`: ``R_v @ m @ R_w`` with cv2's own matrices."""
    if src == size:
        return x
    r_v, r_w = cv2_linear_matrices(src, size)
    return g("MatMul", g("MatMul", g.const(r_v), x), g.const(r_w))


def _ratio(g: _Graph, raw: str, magnitude: str) -> str:
    """:func:`camserve.cam.degenerate.cancellation_ratio` in float64, ``[R]``."""
    top = g("Cast", g.reduce("ReduceMax", g("Abs", raw), 1, 2), to=TensorProto.DOUBLE)
    scale = g("Cast", g.reduce("ReduceMax", magnitude, 1, 2), to=TensorProto.DOUBLE)
    ratio = g("Where", g("Equal", scale, g.const(0.0, np.float64)), g.const(1.0, np.float64), g("Div", top, scale))
    # numpy's max propagates nan; ONNX leaves it to the kernel, so say it: a nan in either
    # map makes its sums nan (both are sums of values >= 0 or nan).
    nan = g("IsNaN", g("Add", g.reduce("ReduceSum", g("Abs", raw), 1, 2), g.reduce("ReduceSum", magnitude, 1, 2)))
    return g("Where", nan, g.const(np.nan, np.float64), ratio)


def post_graph(method: str, layers: Sequence[LayerSpec], size: tuple[int, int]) -> onnx.ModelProto:
    """The post-processing graph of ``method`` over ``layers`` for images of ``size`` (H, W).

    Inputs ``activations_i`` and ``gradients_i`` as the explain graph answers them (each
    layer in its own layout, ``[R, *spec.shape]``); outputs ``cam`` float32 ``[R, H, W]`` in
    [0, 1] and ``ratio`` float64 ``[R]``, equal to ``explain``'s numpy maps and signal ratios
    up to float32 rounding."""
    if method not in DEVICE_METHODS:
        raise ValueError(f"method {method!r} has no device post-processing (those that do: {', '.join(DEVICE_METHODS)})")
    form, terms = DEVICE_METHODS[method]
    g = _Graph()
    inputs, scaled, ratios = [], [], []
    for i, spec in enumerate(layers):
        for kind in ("activations", "gradients"):
            inputs.append(helper.make_tensor_value_info(f"{kind}_{i}", TensorProto.FLOAT, ["R", *spec.shape]))
        a, grad = _to_nchw(g, f"activations_{i}", spec), _to_nchw(g, f"gradients_{i}", spec)
        t = terms(g, a, grad)
        if form == "weights":  # [R, C] over [R, C, h, w]: one batched matmul per map
            rows = g("Unsqueeze", t, g.axes(1))
            flat = g("Reshape", a, g.axes(0, spec.channels, -1))
            dims = g("Shape", a)
            shape = g("Concat", g("Slice", dims, g.axes(0), g.axes(1)), g("Slice", dims, g.axes(2), g.axes(4)), axis=0)  # [R, h, w]
            raw = g("Reshape", g("MatMul", rows, flat), shape)
            magnitude = g("Reshape", g("MatMul", g("Abs", rows), g("Abs", flat)), shape)
        else:
            raw = g.reduce("ReduceSum", t, 1)
            magnitude = g.reduce("ReduceSum", g("Abs", t), 1)
        ratios.append(_ratio(g, raw, magnitude))
        src = (spec.shape[1], spec.shape[2]) if spec.layout == "NCHW" else spec.grid if spec.layout == "tokens" else spec.shape[:2]
        scaled.append(_resize(g, _minmax(g, g("Relu", raw)), (int(src[0]), int(src[1])), size))
    if len(scaled) == 1:
        cam, ratio = _minmax(g, scaled[0]), ratios[0]
    else:
        stacked = g("Concat", *[g("Unsqueeze", s, g.axes(1)) for s in scaled], axis=1)
        cam = _minmax(g, g.reduce("ReduceMean", g("Relu", stacked), 1))
        # numpy's min propagates nan; the ratios are finite or nan, so their sum says if one is
        any_nan = g("IsNaN", g("Sum", *ratios))
        ratio = g("Where", any_nan, g.const(np.nan, np.float64), g("Min", *ratios))
    g.nodes.append(helper.make_node("Identity", [cam], ["cam"]))
    g.nodes.append(helper.make_node("Identity", [ratio], ["ratio"]))
    outputs = [helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["R", *size]),
               helper.make_tensor_value_info("ratio", TensorProto.DOUBLE, ["R"])]
    graph = helper.make_graph(g.nodes, f"camserve_post_{method}", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="camserve")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


class DevicePost:
    """Post-processing graphs of one export, one session per (method, size) built on first
    use (:class:`camserve.pipeline.runtime.GraphSession` asks for them at load), run on the
    explain graph's outputs where they are (``ort.OrtValue`` on the device, or numpy arrays)."""

    #: the methods it post-processes
    methods = tuple(DEVICE_METHODS)

    def __init__(self, layers: Sequence[LayerSpec], options: ort.SessionOptions, providers: list[Any]) -> None:
        self.layers = list(layers)
        self.options, self.providers = options, providers
        self._sessions: dict[tuple[str, tuple[int, int]], ort.InferenceSession] = {}
        self._lock = threading.Lock()

    @staticmethod
    def supports(method: str, eigen_smooth: bool) -> bool:
        """Whether ``method`` (with or without ``eigen_smooth``) runs here rather than in numpy."""
        return method in DEVICE_METHODS and not eigen_smooth

    @staticmethod
    def graph_for(spec: MethodSpec) -> str | None:
        """The graph that serves ``spec``: its own for the main run's gradient methods,
        GradCAM's for FinerCAM and ShapleyCAM (GradCAM's weights over their own run's arrays)."""
        return {"gradients": spec.name, "finer": "gradcam", "shapley": "gradcam"}.get(spec.source)

    def serves(self, spec: MethodSpec, eigen_smooth: bool) -> bool:
        """Whether ``spec``'s maps (with the request's ``eigen_smooth``) come from here."""
        name = self.graph_for(spec)
        return name is not None and self.supports(name, eigen_smooth and spec.eigen_smooth)

    def session(self, method: str, size: tuple[int, int]) -> ort.InferenceSession:
        key = (method, (int(size[0]), int(size[1])))
        with self._lock:
            if key not in self._sessions:
                model = post_graph(method, self.layers, key[1])
                self._sessions[key] = ort.InferenceSession(model.SerializeToString(), sess_options=self.options,
                                                           providers=self.providers)
            return self._sessions[key]

    def run(self, method: str, values: Sequence[Any], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """``(cams [R, H, W] float32, ratios [R] float64)`` on the host from ``values``: the
        explain graph's ``activations_0, gradients_0, activations_1, ...`` in that order."""
        session = self.session(method, size)
        binding = session.io_binding()
        for i, value in enumerate(values):
            name = f"{('activations', 'gradients')[i % 2]}_{i // 2}"
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=np.float32))
        binding.bind_output("cam", "cpu")
        binding.bind_output("ratio", "cpu")
        session.run_with_iobinding(binding)
        cam, ratio = binding.copy_outputs_to_cpu()
        return cam, ratio
