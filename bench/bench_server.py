"""Serving speed and memory: a real TorchServe driven over loopback from this process.

Serves resnet50 (random weights, 224 px, target layer ``layer4.-1``) and a trivial 1-conv
model in one TorchServe instance (one worker each, free loopback ports, token auth on) and
sends a fixed number of JPEG requests at each concurrency (threads, one keep-alive
``http.client`` connection per thread), with explanations off (``/predictions``) and on
(``/explanations``, GradCAM top-1, default PNG output). Off and on alternate in bursts
(``--rounds``) at each concurrency, so that background load hits both alike. It reports images per second, p50
and p99 latency, and checks issue 4's goals:

* throughput with GradCAM on >= 0.85 x explanations off, per concurrency;
* p50 of a single request (concurrency 1) < 1.3 x (bare ONNX Runtime latency of the same
  graph, ``GraphSession.run`` batch 1 with the worker's thread count, + the frontend's
  fixed cost = p50 of the same request to the trivial model).

Memory: the resnet50 worker's peak RSS at model load (VmHWM right after READY) and its
RSS/peak after the runs. Exports are cached under ``bench/.cache/`` (``check=False``).

    python bench/bench_server.py [--requests 1:40,8:80,32:96] [--rounds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
SIZE = 224
#: Goals of issue 4.
THROUGHPUT_GOAL, LATENCY_FACTOR = 0.85, 1.3


# ---------------------------------------------------------------- models ---------


def export_resnet50() -> Path:
    """resnet50, random weights (seed 0), layer4.-1, 224 px; exported once (bench_export.py's
    recipe, cached in ``bench/.cache/resnet50``)."""
    out = CACHE / "resnet50"
    if not (out / "manifest.json").is_file():
        import torch
        import torchvision

        from camserve.export import export_model

        torch.manual_seed(0)
        model = torchvision.models.get_model("resnet50", weights=None).eval()
        export_model(model, ["layer4.-1"], out, input_size=SIZE, model_name="resnet50", check=False)
    return out


def export_trivial() -> Path:
    """One 3x3 conv (4 channels), global pooling, 10 classes, 224 px: a model whose own
    cost is negligible, so a request to it measures the serving path's fixed cost."""
    out = CACHE / "trivial-224"
    if not (out / "manifest.json").is_file():
        import torch
        from torch import nn

        from camserve.export import export_model

        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
        export_model(model.eval(), ["0"], out, input_size=SIZE, model_name="trivial", check=False)
    return out


def request_jpeg(seed: int = 0) -> bytes:
    """A smooth random 224 x 224 RGB JPEG (quality 90): the request body."""
    import cv2

    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img.astype(np.int16) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


# ---------------------------------------------------------------- load -----------


@dataclass
class RunResult:
    model: str
    explain: bool
    concurrency: int
    requests: int
    ok: int
    errors: dict[str, int]
    wall_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float


@dataclass
class Chunk:
    """Raw samples of one burst: latencies (s), images per model call, errors, wall time (s)."""

    latencies: list[float]
    batches: list[int]
    errors: dict[str, int]
    wall_s: float


def drive(url: str, token: str | None, model: str, body: bytes, explain: bool, total: int, concurrency: int,
          timeout: float = 300.0) -> Chunk:
    """Send ``total`` requests from ``concurrency`` threads; every answer is checked (status
    200, JSON with explanations exactly when asked)."""
    parts = urllib.parse.urlsplit(url)
    path = f"/{'explanations' if explain else 'predictions'}/{model}"
    headers = {"Content-Type": "image/jpeg", "Connection": "keep-alive"}
    if explain:
        headers["X-Camserve-Params"] = "methods=gradcam"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    counter = itertools.count()  # next() is atomic under the GIL
    latencies: list[float] = []
    batches: list[int] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()

    def worker(start: threading.Barrier) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        start.wait()
        while next(counter) < total:
            t = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                dt = time.perf_counter() - t
                answer = json.loads(data) if resp.status == 200 else None
                if answer is None:
                    kind = f"HTTP {resp.status}"
                elif bool(answer["images"][0].get("explanations")) != explain:
                    kind = "wrong answer"
                else:
                    kind = ""
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                kind = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
            with lock:
                if kind:
                    errors[kind] = errors.get(kind, 0) + 1
                else:
                    latencies.append(dt)
                    batches.append(int(answer.get("batch", {}).get("images", 1)))
        conn.close()

    return Chunk(latencies, batches, errors, concurrently(worker, concurrency))


