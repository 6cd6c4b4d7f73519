"""Latency and memory of the explain graph against the plain forward-only graph.

For each model, the graph from ``camserve.export`` (logits + activations + gradients,
top-1 cotangent via ``target_rank``) and a forward-only graph of the same model exported
directly with ``torch.onnx.export(dynamo=True)`` run in ONNX Runtime CPU with the same
thread count. Runs alternate between the two sessions (this machine is shared and
noisy), and the table prints median latencies and their ratio, plus each session's RSS
peak at load and in steady state (measured in a fresh child process per graph).

    python bench/bench_export.py [--models resnet50 vit_b_16 ...] [--batches 1 8] [--threads 2] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import _alternate  # noqa: E402,F401  (first: BLAS threads, and no spinning between the two sessions' turns)
import numpy as np  # noqa: E402

LAYERS = {"resnet50": "layer4.-1", "vit_b_16": "encoder.layers.-1.ln_1", "vit_b_32": "encoder.layers.-1.ln_1",
          "resnet18": "layer4.-1", "swin_t": "features.-1", "convnext_tiny": "features.-1", "efficientnet_b0": "features.-1"}
CACHE = Path(__file__).resolve().parent / ".cache"


def export_digest() -> str:
    """A short hash of the export code: a cached graph from older export code is not reused."""
    import hashlib

    root = Path(__file__).resolve().parent.parent / "export"
    h = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


def export_pair(name: str) -> tuple[Path, Path]:
    """Export (once, cached) the explain graph and the forward-only graph of ``name``."""
    import torch
    import torchvision

    from camserve.export import export_model
    from camserve.export.onnx_export import export_graph

    route, plain = CACHE / f"{name}-{export_digest()}", CACHE / f"{name}-forward.onnx"
    if not (route / "model.onnx").exists() or not plain.exists():
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        for m in model.modules():  # ViT's zero head would make every gradient 0
            if isinstance(m, torch.nn.Linear) and not torch.any(m.weight):
                torch.nn.init.normal_(m.weight, std=0.02)
        export_model(model, [LAYERS[name]], route, model_name=name, check=False)
        export_graph(model, (torch.randn(2, 3, 224, 224),), ["image"], ["logits"], plain)
    return route / "model.onnx", plain


def memory_child(graph: str, threads: int, explain: bool) -> None:
    """Child process: load one session, run a few batches, print VmHWM/VmRSS in MB."""
    from camserve.pipeline.runtime import create_session, session_options

    def status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        return float("nan")

    sess = create_session(graph, session_options(threads), ["CPUExecutionProvider"])  # as the servers load it
    load_peak = status("VmHWM")
    feeds = {"image": np.random.default_rng(0).standard_normal((8, 3, 224, 224), dtype=np.float32)}
    if explain:
        feeds |= {"cotangent": np.zeros((8, 1000), np.float32), "target_rank": np.zeros(8, np.int64)}
    for _ in range(3):
        sess.run(None, feeds)
    print(json.dumps({"load_peak_mb": load_peak, "steady_rss_mb": status("VmRSS")}))


def memory(graph: Path, threads: int, explain: bool, children: int = 5) -> dict[str, float]:
    """The smallest of ``children`` fresh children's figures. Loaded as the servers load (with
    ``camserve.pipeline.malloc.loading``) every process reads the same peak; with glibc's
    default mmap threshold the peak moved between modes about 100 MB apart from one process
    to the next (vit_b_32's forward 447, 537 or 636-645 MB)."""
    runs = []
    for _ in range(children):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(graph), "--threads", str(threads)] + (["--explain"] if explain else []),
            capture_output=True, text=True, check=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: min(run[key] for run in runs) for key in runs[0]}


def latency(route: Path, plain: Path, batch: int, threads: int, rounds: int) -> tuple[float, float]:
    from camserve.pipeline.runtime import create_session, session_options

    opts = session_options(threads)
    s_route = create_session(route, opts, ["CPUExecutionProvider"])
    s_plain = create_session(plain, opts, ["CPUExecutionProvider"])
    image = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    f_route = {"image": image, "cotangent": np.zeros((batch, 1000), np.float32), "target_rank": np.zeros(batch, np.int64)}
    f_plain = {"image": image}
    t_route, t_plain = [], []
    for i in range(rounds + 2):
        for sess, feeds, acc in ((s_route, f_route, t_route), (s_plain, f_plain, t_plain))[:: 1 if i % 2 else -1]:
            t0 = time.perf_counter()
            sess.run(None, feeds)
            if i >= 2:  # first two rounds warm up
                acc.append(time.perf_counter() - t0)
    return statistics.median(t_route), statistics.median(t_plain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16", "vit_b_32", "swin_t", "convnext_tiny", "efficientnet_b0"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--explain", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.threads, args.explain)
        return
    rows = []
    print(f"ONNX Runtime CPU, {args.threads} intra-op threads, median of {args.rounds} alternating runs")
    print("| model | batch | explain graph ms | forward graph ms | ratio | load peak MB (explain / forward) | steady RSS MB (explain / forward) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        route, plain = export_pair(name)
        mem_r, mem_p = memory(route, args.threads, True), memory(plain, args.threads, False)
        for batch in args.batches:
            t_r, t_p = latency(route, plain, batch, args.threads, args.rounds)
            row = {"model": name, "batch": batch, "explain_ms": t_r * 1e3, "forward_ms": t_p * 1e3, "ratio": t_r / t_p,
                   "load_peak_mb": [mem_r["load_peak_mb"], mem_p["load_peak_mb"]],
                   "steady_rss_mb": [mem_r["steady_rss_mb"], mem_p["steady_rss_mb"]]}
            rows.append(row)
            print(f"| {name} | {batch} | {row['explain_ms']:.1f} | {row['forward_ms']:.1f} | {row['ratio']:.2f} | "
                  f"{mem_r['load_peak_mb']:.0f} / {mem_p['load_peak_mb']:.0f} | {mem_r['steady_rss_mb']:.0f} / {mem_p['steady_rss_mb']:.0f} |",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
