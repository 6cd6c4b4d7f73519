"""Cost of CAM post-processing per batch, as a share of the ONNX Runtime run that feeds it.

For resnet50 (``layer4``: activations/gradients [N, 2048, 7, 7]) and vit_b_16
(``encoder.layers.-1.ln_1``: [N, 197, 768] tokens), at N = 1, 8, 32:

* ``ORT run``: median latency of the graph from ``camserve.export`` (logits, activations,
  gradients; top-1 via ``target_rank``), random weights, ``--threads`` intra-op threads.
  Without the exporter (or with ``--forward-only``) a forward-only
  ``torch.onnx.export(dynamo=True)`` graph of the same model stands in.
* each CAM method: ``explain()``'s post-processing time (``timings["cam"]``: layouts, method,
  per-layer scaling, cv2-exact resize to 224 x 224, combination) on random arrays shaped
  like the graph's outputs, plus 8-bit PNG encoding of every map (``camserve.pipeline.render``), in
  ms and as a share of the ORT run. ``explain()`` gets the ORT session's ``--threads`` (for
  EigenCAM's per-sample LAPACK calls and the PNG encoding), as a served GraphSession's.
  As served: each round is one ``explain()`` per method on the real session (the ORT run,
  then the post-processing of the outputs it just wrote) plus the PNG encoding; the share is
  the median of the rounds' ratios (the first round is a warm-up; N=32: two rounds).
  Post-processing right after a run costs more than in a loop of its own (the run evicts
  its code and data): earlier tables, timed on arrays in a loop, read lower. Goal: every
  gradient method <= 5 % at N = 1, 8 and 32 (issue 16).
* ScoreCAM: N x C masked images in batches of 32 through the graph; timed on one batch and
  extrapolated (resnet50: 2048 runs-worth of images per image). AblationCAM: N x C ablated
  activation sets through the head graph (resnet50 only, ``head=True`` export), timed in full.

    python bench/bench_cam.py [--sizes 1 8 32] [--threads 2] [--repeats 3] [--json out.json]

numpy's BLAS runs single-threaded here (``OPENBLAS_NUM_THREADS=1`` unless set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# numpy's OpenBLAS spins one thread per core; next to ONNX Runtime's threads on a loaded
# 2-core box that made batched SVDs 10-30x slower. A serving worker should pin it too.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("CAMSERVE_SPIN", "0")  # sessions take turns: see bench/_alternate.py

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from camserve.cam import TopK, explain, parallel  # noqa: E402
from camserve.cam.runs import SCORECAM_BATCH, scorecam_weights  # noqa: E402
from camserve.cam.layouts import to_nchw  # noqa: E402
from camserve.manifest import LayerSpec, Manifest  # noqa: E402
from camserve.pipeline.runtime import GraphOutputs, GraphSession, session_options  # noqa: E402

MODELS = {
    "resnet50": ("layer4", LayerSpec("layer4", "NCHW", (2048, 7, 7))),
    "vit_b_16": ("encoder.layers.-1.ln_1", LayerSpec("encoder.layers.-1.ln_1", "tokens", (197, 768), grid=(14, 14), prefix_tokens=1)),
}
GRADIENT_FAMILY = ["gradcam", "gradcam++", "xgradcam", "hirescam", "gradcamelementwise", "layercam", "eigengradcam", "eigencam", "kpcacam", "fem"]


def build_graph(name: str, cache: Path, forward_only: bool, log) -> tuple[Path, str]:
    """Export ``name`` once into ``cache``; returns (export dir or .onnx file, kind)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    for m in model.modules():  # ViT's zero head would make every gradient 0
        if isinstance(m, torch.nn.Linear) and not torch.any(m.weight):
            torch.nn.init.normal_(m.weight, std=0.02)
    if not forward_only:
        try:
            from camserve.export import export_model
        except ImportError:
            log("camserve.export not importable: using a forward-only graph")
        else:
            out = cache / f"cam-{name}"
            if not (out / "manifest.json").exists():
                log(f"exporting {name} with gradients (head={name == 'resnet50'}) ...")
                export_model(model, [MODELS[name][0]], out, model_name=name, head=(name == "resnet50"), check=False)
            return out, "explain graph (export_model)"
    path = cache / f"cam-{name}-forward.onnx"
    if not path.exists():
        log(f"exporting forward-only {name} ...")
        batch = torch.export.Dim("batch")
        torch.onnx.export(model, (torch.randn(2, 3, 224, 224),), str(path), input_names=["image"], output_names=["logits"],
                          dynamo=True, dynamic_shapes=({0: batch},), external_data=False)
    return path, "forward-only graph (torch.onnx.export)"


