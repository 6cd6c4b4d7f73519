"""``camserve export``: the command-line face of :func:`camserve.export.export_model`."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator


def _names(text: str) -> tuple[str, ...]:
    from camserve.export.extras import EXTRAS
    from camserve.pipeline.box_score import EXTRA as BOX_SCORE

    known = (*EXTRAS, BOX_SCORE)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown extra {(unknown or [text])[0]!r} (known: {', '.join(known)})")
    return names


def _size(text: str) -> int | tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"input size {text!r} must be N or HxW") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError(f"input size {text!r} must be N or HxW")


def _floats(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be three comma-separated numbers") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} must be three comma-separated numbers")
    return values  # type: ignore[return-value]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to an ONNX graph with activations and gradients")
    p.add_argument("model", help="torchvision:NAME or package.module:factory")
    p.add_argument("--weights", help="state_dict file (loaded with weights_only=True)")
    p.add_argument("--target-layer", action="append", dest="target_layers",
                   help="dotted module path, e.g. layer4.-1 (repeat for several layers; a detector: one layer, "
                        "default backbone)")
    p.add_argument("--labels", help="labels file, one per line")
    p.add_argument("--input-size", type=_size, help="N or HxW (default 224; a detector: 320)")
    p.add_argument("--mean", type=_floats, default=(0.485, 0.456, 0.406))
    p.add_argument("--std", type=_floats, default=(0.229, 0.224, 0.225))
    p.add_argument("--channel-order", choices=("RGB", "BGR"), default="RGB")
    p.add_argument("--layout", action="append", default=[], metavar="LAYER=LAYOUT",
                   help="override the inferred layout of a 4-d layer (NCHW or NHWC)")
    p.add_argument("--name", help="model name (default: the model's name)")
    p.add_argument("--version", default="1.0", help="model version (default 1.0)")
    p.add_argument("--head", action="store_true", help="also export activations->logits (AblationCAM)")
    p.add_argument("--extras", type=_names, default=(), metavar="NAME[,NAME]",
                   help="extra graphs for more methods: fullgrad (FullGrad), guided (Guided Backprop / Guided Grad-CAM), "
                        "shapley (ShapleyCAM); a two-stage detector: boxscore (gradient methods of each detection's score)")
    p.add_argument("--output-activation", choices=("softmax", "sigmoid"), default="softmax",
                   help="softmax (one class) or sigmoid (multi-label, or a binary head with one output)")
    p.add_argument("--threshold", type=float, default=0.5, help="sigmoid heads: probability at which a label is predicted; detectors: "
                        "the lowest detection score answered")
    p.add_argument("--kind", choices=("classifier", "embedding", "segmentation", "detection"), default="classifier",
                   help="embedding: the model outputs an embedding, explained as cosine similarity to concepts; "
                        "segmentation: the model outputs a map [N, K, H, W] (or a dict with 'out'); "
                        "detection: a torchvision-style detector, explained by EigenCAM of its feature pyramid")
    p.add_argument("--fpn-level", help="detection: the pyramid level whose size the maps are resized to "
                                       "(default: the last, as pytorch-grad-cam's Faster R-CNN tutorial)")
    p.add_argument("--min-score", type=float, help="detection: the detector's own score threshold in the graph "
                                                   "(default: the model's; lower it for random weights)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


@contextlib.contextmanager
def _user_errors(spec: str) -> Iterator[None]:
    """Turn any non-Camserve exception (the user's model failing in forward, tracing or export)
    into a one-line ExportError naming the model spec; KeyboardInterrupt passes through."""
    from camserve.errors import CamserveError, ExportError
    from camserve.export.resolve import one_line

    try:
        yield
    except CamserveError:
        raise
    except Exception as exc:
        raise ExportError(f"exporting {spec!r} failed: {one_line(exc)}") from exc


def run(args: argparse.Namespace) -> int:
    from camserve.errors import CamserveError
    from camserve.export import export_model, load_model, load_weights
    from camserve.pipeline.box_score import EXTRA as BOX_SCORE

    layouts = {}
    for item in args.layout:
        layer, sep, layout = item.partition("=")
        if not sep or layout not in ("NCHW", "NHWC"):
            raise CamserveError(f"--layout {item!r} must be LAYER=NCHW or LAYER=NHWC")
        layouts[layer] = layout
    if args.kind != "detection" and not args.target_layers:
        raise CamserveError("--target-layer is required (except with --kind detection)")
    if args.kind != "detection" and (args.fpn_level or args.min_score is not None):
        raise CamserveError("--fpn-level and --min-score apply to --kind detection only")
    if args.kind != "detection" and BOX_SCORE in args.extras:
        raise CamserveError(f"--extras {BOX_SCORE} applies to --kind detection only (two-stage detectors)")
    if args.kind == "detection" and set(args.extras) - {BOX_SCORE}:
        raise CamserveError(f"a detector takes only --extras {BOX_SCORE}, got {','.join(args.extras)}")
    if args.kind == "detection" and args.target_layers and len(args.target_layers) != 1:
        raise CamserveError(f"a detector is explained at one target layer, got {len(args.target_layers)}: {args.target_layers}")
    model = load_model(args.model)
    if args.weights:
        load_weights(model, args.weights)
    name = args.name or args.model.split(":", 1)[1].rsplit(".", 1)[-1]
    if args.kind == "detection":
        return _run_detection(args, model, name)
    with _user_errors(args.model):
        manifest = export_model(
            model, args.target_layers, args.out, input_size=args.input_size or 224, labels_file=args.labels,
            model_name=name, model_version=args.version, mean=args.mean, std=args.std,
            channel_order=args.channel_order, layouts=layouts, head=args.head, extras=args.extras,
            output_activation=args.output_activation, threshold=args.threshold, kind=args.kind,
            log=lambda msg: print(msg, file=sys.stderr),
        )
    layers = ", ".join(f"{lay.name} ({lay.layout} {list(lay.shape)})" for lay in manifest.target_layers)
    print(f"exported {manifest.model_name} {manifest.model_version}: {manifest.num_outputs} classes, layers {layers}")
    return 0


def _run_detection(args: argparse.Namespace, model, name: str) -> int:
    from camserve.export.detection import export_detection, num_classes
    from camserve.export.resolve import read_labels, torchvision_labels

    labels = None
    if args.labels:
        labels = read_labels(args.labels, None, num_classes(model))
    elif args.model.startswith("torchvision:"):
        labels = torchvision_labels(args.model.split(":", 1)[1])
    with _user_errors(args.model):
        manifest = export_detection(
            model, args.out, target_layer=(args.target_layers or ["backbone"])[0], level=args.fpn_level,
            input_size=args.input_size or 320, labels=labels, model_name=name,
            model_version=args.version, threshold=args.threshold, min_score=args.min_score, extras=args.extras,
            log=lambda msg: print(msg, file=sys.stderr),
        )
    layer = manifest.target_layers[0]
    print(f"exported detector {manifest.model_name} {manifest.model_version}: {manifest.num_outputs} classes, "
          f"layer {layer.name} ({list(layer.shape)})")
    return 0
