"""Cost of the extra graphs (``camserve export --extras fullgrad,guided,shapley``) and of the
methods they serve, against a forward-only graph and against pytorch-grad-cam 1.5.7.

Models: resnet50 (target ``layer4``; extras fullgrad, guided, shapley) and vit_b_16 (target
``encoder.layers.-1.ln_1``; shapley only: FullGrad needs Conv2d/BatchNorm2d biases and
Guided Backprop needs ``nn.ReLU`` modules, ViT has neither). Random weights (BatchNorm
statistics randomized, else every folded BN bias is 0; ViT's zero head re-initialized),
target class 3, ONNX Runtime CPU and torch with ``--threads`` threads each.

1. Graph time, per batch: the forward-only graph (``export_graph``, logits only), the explain
   graph ``model.onnx`` (``GraphSession.run``), each extra graph (``run_extra``), and the graph
   time of ``explain()`` per new method (``timings["inference"]``: every run it makes; FullGrad,
   ShapleyCAM and Guided Backprop run their extra graph only, Guided Grad-CAM also ``model.onnx``
   for its GradCAM). Ratios vs forward and vs the
   explain graph. Goals: fullgrad.onnx <= 1.6x forward, guided.onnx <= 2.2x, ShapleyCAM's
   explain() runs <= 2.2x.
2. Peak RSS of one ORT session per graph (with the options GraphSession gives it: an extra
   graph at its manifest's ``ort_level``), the lowest of five fresh child processes: VmHWM after loading,
   and after one batch-1 run (not ``ru_maxrss``: a child's includes the parent's RSS at fork), minus a baseline child that imports the same modules
   (numpy, onnxruntime, camserve's session options) and loads nothing. Goal: extra <= 1.3x
   model.onnx.
3. Per-image wall time of ``explain(session, images, [[3]] * N, [method])`` vs pytorch-grad-cam
   on the same weights and images: FullGrad(model, []), ShapleyCAM(model, [layer]) with
   ClassifierOutputReST, GuidedBackpropReLUModel (one image per call, looped) + deprocess_image,
   Guided Grad-CAM = GradCAM + that loop. ViT ShapleyCAM: n/a (1.5.7's base class rejects 3-d
   activations). Goal: >= 3x faster per image.

Every table times its candidates in interleaved rounds (order reversed every other round; the
first round is a warm-up) and prints medians. Exports are cached in ``--work`` and reused.

    python bench/bench_extras.py [--models resnet50 vit_b_16] [--size 224] [--batches 1 8]
        [--repeats 5] [--threads 2] [--sections graph memory oracle] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see bench_cam.py
os.environ.setdefault("CAMSERVE_SPIN", "0")  # sessions take turns: see bench/_alternate.py

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

MODELS = {
    "resnet50": ("layer4", ("fullgrad", "guided", "shapley")),
    "vit_b_16": ("encoder.layers.-1.ln_1", ("shapley",)),
}
METHODS = {"fullgrad": ["fullgrad"], "shapley": ["shapleycam"], "guided": ["guidedbackprop", "guidedgradcam"]}
GRAPH_GOALS = {"fullgrad.onnx": 1.6, "guided.onnx": 2.2, "explain(shapleycam) runs": 2.2}
MEMORY_GOAL, SPEED_GOAL, CLASS = 1.3, 3.0, 3


def build_model(name: str, size: int):
    """The same random weights on every call (export and oracle build their own copy)."""
    import torch
    import torchvision
    from torch import nn

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **({"image_size": size} if name.startswith("vit") else {}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():  # ViT's zero head: no gradient at all
                m.weight.copy_(0.02 * torch.randn(m.weight.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):  # as tests/test_extra_methods.py randomize_bn
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
    return model.eval()


def exported(name: str, size: int, work: Path, log) -> tuple[Path, Path]:
    """(export dir with the extras, forward-only .onnx), exported once into ``work``."""
    import torch

    from camserve.export import export_model
    from camserve.export.onnx_export import export_graph
    from camserve.manifest import Manifest

    layer, extras = MODELS[name]
    out, forward = work / f"{name}-{size}", work / f"{name}-{size}-forward.onnx"
    if not (out / "manifest.json").exists() or set(extras) - set(Manifest.load(out).extras):
        log(f"exporting {name} at {size} px with extras {','.join(extras)} (minutes) ...")
        export_model(build_model(name, size), [layer], out, input_size=size, model_name=name, extras=extras, check=False,
                     log=lambda m: log("  " + m))
    if not forward.exists():
        log(f"exporting forward-only {name} ...")
        export_graph(build_model(name, size), (torch.randn(2, 3, size, size),), ["image"], ["logits"], forward)
    return out, forward


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per candidate over ``repeats`` rounds after one warm-up round. A
    candidate returning a float gives its own seconds (e.g. explain()'s graph time)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats + 1):
        for k in list(fns)[:: 1 if i % 2 else -1]:
            t0 = time.perf_counter()
            own = fns[k]()
            if i:
                times[k].append(own if isinstance(own, float) else time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _goal(ratio: float, goal: float, at_most: bool = True) -> str:
    ok = ratio <= goal if at_most else ratio >= goal
    return f"{'<=' if at_most else '>='} {goal}x: {'ok' if ok else 'MISSED'}"


def graph_section(name, session, forward, size, batches, repeats, threads) -> list[str]:
    from camserve.cam import explain
    from camserve.pipeline.runtime import session_options

    plain = ort.InferenceSession(str(forward), sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    extras = MODELS[name][1]
    lines = []
    for n in batches:
        x = np.random.default_rng(n).standard_normal((n, 3, size, size), dtype=np.float32)
        cot = np.zeros((n, session.manifest.num_outputs), np.float32)
        cot[:, CLASS] = 1
        fns = {"forward-only graph": lambda: plain.run(None, {"image": x}), "model.onnx (explain graph)": lambda: session.run(x, cot)}
        for e in extras:
            fns[f"{e}.onnx"] = lambda e=e: session.run_extra(e, x, cot)
        for e in extras:
            method = METHODS[e][0]
            fns[f"explain({method}) runs"] = lambda m=method: explain(session, x, [[CLASS]] * n, [m]).timings["inference"]
        t = interleaved(fns, repeats)
        fwd, main = t["forward-only graph"], t["model.onnx (explain graph)"]
        for k, s in t.items():
            goal = _goal(s / fwd, GRAPH_GOALS[k]) if k in GRAPH_GOALS else ""
            lines.append(f"| {name} | {n} | {k} | {s * 1e3:.1f} | {s / fwd:.2f}x | {s / main:.2f}x | {goal} |")
    return lines


def memory_child(graph: str, threads: int) -> None:
    """Child process: load one session (or nothing: baseline), run one batch-1, print peaks in MB."""
    from camserve.pipeline.runtime import create_session, extra_session_options, session_options

    def peak() -> float:  # not ru_maxrss: it keeps the parent's RSS at fork (the bench's own GBs)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB; no /proc: run it standalone

    out = {"load_mb": peak(), "run_mb": peak()}
    if graph:
        # the options GraphSession gives each graph: an extra graph at its manifest's ort_level
        extra = Path(graph).stem in ("fullgrad", "guided", "shapley")
        if extra:
            from camserve.manifest import Manifest

            entry = Manifest.load(Path(graph).parent).extras[Path(graph).stem]
            options = extra_session_options(threads, entry.get("ort_level", "basic"), bool(entry.get("ort_prepacking", True)))
        else:
            options = session_options(threads)
        sess = create_session(graph, options, ["CPUExecutionProvider"])  # as GraphSession loads it
        out["load_mb"] = peak()
        feeds = {}
        for i in sess.get_inputs():
            if i.name == "image":
                feeds[i.name] = np.random.default_rng(0).standard_normal((1, *i.shape[1:]), dtype=np.float32)
            elif i.name == "cotangent":
                feeds[i.name] = np.eye(1, i.shape[1], CLASS, dtype=np.float32)
            else:
                feeds[i.name] = np.full(1, -1, np.int64)
        sess.run(None, feeds)
        out["run_mb"] = peak()
    print(json.dumps(out))


def memory_section(name, directory: Path, forward: Path, threads: int) -> list[str]:
    def child(graph: str) -> dict[str, float]:
        """The lowest peaks of five fresh processes (loaded as the servers load, every process
        reads the same peak: see camserve.pipeline.malloc)."""
        cmd = [sys.executable, __file__, "--memory-child", graph, "--threads", str(threads)]
        runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
                for _ in range(5)]
        return {k: min(r[k] for r in runs) for k in runs[0]}

    base = child("")
    graphs = {"forward-only graph": forward, "model.onnx (explain graph)": directory / "model.onnx"}
    graphs |= {f"{e}.onnx": directory / f"{e}.onnx" for e in MODELS[name][1]}
    net = {k: {m: v - base[m] for m, v in child(str(p)).items()} for k, p in graphs.items()}
    main = net["model.onnx (explain graph)"]
    lines = []
    for k, r in net.items():
        goal = _goal(r["load_mb"] / main["load_mb"], MEMORY_GOAL) if k.endswith(".onnx") else ""
        lines.append(f"| {name} | {k} | {r['load_mb']:.0f} | {r['load_mb'] / main['load_mb']:.2f}x | "
                     f"{r['run_mb']:.0f} | {r['run_mb'] / main['run_mb']:.2f}x | {goal} |")
    lines.append(f"| {name} | (baseline child, not subtracted) | {base['load_mb']:.0f} | | {base['run_mb']:.0f} | | |")
    return lines


def oracle(method: str, model, layer, gmodel):
    """pytorch-grad-cam's answer for a batch, as a callable returning its own seconds, or None (n/a)."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.image import deprocess_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget

    def guided(t):
        return [gmodel(t[i : i + 1], target_category=CLASS) for i in range(t.shape[0])]  # it answers image 0 only

    def run(t) -> float:
        n = t.shape[0]
        with contextlib.redirect_stdout(io.StringIO()):  # FullGrad prints a warning per construction
            cam = {"fullgrad": lambda: pgc.FullGrad(model, []), "shapleycam": lambda: pgc.ShapleyCAM(model, [layer]),
                   "guidedgradcam": lambda: pgc.GradCAM(model, [layer])}.get(method, lambda: None)()
        target = ClassifierOutputReST if method == "shapleycam" else ClassifierOutputTarget
        t0 = time.perf_counter()
        if method == "guidedbackprop":
            [deprocess_image(g) for g in guided(t)]
        elif method == "guidedgradcam":
            maps = cam(t, [target(CLASS)] * n)
            [deprocess_image(g * m[..., None]) for g, m in zip(guided(t), maps)]
        else:
            cam(t, [target(CLASS)] * n)
        seconds = time.perf_counter() - t0
        if cam is not None:
            cam.activations_and_grads.release()
        return seconds

    return run