class ArraySession:
    """Session stand-in returning fixed random arrays shaped like the graph outputs, so
    ``explain()`` times post-processing only; ScoreCAM/AblationCAM runs go to ``runner``."""

    has_target_rank = True

    def __init__(self, spec: LayerSpec, n: int, runner: GraphSession | None, seed: int = 0, threads: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.threads = threads  # explain() post-processes on the session's threads, as a GraphSession's
        self.manifest = Manifest("bench", "0", (224, 224), tuple(str(i) for i in range(1000)), (spec,),
                                 head_graph_file=runner.manifest.head_graph_file if runner else None)
        acts = rng.standard_normal((n, *spec.shape), dtype=np.float32)
        if spec.layout == "NCHW":
            acts = np.maximum(acts, 0)
        self.outputs = GraphOutputs(rng.standard_normal((n, 1000), dtype=np.float32), [acts],
                                    [rng.standard_normal((n, *spec.shape), dtype=np.float32) * 1e-3])
        self.runner = runner

    check_images = GraphSession.check_images

    def run(self, images, cotangent=None, target_rank=None) -> GraphOutputs:
        return self.outputs

    def logits(self, images):
        return self.runner.logits(images)

    def head_logits(self, activations, images=None):
        return self.runner.head_logits(activations, images)


def post_processing(method: str, spec: LayerSpec, n: int, repeats: int, runner: GraphSession | None = None,
                    threads: int = 1) -> dict[str, float]:
    """Medians over ``repeats`` timed rounds (after a warm-up) of :func:`post_round`."""
    one = post_round(method, spec, n, runner, threads)
    one()
    rounds = [one() for _ in range(repeats)]
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def post_round(method: str, spec: LayerSpec, n: int, runner: GraphSession | None = None,
               threads: int = 1) -> Callable[[], dict[str, float]]:
    """One round of ``method``'s post-processing on an :class:`ArraySession` (arrays drawn
    once; ``run_s``: AblationCAM's head-graph runs, 0 for the others)."""
    return explain_round(ArraySession(spec, n, runner, threads=threads), np.zeros((n, 3, 224, 224), np.float32),
                         method, threads)


def explain_round(session: object, images: np.ndarray, method: str, threads: int) -> Callable[[], dict[str, float]]:
    """One ``explain()`` of top-1 and the PNG encoding of its maps, as the service does them
    (on the session's threads): ``run_s`` its graph runs, ``cam_s`` its post-processing,
    ``png_s`` the encoding. On the real session the post-processing reads the outputs the
    run has just written; right after a run it costs more than in a loop of its own
    (resnet50 GradCAM at N=1: 1.7 against 0.6 ms): the run has evicted its code and data."""
    from camserve.pipeline import render

    n = len(images)

    def one() -> dict[str, float]:
        out = explain(session, images, [TopK(1)] * n, [method])
        start = time.perf_counter()
        with parallel.using(threads):
            render.heatmap_png(np.concatenate(out.cams[method]))
        return {"cam_s": out.timings["cam"], "png_s": time.perf_counter() - start, "run_s": out.timings["inference"]}

    return one


def _array_round(run: Callable[[], object], method: str, spec: LayerSpec, n: int, threads: int) -> Callable[[], dict[str, float]]:
    """Without an explain graph: a forward-only run, then the post-processing of random arrays."""
    post = post_round(method, spec, n, threads=threads)

    def one() -> dict[str, float]:
        start = time.perf_counter()
        run()
        run_s = time.perf_counter() - start
        return {**post(), "run_s": run_s}  # the forward-only run, not the arrays' (none)

    return one


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=GRADIENT_FAMILY)
    parser.add_argument("--forward-only", action="store_true", help="time a forward-only graph instead of the explain graph")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "camserve-bench-cam")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    args.cache.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    lines = ["| model | method | " + " | ".join(f"N={n} ms (% of run)" for n in args.sizes) + " |",
             "|---|---|" + "---|" * len(args.sizes)]
    for name in args.models:
        spec = MODELS[name][1]
        target, kind = build_graph(name, args.cache, args.forward_only, log)
        runner = GraphSession(target, intra_op_threads=args.threads, verify_hash=False) if target.is_dir() else None
        plain = None if runner else ort.InferenceSession(str(target), sess_options=session_options(args.threads),
                                                         providers=["CPUExecutionProvider"])
        run_s: dict[int, float] = {}
        cells: dict[str, list[str]] = {m: [] for m in args.methods}
        for n in args.sizes:
            x = np.random.default_rng(n).standard_normal((n, 3, 224, 224), dtype=np.float32)
            if runner:
                fn = lambda: runner.run(x, None, np.zeros(n, np.int64))  # noqa: E731
            else:
                fn = lambda: plain.run(None, {"image": x})  # noqa: E731
            # As served: each round is one explain() per method on the real session (its ORT
            # run, then the post-processing of the outputs it just wrote) and the PNG encoding.
            posts = {m: explain_round(runner, x, m, args.threads) if runner else _array_round(fn, m, spec, n, args.threads)
                     for m in args.methods}
            rounds: list[tuple[float, dict[str, dict[str, float]]]] = []
            for r in range(1 + max(1, args.repeats if n < 32 else 2)):
                timed = {m: posts[m]() for m in args.methods}
                if r:  # the first round is a warm-up
                    rounds.append((statistics.median(t["run_s"] for t in timed.values()), timed))
            run_s[n] = statistics.median(run for run, _ in rounds)
            log(f"{name} N={n}: ORT run {run_s[n] * 1e3:.0f} ms ({kind})")
            for method in args.methods:
                totals = [t[method]["cam_s"] + t[method]["png_s"] for _, t in rounds]
                share = statistics.median(total / t[method]["run_s"] for total, (_, t) in zip(totals, rounds))
                r = {key: statistics.median(t[method][key] for _, t in rounds) for key in ("cam_s", "png_s", "run_s")}
                results.append({"model": name, "method": method, "n": n, "ort_run_s": run_s[n], **r, "share": share})
                cells[method].append(f"{statistics.median(totals) * 1e3:.1f} ({100 * share:.1f}%)")
        lines.append(f"| {name} | ORT run ({kind}) | " + " | ".join(f"{run_s[n] * 1e3:.0f}" for n in args.sizes) + " |")
        for method in args.methods:
            lines.append(f"| {name} | {method} + PNG | " + " | ".join(cells[method]) + " |")
        lines += model_run_lines(name, spec, runner, run_s, args, results, log)
    table = "\n".join(lines)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "results": results, "table": table}, indent=2) + "\n")
    return 0