def concurrently(worker: Callable[[threading.Barrier], None], concurrency: int) -> float:
    """Run ``worker(barrier)`` in ``concurrency`` threads released together; the wall seconds
    from their release (each worker waits on the barrier first) until the last one ends."""
    barrier = threading.Barrier(concurrency + 1)
    threads = [threading.Thread(target=worker, args=(barrier,), daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    return time.perf_counter() - t0


def measure(url: str, token: str | None, model: str, body: bytes, total: int, concurrency: int,
            rounds: int) -> list[RunResult]:
    """Explanations off and on, ``total`` requests each, sent in ``rounds`` alternating bursts
    (off, on, off, on, ...) so that the shared machine's changing load hits both alike."""
    sizes = [total // rounds + (i < total % rounds) for i in range(rounds)]
    chunks: dict[bool, list[Chunk]] = {False: [], True: []}
    for size in sizes:
        for explain in (False, True):
            chunks[explain].append(drive(url, token, model, body, explain, size, concurrency))
    out = []
    for explain, parts in chunks.items():
        lat = np.array([v for c in parts for v in c.latencies]) * 1000.0
        batches = [b for c in parts for b in c.batches]
        errors: dict[str, int] = {}
        for c in parts:
            for k, v in c.errors.items():
                errors[k] = errors.get(k, 0) + v
        wall = sum(c.wall_s for c in parts)
        lat = lat if lat.size else np.array([np.nan])
        out.append(RunResult(model=model, explain=explain, concurrency=concurrency, requests=total, ok=len(batches),
                             errors=errors, wall_s=round(wall, 3), images_per_s=round(len(batches) / wall, 2),
                             p50_ms=round(float(np.percentile(lat, 50)), 1), p99_ms=round(float(np.percentile(lat, 99)), 1),
                             mean_batch=round(float(np.mean(batches)) if batches else 0.0, 2)))
    return out


# ---------------------------------------------------------------- measures -------


def proc_status(pid: int) -> dict[str, float]:
    """VmHWM (peak RSS) and VmRSS of ``pid`` in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmHWM", "VmRSS"):
            out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def worker_pid(instance: Any, model: str) -> int:
    req_headers = {"Authorization": f"Bearer {instance.key('management')}"} if instance.key("management") else {}
    parts = urllib.parse.urlsplit(instance.management_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", f"/models/{model}", headers=req_headers)
    data = json.loads(conn.getresponse().read())
    conn.close()
    return int(data[0]["workers"][0]["pid"])


def bare_ort_ms(export_dir: Path, body: bytes, threads: int, repeats: int) -> float:
    """p50 of GraphSession.run on one preprocessed image, top-1 cotangent (what a GradCAM
    request's model call is), with ``threads`` intra-op threads."""
    from camserve.pipeline import imageio
    from camserve.pipeline.runtime import GraphSession

    session = GraphSession(export_dir, intra_op_threads=threads, providers=["CPUExecutionProvider"])
    m = session.manifest
    x = imageio.preprocess([imageio.decode(body, 10**8)], m.input_size, m.mean, m.std, m.channel_order)
    rank = np.zeros(1, np.int64)
    for _ in range(3):
        session.run(x, target_rank=rank)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(x, target_rank=rank)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000.0)


def parse_requests(text: str) -> list[tuple[int, int]]:
    """``"1:40,8:96"`` -> [(1, 40), (8, 96)]: concurrency and request count pairs."""
    try:
        pairs = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]
        if not pairs or any(len(p) != 2 or p[0] < 1 or p[1] < p[0] for p in pairs):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--requests wants CONCURRENCY:COUNT pairs with COUNT >= CONCURRENCY, got {text!r}")
    return pairs  # type: ignore[return-value]


# ---------------------------------------------------------------- main -----------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from camserve.serving.torchserve import server
    from camserve.serving.torchserve.archive import build_archive
    from camserve.config import PORT_FIELDS, load_config

    load_before = os.getloadavg()
    body = request_jpeg()
    t = time.perf_counter()
    resnet, trivial = export_resnet50(), export_trivial()
    print(f"exports ready ({time.perf_counter() - t:.0f} s, cached in {CACHE})", flush=True)
    work = Path(tempfile.mkdtemp(prefix="camserve-bench-"))
    store, run_dir = work / "model_store", work / "serve_run"
    ports = {p: 0 for p in PORT_FIELDS}
    config = load_config(overrides={
        "server": {**ports, "host": "127.0.0.1", "batch_size": args.batch_size, "max_batch_delay_ms": args.max_batch_delay,
                   "workers": 1, "response_timeout_s": 300},
        "runtime": {"ort_threads": args.ort_threads},
    })
    threads = config.runtime.threads_for(1)
    runs: list[RunResult] = []
    memory: dict[str, Any] = {}
    bare: float | None = None
    try:
        for export, name in ((resnet, "resnet50"), (trivial, "trivial")):
            build_archive(export, name=name, version="1.0", model_store=store, batch_size=args.batch_size,
                          max_batch_delay_ms=args.max_batch_delay)
        t = time.perf_counter()
        instance = server.start(config, run_dir=run_dir, model_store=store)
        print(f"TorchServe READY ({time.perf_counter() - t:.0f} s), ORT threads per worker {threads}", flush=True)
        pid = worker_pid(instance, "resnet50")
        memory["at_load"] = proc_status(pid)
        token = instance.key("inference")
        for explain in (False, True):  # warm-up: first calls allocate
            drive(instance.inference_url, token, "resnet50", body, explain, args.warmup, 1)
            drive(instance.inference_url, token, "trivial", body, explain, args.warmup, 1)
        for model, concurrency, total in [("trivial", 1, args.single)] + [("resnet50", c, n) for c, n in args.requests]:
            if model == "resnet50" and bare is None:  # next to the single-request runs, server idle
                bare = bare_ort_ms(resnet, body, threads, args.single)
                print(f"bare ONNX Runtime (resnet50, batch 1, {threads} threads): p50 {bare:.1f} ms", flush=True)
            rounds = max(1, min(args.rounds, total // concurrency))
            for r in measure(instance.inference_url, token, model, body, total, concurrency, rounds):
                runs.append(r)
                print(_line(r), flush=True)
        memory["after_run"] = proc_status(pid)
        memory["worker_pid"] = pid
    finally:
        if (run_dir / "state.json").is_file() or (run_dir / "tmp" / ".model_server.pid").is_file():
            server.stop(run_dir)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "runs": [asdict(r) for r in runs],
        "bare_ort_p50_ms": round(bare or float("nan"), 1),
        "memory_mb": memory,
        "settings": {"requests": args.requests, "rounds": args.rounds, "single": args.single, "batch_size": args.batch_size,
                     "max_batch_delay_ms": args.max_batch_delay, "ort_threads": threads, "image": f"{SIZE}x{SIZE} JPEG"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_before": [round(v, 2) for v in load_before],
                    "load_after": [round(v, 2) for v in os.getloadavg()]},
    }


def _line(r: RunResult) -> str:
    err = f", errors {r.errors}" if r.errors else ""
    return (f"  {r.model:9s} explain {'on ' if r.explain else 'off'} c={r.concurrency:<3d} {r.ok}/{r.requests} ok  "
            f"{r.images_per_s:7.2f} img/s  p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms{err}")


def checks(result: dict[str, Any]) -> dict[str, Any]:
    """The goal checks of issue 4 from the measured runs."""
    runs = [RunResult(**r) for r in result["runs"]]
    by = {(r.model, r.explain, r.concurrency): r for r in runs}
    ratios = {c: round(by["resnet50", True, c].images_per_s / by["resnet50", False, c].images_per_s, 3)
              for (m, e, c) in by if m == "resnet50" and e}
    single = {}
    for explain in (False, True):
        if ("resnet50", explain, 1) in by:
            fixed = by["trivial", explain, 1].p50_ms
            bound = LATENCY_FACTOR * (result["bare_ort_p50_ms"] + fixed)
            p50 = by["resnet50", explain, 1].p50_ms
            single["on" if explain else "off"] = {"p50_ms": p50, "frontend_fixed_ms": fixed, "bound_ms": round(bound, 1),
                                                  "ratio": round(p50 / (bound / LATENCY_FACTOR), 3), "ok": p50 < bound}
    return {"throughput_ratio": ratios, "throughput_ok": all(v >= THROUGHPUT_GOAL for v in ratios.values()),
            "single_request": single}


def markdown(result: dict[str, Any], check: dict[str, Any]) -> str:
    rows = ["| model | explanations | concurrency | requests | images/s | p50 ms | p99 ms | mean batch |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        rows.append(f"| {r['model']} | {'GradCAM' if r['explain'] else 'off'} | {r['concurrency']} | {r['ok']}"
                    f"{'' if not r['errors'] else ' (' + str(sum(r['errors'].values())) + ' failed)'} | "
                    f"{r['images_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} |")
    lines = ["\n".join(rows), ""]
    ratios = ", ".join(f"c={c}: {v:.2f}" for c, v in check["throughput_ratio"].items())
    lines.append(f"- throughput GradCAM on / off: {ratios} (goal >= {THROUGHPUT_GOAL}: "
                 f"{'met' if check['throughput_ok'] else 'NOT met'})")
    for mode, s in check["single_request"].items():
        lines.append(f"- single request p50, explanations {mode}: {s['p50_ms']:.0f} ms vs {LATENCY_FACTOR} x "
                     f"(bare ORT {result['bare_ort_p50_ms']:.0f} ms + frontend fixed {s['frontend_fixed_ms']:.0f} ms) = "
                     f"{s['bound_ms']:.0f} ms ({s['ratio']:.2f} x; {'met' if s['ok'] else 'NOT met'})")
    mem = result["memory_mb"]
    if "at_load" in mem:
        lines.append(f"- resnet50 worker memory: peak {mem['at_load'].get('VmHWM', 0):.0f} MB at model load; "
                     f"after the runs RSS {mem.get('after_run', {}).get('VmRSS', 0):.0f} MB, "
                     f"peak {mem.get('after_run', {}).get('VmHWM', 0):.0f} MB")
    m, s = result["machine"], result["settings"]
    lines.append(f"- {m['cpus']} CPUs, load average {m['load_before'][0]:.1f} before / {m['load_after'][0]:.1f} after; "
                 f"ORT threads {s['ort_threads']}, server batch {s['batch_size']}, max delay {s['max_batch_delay_ms']} ms, "
                 f"body {s['image']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=parse_requests, default=parse_requests("1:40,8:80,32:96"),
                   help="CONCURRENCY:COUNT pairs for resnet50 (default 1:40,8:80,32:96)")
    p.add_argument("--single", type=int, default=40, help="single requests to the trivial model and bare ORT runs (default 40)")
    p.add_argument("--rounds", type=int, default=2, help="alternating off/on bursts per concurrency (default 2)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up requests per model and mode (default 3)")
    p.add_argument("--batch-size", type=int, default=8, help="server batch size (default 8)")
    p.add_argument("--max-batch-delay", type=int, default=10, help="server max batch delay in ms (default 10)")
    p.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime threads per worker (0 = all cores)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    from camserve.errors import CamserveError

    try:
        result = run(args)
    except CamserveError as exc:
        print(f"bench_server: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    check = checks(result)
    result["checks"] = check
    print()
    print(markdown(result, check))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
