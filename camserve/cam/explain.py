"""``explain``: CAMs for a batch of images, targets and methods, in as few graph runs as possible.

Graph runs per call (``R`` = total (image, target) rows, x6 with ``aug_smooth``):

* one run over the ``R`` rows serves every gradient method (one-hot cotangents for explicit
  classes, ``target_rank`` for TopK);
* activation-only methods reuse it, or take a single forward run over the images;
* FinerCAM adds one run with its own cotangent; ScoreCAM and AblationCAM add their batched
  masked-input / head-graph runs (see :mod:`camserve.cam.runs`);
* FullGrad, ShapleyCAM and the guided methods add one run of their extra graph over the
  ``R`` rows (:mod:`camserve.export.extras`); the guided methods also answer pictures.

Alongside each map, the signal ratio of its raw per-layer maps tells a heatmap from float
rounding noise (see :mod:`camserve.cam.degenerate`); it costs one more batched matmul or
abs-sum per layer and method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from camserve.errors import InputError
from camserve.pipeline.runtime import GraphOutputs
from camserve.cam.augment import AUGMENTATIONS, augment, deaugment_mean
from camserve.cam.degenerate import combine_ratios, not_applicable
from camserve.cam.layouts import to_nchw
from camserve.cam.methods import reduce_terms
from camserve.cam.registry import MethodSpec, get_method
from camserve.cam.runs import ablation_weights, scorecam_weights
from camserve.cam import dff, parallel
from camserve.cam.dff import DEFAULT_COMPONENTS
from camserve.cam.guided import guided_pictures
from camserve.cam.scaling import combine_layers, minmax, resize_maps
COSINE_RANK = -2  # camserve.export.trace.COSINE_RANK (the graph's similarity mode; no torch import here)
from camserve.cam.targets import (SCORES, Rows, Target, check_regions, class_areas, expand_targets, finer_cotangent, resolve_binary,
                                  score_cotangent)


@dataclass
class Explanation:
    """The answer for one batch.

    ``logits`` [N, K] float32 of the (unaugmented) images; ``classes[i]`` the resolved target
    classes of image ``i``; ``cams[method][i]`` float32 ``[T_i, H, W]`` in [0, 1], one map per
    target in ``classes[i]`` order; ``timings`` seconds spent in graph runs (``inference``)
    and in CAM post-processing (``cam``, plus ``cam.<method>`` per method).

    ``signal_ratio[method][i]`` float64 ``[T_i]``, same order as ``cams[method][i]``: the
    ratio ``max_ij |sum_c T| / max_ij sum_c |T|`` of the raw map's channel terms, minimum
    over target layers (and over augmented copies with ``aug_smooth``); 1.0 for an empty
    map, nan where the check does not apply (projections, ``eigen_smooth``). Below
    :data:`camserve.cam.degenerate.DEGENERATE_RATIO` the map is rounding noise
    (:func:`camserve.cam.degenerate.degenerate_reason`).
    """

    logits: np.ndarray
    classes: list[list[int]]
    cams: dict[str, list[np.ndarray]]
    timings: dict[str, float] = field(default_factory=dict)
    signal_ratio: dict[str, list[np.ndarray]] = field(default_factory=dict)
    #: Guided methods: ``pictures[method][i]`` uint8 ``[T_i, H, W, 3]`` RGB (:mod:`camserve.cam.guided`).
    pictures: dict[str, list[np.ndarray]] = field(default_factory=dict)
    #: DFF: ``cams["dff"][i]`` holds image ``i``'s ``k`` concept maps ``[k, H, W]`` (not one per
    #: target) and ``concepts[i]`` their classes: ``{"classes": int [k, top], "scores": [k, top]}``.
    concepts: list[dict[str, np.ndarray]] = field(default_factory=list)


def _parse_methods(methods: Sequence[str]) -> list[MethodSpec]:
    if isinstance(methods, str) or not isinstance(methods, Sequence) or len(methods) == 0:
        raise InputError(f"methods must be a non-empty list of method names, got {methods!r}")
    specs: list[MethodSpec] = []
    for name in methods:
        spec = get_method(name)
        if spec not in specs:
            specs.append(spec)
    return specs


class _Runs:
    """Graph calls of one explanation, timed (``seconds``); also the ScoreCAM/AblationCAM runner."""

    def __init__(self, session: Any, images: np.ndarray, device_extras: frozenset[str] = frozenset()) -> None:
        self.session, self.images, self.seconds = session, images, 0.0
        self._extras: dict[str, dict[str, np.ndarray]] = {}
        #: extra graphs whose outputs stay on the device (their methods are post-processed there)
        self.device_extras = device_extras

    def extra(self, name: str, rows: Rows, num_classes: int) -> dict[str, np.ndarray]:
        """Extra graph ``name`` over the rows (run once per explanation; both guided methods share it)."""
        if name not in self._extras:
            run = self.session.run_extra_on_device if name in self.device_extras else self.session.run_extra
            self._extras[name] = self.call(run, name, rows.take(self.images), rows.one_hot(num_classes), target_rank=rows.rank)
        return self._extras[name]

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.call(self.session.logits, images)

    def head_logits(self, activations: np.ndarray, images: np.ndarray | None = None) -> np.ndarray:
        if images is None:
            return self.call(self.session.head_logits, activations)
        return self.call(self.session.head_logits, activations, images)

    def forward(self) -> GraphOutputs:
        return self.call(self.session.run, self.images)

    def forward_logits(self) -> np.ndarray:
        """Logits of the images through the forward-only graph where the session has one."""
        fn = getattr(self.session, "forward_logits", None) or self.session.logits
        return self.call(fn, self.images)

    def targets(self, rows: Rows, num_classes: int, regions: np.ndarray | None = None, on_device: bool = False) -> GraphOutputs:
        """One run with a gradient per row: one-hot cotangents for explicit classes, the
        graph's ``target_rank`` input for ranked ones (every exported graph has it);
        ``regions [N, H, W]`` per image: a segmentation graph's client masks. ``on_device``:
        the arrays stay where the session ran (``GraphSession.run_on_device``)."""
        run = self.session.run_on_device if on_device else self.session.run
        if regions is None:
            return self.call(run, rows.take(self.images), rows.one_hot(num_classes), target_rank=rows.rank)
        return self.call(run, rows.take(self.images), rows.one_hot(num_classes), target_rank=rows.rank, region=regions[rows.image])


@parallel.session_threads
def explain(
    session: Any,
    images: np.ndarray,
    targets: Sequence[Target],
    methods: Sequence[str],
    *,
    eigen_smooth: bool = False,
    aug_smooth: bool = False,
    components: int = DEFAULT_COMPONENTS,
    score: str = "logit",
    concepts: np.ndarray | None = None,
    regions: np.ndarray | None = None,
) -> Explanation:
    """CAMs of ``images`` (preprocessed float32 ``[N, 3, H, W]``) for ``targets`` with ``methods``.

    ``session`` is a :class:`camserve.pipeline.runtime.GraphSession` (or anything with its ``manifest``,
    ``run``, ``logits``, ``head_logits`` and ``check_images``). ``targets[i]`` is a list of
    class indices or :class:`TopK`. ``components``: DFF's concepts per image. ``score``
    (:data:`camserve.cam.targets.SCORES`): what the gradient methods explain; ``softmax``
    costs one forward first (the cotangent needs the probabilities), and a one-output
    sigmoid head (``manifest.binary``) always explains ``binary`` categories 0 / 1. An
    embedding model (``manifest.embedding``) explains the cosine similarity to
    ``concepts[c]`` (``[C, D]``; targets are concept indices; :mod:`camserve.concepts`).
    A segmentation model explains a class's output over its predicted pixels, or over
    ``regions[i]`` (``[N, H, W]``, a client's mask per image, weights >= 0; a negative row:
    the predicted pixels), whose targets must name classes.
    Raises InputError naming a bad method, target or shape.
    """
    start = time.perf_counter()
    specs = _parse_methods(methods)
    images = session.check_images(images)
    if images.shape[0] == 0:
        raise InputError("images holds no image (batch of 0)")
    manifest = session.manifest
    layers = manifest.target_layers
    size = (images.shape[2], images.shape[3])
    n, k = images.shape[0], manifest.num_outputs
    binary = bool(getattr(manifest, "binary", False))
    embedding = bool(getattr(manifest, "embedding", False))
    if score not in SCORES:
        raise InputError(f"unknown score {score!r} (known: {', '.join(SCORES)})")
    if embedding:
        if concepts is None or np.ndim(concepts) != 2 or np.shape(concepts)[1] != k:
            raise InputError(f"an embedding model explains similarity to concepts: give concepts [C, {k}], "
                             f"got {None if concepts is None else list(np.shape(concepts))}")
        score = "cosine"
    elif binary:
        score = "binary"
    elif score == "binary":
        raise InputError(f"score=binary needs a sigmoid head with one output, this model has {k} {manifest.output_activation} outputs")
    segmentation = bool(getattr(manifest, "segmentation", False))
    if segmentation and score != "logit":
        raise InputError(f"score={score} is not defined for segmentation models (the target is a class's output over its predicted pixels)")
    if segmentation and any(s.source not in ("gradients", "activations") for s in specs):
        others = [s.name for s in specs if s.source not in ("gradients", "activations")]
        raise InputError(f"segmentation models are explained by the gradient and activation methods, not {', '.join(others)}")
    if score != "logit" and any(s.source not in ("gradients", "activations") for s in specs):
        others = [s.name for s in specs if s.source not in ("gradients", "activations")]
        raise InputError(f"score={score} applies to the gradient methods of the main graph, not to {', '.join(others)}")
    rows = expand_targets(targets, n, len(concepts) if embedding else 2 if binary else k)
    post = getattr(session, "post", None)  # its device post-processing (camserve.cam.device), where it serves a method
    post = post if post is not None and any(post.serves(s, eigen_smooth) for s in specs) else None
    # the main run leaves its arrays on the device when a method is post-processed there; they
    # come to the host only for the methods that are not (numpy)
    main_run = session.run if post is None else session.run_on_device
    on_host = post is None or not all(post.serves(s, eigen_smooth) for s in specs)
    if regions is not None:
        regions = check_regions(regions, rows, segmentation, aug_smooth, size)
    if any(s.source == "ablation" for s in specs) and len(layers) != 1:
        raise InputError(f"ablationcam needs exactly one target layer (its head graph starts there), this model has {len(layers)}")
    if aug_smooth and any(s.source in ("guided", "dff") for s in specs):
        raise InputError("aug_smooth is not defined for guidedbackprop, guidedgradcam and dff (pictures and concepts)")
    copies = len(AUGMENTATIONS) if aug_smooth else 1
    runs = _Runs(session, augment(images) if aug_smooth else images,
                 frozenset(s.extra for s in specs if s.extra and post is not None and post.serves(s, eigen_smooth)))
    all_rows = rows.repeat(copies) if copies > 1 else rows
    # Guided Grad-CAM takes GradCAM's arrays from the guided graph where it answers them (no
    # nn.ReLU after the target layers: camserve.export.guided_taps) instead of a main run.
    guided_arrays = (score == "logit" and not embedding and not segmentation
                     and f"gradients_{len(layers) - 1}" in getattr(manifest, "extras", {}).get("guided", {}).get("outputs", ()))
    if embedding:
        # one run: the graph turns each row's concept into the gradient of the cosine similarity
        if (all_rows.cls < 0).any():
            raise InputError("an embedding model's targets are concept indices, not top-k ranks")
        row_class = all_rows.cls
        out = runs.call(main_run, all_rows.take(runs.images), np.asarray(concepts, dtype=np.float32)[row_class],
                        target_rank=np.full(len(all_rows), COSINE_RANK, dtype=np.int64))
        logits_u, acts_u = all_rows.first_of_each(out.logits), _first_arrays(out, all_rows, on_host)
        row_logits = all_rows.take(logits_u)
    elif score != "logit":
        # the cotangent depends on the logits: a forward first, then one run with it
        logits_u = runs.forward_logits()
        row_logits = all_rows.take(logits_u)
        row_class = resolve_binary(all_rows, row_logits) if binary else all_rows.resolve(row_logits)
        cotangent = score_cotangent(score, row_logits, row_class)
        out = runs.call(main_run, all_rows.take(runs.images), cotangent)
        acts_u = _first_arrays(out, all_rows, on_host)
    elif any(s.main_gradients and not (guided_arrays and s.name == "guidedgradcam") for s in specs):
        out = runs.targets(all_rows, k, regions, on_device=post is not None)
        logits_u = all_rows.first_of_each(out.logits)
        acts_u = _first_arrays(out, all_rows, on_host)
    elif all(s.extra for s in specs):
        # only extra-graph methods: the first one's run over the rows gives the logits too,
        # so the main graph does not run at all
        out, acts_u = None, []
        logits_u = all_rows.first_of_each(runs.extra(specs[0].extra, all_rows, k)["logits"])
    else:
        out = runs.forward()
        logits_u, acts_u = out.logits, out.activations
    if segmentation:  # a class's score is its predicted area; ranked targets follow it (as the graph does)
        logits_u = np.asarray(logits_u)
        row_logits = all_rows.take(class_areas(logits_u))
        row_class = all_rows.resolve(row_logits)
    elif score == "logit" and not embedding:
        row_logits = all_rows.take(logits_u)
        row_class = all_rows.resolve(row_logits)

    cams: dict[str, list[np.ndarray]] = {}
    ratios: dict[str, list[np.ndarray]] = {}
    pictures: dict[str, list[np.ndarray]] = {}
    concepts: list[dict[str, np.ndarray]] = []
    timings: dict[str, float] = {}
    for spec in specs:
        method_start, inference_before = time.perf_counter(), runs.seconds
        if spec.source == "dff":
            start_dff = time.perf_counter()
            maps, concepts = _dff(runs, acts_u[0][:n], layers[0], size, components)
            cams["dff"] = list(maps)
            ratios["dff"] = [not_applicable(len(m)) for m in maps]
            timings["cam.dff"] = time.perf_counter() - start_dff - (runs.seconds - inference_before)
            continue
        if spec.source == "guided":
            cam = None
            if spec.name == "guidedgradcam":
                arrays = out
                if guided_arrays:
                    ex = runs.extra("guided", all_rows, k)
                    arrays = GraphOutputs(ex["logits"], [ex[f"activations_{i}"] for i in range(len(layers))],
                                          [ex[f"gradients_{i}"] for i in range(len(layers))])
                cam = _array_cams(get_method("gradcam"), arrays, acts_u, layers, eigen_smooth, size)[0]
            gb = runs.extra("guided", all_rows, k)["guided"]
            picture, result = guided_pictures(gb, cam)
            pictures[spec.name] = rows.split(picture)
            ratio = not_applicable(len(all_rows))
        elif post is not None and post.serves(spec, eigen_smooth):
            arrays = _device_arrays(spec, runs, out, all_rows, row_logits, row_class, k)
            result, ratio = post.run(post.graph_for(spec), arrays, size)
        elif spec.source in ("gradients", "activations"):
            result, ratio = _array_cams(spec, out, acts_u, layers, eigen_smooth, size)
        else:
            per_layer = _raw_cams(spec, runs, out, acts_u, logits_u, all_rows, row_class, row_logits, layers, eigen_smooth, k,
                                  size)
            result = combine_layers([raw for raw, _ in per_layer], size)
            ratio = combine_ratios([r for _, r in per_layer])
        if spec.source == "activations":
            result, ratio = all_rows.take(result), all_rows.take(ratio)
        if aug_smooth:
            result = deaugment_mean(result)
            ratio = ratio.reshape(copies, -1).min(axis=0)  # row r copy a is at a * R + r
        cams[spec.name] = rows.split(result)
        ratios[spec.name] = rows.split(ratio)
        timings[f"cam.{spec.name}"] = time.perf_counter() - method_start - (runs.seconds - inference_before)
    classes = rows.split(row_class[: len(rows)].tolist())
    timings["inference"] = runs.seconds
    timings["cam"] = time.perf_counter() - start - runs.seconds
    return Explanation(logits=np.asarray(logits_u[:n], dtype=np.float32), classes=classes, cams=cams, timings=timings,
                       signal_ratio=ratios, pictures=pictures, concepts=concepts)


def _device_arrays(spec: MethodSpec, runs: _Runs, out: Any, rows: Rows, row_logits: np.ndarray, row_class: np.ndarray,
                   num_classes: int) -> list[Any]:
    """The arrays, left on the device, that ``spec``'s device graph reduces: the main run's,
    FinerCAM's run with its own cotangent, or ShapleyCAM's extra graph's."""
    if spec.source == "finer":
        out = runs.call(runs.session.run_on_device, rows.take(runs.images), finer_cotangent(row_logits, row_class))
    elif spec.source == "shapley":
        ex = runs.extra("shapley", rows, num_classes)
        layers = len(runs.session.manifest.target_layers)
        return [ex[f"{kind}_{i}"] for i in range(layers) for kind in ("activations", "gradients")]
    return out.values


