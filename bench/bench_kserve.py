"""KServe beside TorchServe: the same model, images and client, side by side in one run.

Serves resnet50 (random weights, 224 px, ``layer4.-1``) with ``camserve kserve serve`` and
with ``camserve serve`` (TorchServe, server batch 8, 10 ms delay), each with ONNX Runtime on
every core and the SQLite audit on, and sends JPEG requests from loopback threads, each
thread one keep-alive connection: KServe through the Open Inference Protocol v2 (``infer``,
base64 BYTES), TorchServe through ``/predictions`` and ``/explanations``. Explanations
off and on (GradCAM top-1, PNG) and the two servers alternate in bursts, so background load
hits all alike. Prints images/s and p50 per server, mode and concurrency, the GradCAM on/off
throughput ratio per server (goal >= 0.85 on KServe, as on TorchServe) and KServe's images/s
at concurrency 8 against TorchServe's; worker RSS at load (peak) and after the runs.

    python bench/bench_kserve.py [--requests 1:24,8:64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_server import concurrently, export_resnet50, parse_requests, proc_status, request_jpeg, worker_pid  # noqa: E402


def drive(url: str, request: callable, total: int, concurrency: int) -> tuple[list[float], int, float]:
    """``total`` requests from ``concurrency`` threads: (latencies of 200 answers, errors, wall s)."""
    parts = urllib.parse.urlsplit(url)
    counter = itertools.count()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def worker(barrier: threading.Barrier) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
        barrier.wait()
        while next(counter) < total:
            method, path, body, headers = request()
            t = time.perf_counter()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors[0] += 1
        conn.close()

    wall = concurrently(worker, concurrency)
    return latencies, errors[0], wall


def main(argv: list[str] | None = None) -> int:
    from camserve.cli import kserve as kserve_cli
    from camserve.serving.torchserve import server
    from camserve.serving.torchserve.archive import build_archive
    from camserve.config import PORT_FIELDS, load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=parse_requests, default=parse_requests("1:24,8:64"))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)

    body = request_jpeg()
    b64 = base64.b64encode(body).decode()
    export = export_resnet50()
    work = Path(tempfile.mkdtemp(prefix="camserve-bench-kserve-"))
    build_archive(export, name="resnet50", version="1.0", model_store=work / "store")
    config = load_config(overrides={"server": {p: 0 for p in PORT_FIELDS}})
    ts = server.start(config, run_dir=work / "ts_run", model_store=work / "store")
    ks = kserve_cli.start([str(export)], run_dir=work / "ks_run", http_port=0, grpc=False)
    memory = {"torchserve": proc_status(worker_pid(ts, "resnet50")), "kserve": proc_status(ks["pid"])}
    token = ts.key("inference")

    def ts_request(explain: bool):
        headers = {"Content-Type": "image/jpeg", "Authorization": f"Bearer {token}"}
        if explain:
            headers["X-Camserve-Params"] = "methods=gradcam"
        return lambda: ("POST", f"/{'explanations' if explain else 'predictions'}/resnet50", body, headers)

    def ks_request(explain: bool):
        params = {"methods": "gradcam"} if explain else {"explain": False}
        payload = json.dumps({"parameters": params, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                                   "data": [b64]}]}).encode()
        return lambda: ("POST", "/v2/models/resnet50/infer", payload, {"Content-Type": "application/json"})

    sides = {"torchserve": (ts.inference_url, ts_request), "kserve": (ks["url"], ks_request)}
    samples: dict[tuple[str, bool, int], list] = {}
    try:
        for name, (url, make) in sides.items():  # warm-up
            for explain in (False, True):
                drive(url, make(explain), 4, 1)
        for concurrency, total in args.requests:
            for _ in range(args.rounds):
                for explain in (False, True):
                    for name, (url, make) in sides.items():
                        lat, errors, wall = drive(url, make(explain), total // args.rounds, concurrency)
                        s = samples.setdefault((name, explain, concurrency), [[], 0, 0.0])
                        s[0] += lat
                        s[1] += errors
                        s[2] += wall
        memory = {k: {**v, **{f"after_{m}": x for m, x in proc_status(
            worker_pid(ts, "resnet50") if k == "torchserve" else ks["pid"]).items()}} for k, v in memory.items()}
    finally:
        kserve_cli.stop(work / "ks_run")
        server.stop(work / "ts_run")
    print("| server | explanations | concurrency | requests | errors | images/s | p50 ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rate = {}
    for (name, explain, concurrency), (lat, errors, wall) in samples.items():
        rate[(name, explain, concurrency)] = len(lat) / wall
        print(f"| {name} | {'GradCAM' if explain else 'off'} | {concurrency} | {len(lat) + errors} | {errors} | "
              f"{len(lat) / wall:.2f} | {statistics.median(lat) * 1000:.0f} |")
    for concurrency, _ in args.requests:
        for name in sides:
            print(f"- {name} GradCAM on / off throughput at c={concurrency}: "
                  f"{rate[(name, True, concurrency)] / rate[(name, False, concurrency)]:.2f}")
        print(f"- KServe / TorchServe images/s at c={concurrency}, GradCAM on: "
              f"{rate[('kserve', True, concurrency)] / rate[('torchserve', True, concurrency)]:.2f}")
    print(f"- memory (MB): {json.dumps(memory)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
