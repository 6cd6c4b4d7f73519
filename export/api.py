"""``export_model``: a torch model -> ``model.onnx`` + ``forward.onnx`` (+ ``head.onnx``) + ``manifest.json``."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from camserve.errors import ExportError
from camserve.manifest import GRAPH_FILE, LayerSpec, Manifest, sha256_file
from camserve.pipeline import forward as forward_graph
from camserve.pipeline.forward import FORWARD_FILE

from camserve.export import extras as extra_graphs
from camserve.export import folding, guided_taps, kinks, lowering, onnx_export, parity, resolve, trace
from camserve.export.layouts import infer_layout

HEAD_FILE = "head.onnx"
#: Parity tolerances (relative to an output's scale) of extra graphs, where float rounding
#: between the runtimes moves more than the main graph's 1e-4. FullGrad: the per-channel
#: min-max makes a whole channel follow its largest element, and a ReLU or max-pool decision
#: that flips within rounding moves that element (seen: 1.7% of the map's scale on random
#: weights). Guided: the extra ``[grad > 0]`` gate of every ReLU flips on gradients within
#: rounding of 0 (seen: 0.36% of elements beyond 1e-4, max 3e-4).
EXTRA_TOL = {"fullgrad": 5e-2, "guided": 1e-3}


def _versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript
    import torchvision

    import camserve

    return {
        "camserve": camserve.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _example(batch: int, num_outputs: int, size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1234)
    return (
        torch.randn(batch, 3, *size, generator=g),
        torch.randn(batch, num_outputs, generator=g),
        torch.tensor([-1, 0][:batch] + [1] * max(0, batch - 2), dtype=torch.int64),
    )


@contextlib.contextmanager
def _replace_output(layer: nn.Module, value: torch.Tensor) -> Iterator[None]:
    handle = layer.register_forward_hook(lambda _m, _i, _o: value)
    try:
        yield
    finally:
        handle.remove()


def _export_head(model: nn.Module, layer: nn.Module, spec: LayerSpec, size: tuple[int, int], out: Path) -> list[str]:
    """Export (image,) activations -> logits for the first target layer (AblationCAM).

    The activations replace the layer's output. Where the layer is a cut of the model
    (ResNet ``layer4``), everything before it is dead code and the head takes the
    activations alone; where the logits also depend on earlier values (ViT's ``ln_1``:
    the residual bypasses it) the head takes the image too. Returns the input names.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    def head(image: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        with _replace_output(layer, activations):
            return model(image)

    example = (torch.randn(2, 3, *size), torch.randn(2, *spec.shape))
    # functionalize: in-place ops before the layer (ReLU(inplace=True)) must not keep
    # dead code alive.
    with trace.pool_fix(model), trace.frozen(model):
        gm = make_fx(
            torch.func.functionalize(head, remove="mutations_and_views"),
            decomposition_table=trace.traced_decomposition_table(),
            tracing_mode="symbolic",
            _allow_non_fake_inputs=True,
        )(*trace.batch_symbolic(example))
    gm.graph.eliminate_dead_code()
    image_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    names = ["image", "activations"]
    args: tuple[torch.Tensor, ...] = example
    if not image_node.users:
        gm.graph.erase_node(image_node)
        names, args = ["activations"], example[1:]
    lowering.out_of_place(gm)  # functionalized already: marks it for the exporter (see lowering)
    onnx_export.export_graph(gm, args, names, ["logits"], out)
    with torch.no_grad():
        parity.check_head(out, head, names, example)
    return names


def _export_extra(extra: str, model: nn.Module, modules: Sequence[nn.Module], example: tuple[torch.Tensor, ...],
                  num_outputs: int, size: tuple[int, int], tmp: Path, check: bool) -> dict:
    """Trace, export and check one extra graph; returns its manifest entry. FullGrad and
    Guided Backprop trace a copy with batch norms folded into their convolutions
    (:mod:`camserve.export.folding`); the entry says how many."""
    folded = 0
    if extra in ("fullgrad", "guided"):
        traced, folded = folding.fold_batch_norms(model, keep_biased=extra == "fullgrad")
        if folded and not folding.folded_copy_matches(model, traced, size):
            traced, folded = model, 0
    if extra == "fullgrad":
        fn, names = extra_graphs.fullgrad_function(traced, size)
    elif extra == "guided":
        fn, names = extra_graphs.guided_function(traced, _guided_layers(model, traced, modules, example[0]))
    else:
        traced = model
        fn, names = extra_graphs.shapley_function(model, modules)
    path = tmp / f"{extra}.onnx"
    try:
        gm = trace.trace_joint(traced, modules, example, fn=fn)
        proto = onnx_export.export_graph(gm, example, ["image", "cotangent", "target_rank"], names, path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"extra graph {extra!r} failed: {onnx_export._first_line_naming_op(exc)}") from exc
    session = _load_checked(path, proto)
    tol = EXTRA_TOL.get(extra, parity.TOL)
    figures = parity.check_parity(session, fn, names, num_outputs, size, tol=tol) if check else {}
    return {"file": path.name, "sha256": sha256_file(path), "outputs": names, "parity": figures,
            "batch_norms_folded": folded, "ort_level": _extra_level(extra, folded),
            "ort_prepacking": extra != "shapley"}


def _guided_layers(model: nn.Module, traced: nn.Module, modules: Sequence[nn.Module], image: torch.Tensor) -> list[nn.Module]:
    """The target layers (or their taps in a folded ``torch.fx`` copy) whose activations and
    gradients the guided graph answers too: all of them where no ``nn.ReLU`` module runs
    after them, else none (:mod:`camserve.export.guided_taps`)."""
    layers: list[nn.Module] | None = list(modules)
    if traced is not model:
        paths = {id(m): name for name, m in model.named_modules()}
        layers = guided_taps.tap_outputs(traced, [paths[id(m)] for m in modules])  # type: ignore[arg-type]
    return layers if layers and guided_taps.relu_free_after(traced, layers, image) else []


def _extra_level(extra: str, folded: int) -> str:
    """ONNX Runtime's optimization level for an extra graph (``ort_level`` in the manifest,
    see :func:`camserve.pipeline.runtime.extra_session_options`): all of them for ShapleyCAM's
    graph and for a full-backward graph whose batch norms were folded; basic for a
    full-backward graph that still has them (all would keep a fused copy of every weight).
    ShapleyCAM's graph is also loaded without weight prepacking (``ort_prepacking``, see
    :func:`camserve.pipeline.runtime.extra_session_options`)."""
    return "all" if extra == "shapley" or folded else "basic"


def _load_checked(graph: Path, proto: onnx.ModelProto):
    """A CPU session over the graph: the installed ONNX Runtime must read it (opset and IR
    version included). The parity check runs on this same session."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    except Exception as exc:
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        raise ExportError(
            f"onnxruntime {ort.__version__} cannot load the exported graph (opset {opset}, IR version {proto.ir_version}): "
            f"{str(exc).splitlines()[0][:300]}"
        ) from exc


def export_model(
    model: nn.Module,
    target_layers: Sequence[str],
    out_dir: str | Path,
    *,
    input_size: int | tuple[int, int] = 224,
    labels: Sequence[str] | None = None,
    labels_file: str | Path | None = None,
    model_name: str = "model",
    model_version: str = "1.0",
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    channel_order: str = "RGB",
    layouts: dict[str, str] | None = None,
    head: bool = False,
    extras: Sequence[str] = (),
    output_activation: str = "softmax",
    threshold: float = 0.5,
    kind: str = "classifier",
    check: bool = True,
    log: Callable[[str], None] = lambda _msg: None,
) -> Manifest:
    """Export ``model`` so that one ONNX graph answers logits, activations and gradients.

    Writes ``out_dir/model.onnx`` and ``out_dir/manifest.json`` (and ``head.onnx`` with
    ``head=True`` where the first target layer is a cut of the model, and one graph per
    name in ``extras``: ``fullgrad``, ``guided``, ``shapley``, see
    :mod:`camserve.export.extras`). ``output_activation`` (``softmax`` or ``sigmoid``: a
    multi-label or binary head) and ``threshold`` say how answers turn outputs into
    predictions; ``kind="embedding"``: the output is an embedding (explained as cosine
    similarity to concepts, :mod:`camserve.concepts`). With ``check``
    the graph is compared with PyTorch autograd first (see ``camserve.export.parity``)
    and nothing is written when they disagree.
    """
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or min(size) < 1:
        raise ExportError(f"input_size must be a positive int or (H, W), got {input_size!r}")
    if not target_layers:
        raise ExportError("at least one target layer is needed")
    if channel_order not in ("RGB", "BGR"):
        raise ExportError(f"channel_order must be RGB or BGR, got {channel_order!r}")
    extras = extra_graphs.check_extras(extras)
    if output_activation not in ("softmax", "sigmoid"):
        raise ExportError(f"output_activation must be softmax or sigmoid, got {output_activation!r}")
    if not 0.0 < threshold < 1.0:
        raise ExportError(f"threshold must be in (0, 1), got {threshold!r}")
    if kind not in ("classifier", "embedding", "segmentation"):
        raise ExportError(f"kind must be classifier, embedding or segmentation, got {kind!r}")
    segmentation = kind == "segmentation"
    if segmentation and (head or extras or output_activation != "softmax"):
        raise ExportError("a segmentation export has no head graph, extras or sigmoid head (yet): drop --head/--extras")
    model = model.eval()
    if segmentation:  # target layers are addressed in the user's model: "backbone.16", not "model.backbone.16"
        model = resolve.SegmentationOutput(model).eval()
        target_layers = [f"model.{path}" for path in target_layers]
    resolved = [resolve.resolve_layer(model, path) for path in target_layers]
    names = [name.removeprefix("model.") if segmentation else name for name, _ in resolved]
    if len(set(names)) != len(names):
        raise ExportError(f"target layers name the same module twice: {list(target_layers)}")
    modules = [module for _, module in resolved]

    # One eager forward: output size and the activation shapes of the target layers.
    store: list[torch.Tensor] = []
    with torch.no_grad(), trace.leaf_hooks(modules, store):
        num_outputs = resolve.check_output(model(torch.zeros(1, 3, *size)), segmentation)
    if kind == "embedding" and (labels is not None or labels_file is not None):
        raise ExportError("an embedding model has no labels (its outputs are embedding dimensions)")
    label_list = [f"dim_{i}" for i in range(num_outputs)] if kind == "embedding" else resolve.read_labels(labels_file, labels, num_outputs)
    layers = [
        infer_layout(name, act.shape[1:], size, (layouts or {}).get(name) or (layouts or {}).get(path))
        for name, path, act in zip(names, target_layers, store)
    ]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp_str:
        tmp = Path(tmp_str)
        t0 = time.perf_counter()
        example = _example(2, num_outputs, size)
        input_names = ["image", "cotangent", "target_rank"]
        if segmentation:  # the client's mask per row (-1: the predicted mask), see trace.segmentation_cotangent
            example = (*example, torch.cat([parity.predicted_region(example[0][:1]), torch.ones(1, 1, *size)]))
            input_names.append("region")
        try:
            # segmentation: the backward starts below the output's upsampling where the model
            # only upsamples its head (the parity check below runs the plain formulation)
            low_head = trace.upsampled_head(model, modules, size) if segmentation else None
            gm = trace.trace_joint(model, modules, example, fn=trace.joint_function(model, modules, cosine=kind == "embedding",
                                                                                   segmentation=segmentation, head=low_head),
                                   class_token=True)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"tracing forward+backward failed: {onnx_export._first_line_naming_op(exc)}") from exc
        log(f"traced joint graph ({len(gm.graph.nodes)} nodes) in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        outputs = onnx_export.output_names(len(layers))
        proto = onnx_export.export_graph(gm, example, input_names, outputs, tmp / GRAPH_FILE)
        log(f"exported ONNX graph in {time.perf_counter() - t0:.1f} s")

        figures: dict = {}
        session = _load_checked(tmp / GRAPH_FILE, proto)
        if check:
            t0 = time.perf_counter()
            figures = parity.check_parity(session, trace.joint_function(model, modules, cosine=kind == "embedding",
                                                                        segmentation=segmentation), outputs,
                                          num_outputs, size, cosine=kind == "embedding", region=segmentation,
                                          with_predicted=(lambda predicted: trace.joint_function(
                                              model, modules, segmentation=True, predicted=predicted)) if segmentation else None,
                                          relus=(model, lambda: kinks.graph_relus(tmp / GRAPH_FILE)))
            worst = max(s["max_rel_err"] for s in figures["outputs"].values())
            log(f"parity with PyTorch autograd: max relative error {worst:.2e} ({time.perf_counter() - t0:.1f} s)")
            for name, stats in figures["outputs"].items():
                log(f"  {name:16s} max_rel_err={stats['max_rel_err']:.2e} share_off={stats['share_off']:.2%}")
            if figures.get("relu_units_flipped"):
                log(f"  compared on ONNX Runtime's ReLU decisions: {figures['relu_units_flipped']} units within "
                    f"float rounding of 0 decided differently (export/kinks.py)")

        onnx.save(forward_graph.extract_forward(proto), str(tmp / FORWARD_FILE))  # faithfulness metrics' runs

        head_file, head_inputs = None, None
        if head:
            t0 = time.perf_counter()
            try:
                head_inputs = _export_head(model, modules[0], layers[0], size, tmp / HEAD_FILE)
            except ExportError:
                raise
            except Exception as exc:
                raise ExportError(f"head graph export failed: {onnx_export._first_line_naming_op(exc)}") from exc
            head_file = HEAD_FILE
            log(f"exported head graph ({', '.join(head_inputs)} -> logits) in {time.perf_counter() - t0:.1f} s")

        extra_files: dict[str, dict] = {}
        for extra in extras:
            t0 = time.perf_counter()
            extra_files[extra] = _export_extra(extra, model, modules, example, num_outputs, size, tmp, check)
            folded = extra_files[extra]["batch_norms_folded"]
            log(f"exported extra graph {extra} ({', '.join(extra_files[extra]['outputs'])}) in {time.perf_counter() - t0:.1f} s"
                + (f", {folded} batch norms folded into their convolutions" if folded else ""))

        manifest = Manifest(
            model_name=model_name,
            model_version=str(model_version),
            input_size=size,
            labels=tuple(label_list),
            target_layers=tuple(layers),
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            channel_order=channel_order,  # type: ignore[arg-type]
            graph_sha256=sha256_file(tmp / GRAPH_FILE),
            opset=next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0),
            ir_version=proto.ir_version,
            packages=_versions(),
            parity=figures,
            head_graph_file=head_file,
            head_inputs=tuple(head_inputs or ()),
            extras=extra_files,
            forward_graph_file=FORWARD_FILE,
            forward_graph_sha256=sha256_file(tmp / FORWARD_FILE),
            output_activation=output_activation,
            threshold=float(threshold),
            kind=kind,
        )
        for name in [GRAPH_FILE, FORWARD_FILE] + ([HEAD_FILE] if head_file else []) + [e["file"] for e in extra_files.values()]:
            shutil.move(str(tmp / name), out_dir / name)
        for extra in extra_graphs.EXTRAS:  # a re-export without an extra leaves no stale graph behind
            if extra not in extra_files and (out_dir / f"{extra}.onnx").exists():
                (out_dir / f"{extra}.onnx").unlink()
        if not head_file and (out_dir / HEAD_FILE).exists():
            (out_dir / HEAD_FILE).unlink()
        manifest.save(out_dir)
    log(f"wrote {out_dir / GRAPH_FILE} and {out_dir / 'manifest.json'}")
    return manifest