def _first_arrays(out: GraphOutputs, rows: Rows, on_host: bool) -> list[np.ndarray]:
    """Each image's activations (its first row's) for the methods post-processed in numpy;
    none when every method runs on the device (the arrays then never leave it)."""
    return [rows.first_of_each(a) for a in out.activations] if on_host else []


def _raw_cams(
    spec: MethodSpec,
    runs: _Runs,
    out: GraphOutputs,
    acts_u: list[np.ndarray],
    logits_u: np.ndarray,
    rows: Rows,
    row_class: np.ndarray,
    row_logits: np.ndarray,
    layers: Sequence[Any],
    eigen_smooth: bool,
    num_classes: int,
    size: tuple[int, int],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Raw per-layer maps of a method that needs more runs than the main graph's (FinerCAM,
    ShapleyCAM, FullGrad, ScoreCAM, AblationCAM) with their signal ratios: ``([R, h, w], [R])``
    per layer. Methods over the main graph's arrays alone go through :func:`_array_cams`."""
    smooth = eigen_smooth and spec.eigen_smooth
    if spec.source == "finer":
        cotangent = finer_cotangent(row_logits, row_class)
        finer = runs.call(runs.session.run, rows.take(runs.images), cotangent)
        return [_layer_map(spec, to_nchw(a, l), to_nchw(g, l), smooth) for a, g, l in zip(finer.activations, finer.gradients, layers)]
    if spec.source == "shapley":
        sh = runs.extra("shapley", rows, num_classes)
        return [_layer_map(spec, to_nchw(sh[f"activations_{i}"], l), to_nchw(sh[f"gradients_{i}"], l), smooth)
                for i, l in enumerate(layers)]
    if spec.source == "fullgrad":
        # the graph's maps are already normalized and summed per resolution; resizing is linear
        fg = runs.extra("fullgrad", rows, num_classes)
        total = sum(resize_maps(v, size) for name, v in fg.items() if name.startswith("fullgrad_"))
        return [(total, not_applicable(len(rows)))]
    if spec.source == "score":
        raw = []
        for a, l in zip(acts_u, layers):
            maps = to_nchw(a, l)
            weights = scorecam_weights(runs, runs.images, maps, rows.image, row_class)
            raw.append(reduce_terms("weights", weights, maps[rows.image], smooth))
        return raw
    layer = layers[0]
    head_images = runs.images if "image" in getattr(runs.session.manifest, "head_inputs", ()) else None
    weights = ablation_weights(runs, acts_u[0], layer, logits_u, rows.image, row_class, head_images)
    return [reduce_terms("weights", weights, to_nchw(acts_u[0], layer)[rows.image], smooth)]