def model_run_lines(name, spec, runner, run_s, args, results, log) -> list[str]:
    """ScoreCAM (one masked batch timed, extrapolated) and AblationCAM (timed) lines."""
    if runner is None:
        return []
    lines = []
    c = spec.channels
    rng = np.random.default_rng(0)
    images = rng.standard_normal((1, 3, 224, 224), dtype=np.float32)
    maps = to_nchw(np.maximum(rng.standard_normal((1, *spec.shape), dtype=np.float32), 0), spec)
    probe = ArraySession(spec, 1, runner)
    probe.runner = _Limited(runner, SCORECAM_BATCH)
    start = time.perf_counter()
    try:
        scorecam_weights(probe, images, maps, np.zeros(1, np.int64), np.zeros(1, np.int64))
    except _Stop:
        pass
    per_batch = time.perf_counter() - start
    cells = []
    for n in args.sizes:
        total = math.ceil(n * c / SCORECAM_BATCH) * per_batch
        results.append({"model": name, "method": "scorecam (extrapolated)", "n": n, "ort_run_s": run_s[n], "total_s": total, "share": total / run_s[n]})
        cells.append(f"{total * 1e3:.0f} ({total / run_s[n]:.0f}x)")
    lines.append(f"| {name} | scorecam, est. {c} masked images per image | " + " | ".join(cells) + " |")
    if runner.manifest.head_graph_file:
        cells = []
        for n in args.sizes:
            r = post_processing("ablationcam", spec, n, 1, runner)
            total = r["cam_s"] + r["png_s"] + r["run_s"]
            results.append({"model": name, "method": "ablationcam", "n": n, "ort_run_s": run_s[n], **r, "share": total / run_s[n]})
            cells.append(f"{total * 1e3:.0f} ({100 * total / run_s[n]:.0f}%)")
            log(f"{name} N={n}: ablationcam {total:.2f} s")
        lines.append(f"| {name} | ablationcam (head graph runs + post) | " + " | ".join(cells) + " |")
    return lines


class _Stop(Exception):
    pass


class _Limited:
    """Runs the graph for the first ``limit``-image batch, then stops the loop."""

    def __init__(self, runner: GraphSession, limit: int) -> None:
        self.runner, self.limit, self.done = runner, limit, False

    def logits(self, images: np.ndarray) -> np.ndarray:
        if self.done:
            raise _Stop
        self.done = True
        return self.runner.logits(images)


if __name__ == "__main__":
    sys.exit(main())