def oracle_section(name, session, size, batches, repeats, log) -> list[str]:
    import copy

    import pytorch_grad_cam as pgc
    import torch

    from camserve.cam import explain
    from camserve.export.resolve import resolve_layer

    model = build_model(name, size)
    layer = resolve_layer(model, MODELS[name][0])[1]
    gmodel = pgc.GuidedBackpropReLUModel(copy.deepcopy(model), device="cpu") if "guided" in MODELS[name][1] else None
    probe = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        diff = np.abs(model(torch.from_numpy(probe)).numpy() - session.run(probe).logits).max()
    log(f"{name}: max |logits(torch) - logits(ORT)| = {diff:.2e} (same weights)")
    lines = []
    for n in batches:
        x = np.random.default_rng(100 + n).standard_normal((n, 3, size, size), dtype=np.float32)
        t = torch.from_numpy(x)
        for e in MODELS[name][1]:
            for method in METHODS[e]:
                fns = {"ours": lambda m=method: explain(session, x, [[CLASS]] * n, [m])}
                if name.startswith("vit"):  # 1.5.7: "Invalid activation shape. Get 3."
                    r = interleaved(fns, repeats)
                    lines.append(f"| {name} | {n} | {method} | {r['ours'] * 1e3 / n:.1f} | n/a | n/a | oracle cannot run |")
                    continue
                fns["oracle"] = lambda m=method: oracle(m, model, layer, gmodel)(t)
                r = interleaved(fns, repeats)
                speed = r["oracle"] / r["ours"]
                lines.append(f"| {name} | {n} | {method} | {r['ours'] * 1e3 / n:.1f} | {r['oracle'] * 1e3 / n:.1f} | "
                             f"{speed:.2f}x | {_goal(speed, SPEED_GOAL, at_most=False)} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--size", type=int, default=224, help="input px (ViT: a multiple of 16)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sections", nargs="+", default=["graph", "memory", "oracle"], choices=["graph", "memory", "oracle"])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "camserve-bench-extras", help="export cache")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.threads)
        return 0

    import torch

    from camserve.pipeline.runtime import GraphSession

    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    args.work.mkdir(parents=True, exist_ok=True)
    tables = {
        "graph": ["| model | N | graph | ms | vs forward | vs explain graph | goal (vs forward) |", "|---|---|---|---|---|---|---|"],
        "memory": ["| model | graph | load peak MB | vs model.onnx | peak after 1 run MB | vs model.onnx | goal (load) |",
                   "|---|---|---|---|---|---|---|"],
        "oracle": ["| model | N | method | ours ms/image | pytorch-grad-cam ms/image | speed-up | goal |",
                   "|---|---|---|---|---|---|---|"],
    }
    for name in args.models:
        directory, forward = exported(name, args.size, args.work, log)
        session = GraphSession(directory, intra_op_threads=args.threads, verify_hash=False)
        if name.startswith("vit"):
            log("vit_b_16: shapley only (FullGrad needs Conv2d/BatchNorm2d biases, guided needs nn.ReLU; ViT has GELU)")
        if "graph" in args.sections:
            log(f"{name}: graph times ...")
            tables["graph"] += graph_section(name, session, forward, args.size, args.batches, args.repeats, args.threads)
        if "memory" in args.sections:
            log(f"{name}: memory (child processes) ...")
            tables["memory"] += memory_section(name, directory, forward, args.threads)
        if "oracle" in args.sections:
            log(f"{name}: explain() vs pytorch-grad-cam ...")
            tables["oracle"] += oracle_section(name, session, args.size, args.batches, args.repeats, log)
    titles = {"graph": "Graph time (median of interleaved runs)", "memory": "Peak RSS of one ORT session, net of a baseline child",
              "oracle": "Per-image time, explain() vs pytorch-grad-cam 1.5.7"}
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {args.threads} threads, {args.size} px, "
          f"median of {args.repeats} interleaved rounds (+1 warm-up), class {CLASS}")
    for section in args.sections:
        print(f"\n### {titles[section]}\n")
        print("\n".join(tables[section]))
    print("\nReproduce:\n\n    python bench/bench_extras.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