def _array_cams(spec: MethodSpec, out: GraphOutputs, acts_u: list[np.ndarray], layers: Sequence[Any],
                eigen_smooth: bool, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Final maps ``[R, H, W]`` and signal ratios ``[R]`` of a method over the main graph's
    arrays (gradient methods: its rows; activation methods: ``[U, ...]``, its images). Every
    step is row-wise, so a large batch is split by rows over the session's threads."""
    smooth = eigen_smooth and spec.eigen_smooth
    gradients = spec.source == "gradients"
    acts = out.activations if gradients else acts_u

    def part(rows: slice) -> tuple[np.ndarray, np.ndarray]:
        per_layer = [_layer_map(spec, to_nchw(a[rows], l), to_nchw(out.gradients[i][rows], l) if gradients else None, smooth)
                     for i, (a, l) in enumerate(zip(acts, layers))]
        return combine_layers([raw for raw, _ in per_layer], size), combine_ratios([r for _, r in per_layer])

    return parallel.map_rows(part, len(acts[0]), sum(a.size for a in acts) * (2 if gradients else 1))


def _dff(runs: _Runs, acts: np.ndarray, layer: Any, size: tuple[int, int], components: int
         ) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """DFF of each image: concept maps ``[N, k, H, W]`` in [0, 1] and each concept's top classes.

    The head graph scores a concept vector ``v`` as the activations that equal ``v`` at every
    position: exact for an average-pool + linear head (ResNet's ``layer4``), the natural
    reading elsewhere."""
    if "image" in getattr(runs.session.manifest, "head_inputs", ()):
        raise InputError("dff needs a head graph that takes the activations alone (the target layer must cut the model)")
    try:
        concepts, maps = dff.factorize(to_nchw(acts, layer), components)
    except ValueError as exc:
        raise InputError(f"dff: {exc}") from None
    shape = acts.shape[1:]

    def head(vectors: np.ndarray) -> np.ndarray:
        if layer.layout == "NCHW":
            grid = np.broadcast_to(vectors[:, :, None, None], (len(vectors), *shape))
        elif layer.layout == "NHWC":
            grid = np.broadcast_to(vectors[:, None, None, :], (len(vectors), *shape))
        else:
            grid = np.broadcast_to(vectors[:, None, :], (len(vectors), *shape))
        return runs.head_logits(np.ascontiguousarray(grid, dtype=np.float32))

    scores = dff.concept_scores(concepts, head)
    classes, probs = dff.top_classes(scores, dff.DEFAULT_TOP_K)
    n, k = maps.shape[:2]
    scaled = resize_maps(minmax(maps.reshape(n * k, *maps.shape[2:])), size).reshape(n, k, *size)
    return scaled, [{"classes": c, "scores": s} for c, s in zip(classes, probs)]


def _layer_map(spec: MethodSpec, a: np.ndarray, g: np.ndarray | None, smooth: bool) -> tuple[np.ndarray, np.ndarray]:
    """One layer's raw map and signal ratio: the method's terms computed once and reduced,
    or its projection (ratio nan)."""
    if spec.terms is None:
        return spec.function(a, g, smooth), not_applicable(a.shape[0])
    return reduce_terms(spec.form, spec.terms(a, g), a, smooth)
