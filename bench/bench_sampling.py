"""Throughput of a loaded server with background faithfulness sampling on vs off.

Goal: with ``metrics.sample_rate: 0.1`` a loaded server's throughput is >= 0.9 x the same
server without sampling. Two TorchServe instances of the same resnet50 export (random
weights, 224 px, ``layer4.-1``: bench_server.py's export, cached in ``bench/.cache/``), one
worker each, the same settings except ``metrics.sample_rate`` (0 and ``--rate``), are up
side by side; explained requests (GradCAM top-1, PNG, the same JPEG) are sent to one at a
time from ``--concurrency`` keep-alive client threads, in alternating bursts (off, on, off,
on, ...; ``--rounds`` of each) so that the shared machine's load hits both alike.

Before each "off" burst the bench waits until the sampling worker is idle again (its CPU time
stops growing: the queued samples are scored), so "off" never runs beside the other server's
backlog; an "on" burst thus starts with an empty sampling queue. The workers' CPU seconds per
request (``/proc/PID/stat``) are reported beside throughput: the "on" excess is what sampling
cost inside the bursts. At the end the sampled requests' outcomes are read from the sampling
server's ``/metrics`` (``camserve_faithfulness_samples_total{outcome=scored|dropped|failed}``).

    python bench/bench_sampling.py [--rate 0.1] [--concurrency 8] [--requests 64] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import drive, export_resnet50, request_jpeg, worker_pid  # noqa: E402

import numpy as np  # noqa: E402

GOAL = 0.9
MODEL = "resnet50"


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (threads that have ended included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, limit_s: float = 120.0, window_s: float = 0.5, busy: float = 0.05) -> float:
    """Seconds until worker ``pid`` has used under ``busy`` of a core over two windows in a row."""
    t0, quiet = time.perf_counter(), 0
    while time.perf_counter() - t0 < limit_s and quiet < 2:
        c0 = cpu_seconds(pid)
        time.sleep(window_s)
        quiet = quiet + 1 if cpu_seconds(pid) - c0 < busy * window_s else 0
    return time.perf_counter() - t0


def samples(instance: Any) -> dict[str, float]:
    """``camserve_faithfulness_samples_total`` by outcome, from the server's /metrics."""
    from camserve.pipeline.metrics import parse_prometheus

    with urllib.request.urlopen(f"{instance.metrics_url}/metrics", timeout=10) as resp:
        scraped = parse_prometheus(resp.read().decode())
    out: dict[str, float] = {"scored": 0.0, "dropped": 0.0, "failed": 0.0}
    for (name, labels), value in scraped.items():
        if name.startswith("camserve_faithfulness_samples"):
            outcome = dict(labels).get("outcome", "?")
            out[outcome] = out.get(outcome, 0.0) + value
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from camserve.config import PORT_FIELDS, load_config
    from camserve.serving.torchserve import server
    from camserve.serving.torchserve.archive import build_archive

    load_before = os.getloadavg()
    body = request_jpeg()
    export = export_resnet50()
    work = Path(tempfile.mkdtemp(prefix="camserve-bench-sampling-"))
    store = work / "model_store"
    build_archive(export, name=MODEL, version="1.0", model_store=store, batch_size=args.batch_size,
                  max_batch_delay_ms=args.max_batch_delay)
    metrics = {"sample_queue": args.queue} if args.queue else {}
    if args.sample_metrics:
        metrics["sample_metrics"] = args.sample_metrics
    modes = {"off": 0.0, "on": args.rate}
    instances: dict[str, Any] = {}
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    result: dict[str, Any] = {}
    try:
        for mode, rate in modes.items():
            config = load_config(overrides={
                "server": {**{p: 0 for p in PORT_FIELDS}, "host": "127.0.0.1", "batch_size": args.batch_size,
                           "max_batch_delay_ms": args.max_batch_delay, "workers": 1, "response_timeout_s": 300},
                "runtime": {"ort_threads": args.ort_threads},
                "metrics": {**metrics, "sample_rate": rate},
            })
            t = time.perf_counter()
            instances[mode] = server.start(config, run_dir=work / f"run-{mode}", model_store=store)
            print(f"server {mode} (sample_rate {rate}) READY in {time.perf_counter() - t:.0f} s; "
                  f"sampling: {config.metrics.sample_metrics}, queue {config.metrics.sample_queue}", flush=True)
        pids = {m: worker_pid(i, MODEL) for m, i in instances.items()}
        tokens = {m: i.key("inference") for m, i in instances.items()}
        for mode, inst in instances.items():  # warm-up: first calls allocate
            drive(inst.inference_url, tokens[mode], MODEL, body, True, args.warmup, 1)
        drains = []
        for r in range(args.rounds):
            for mode, inst in instances.items():
                if mode == "off":
                    drains.append(wait_idle(pids["on"]))
                cpu0 = cpu_seconds(pids[mode])
                chunk = drive(inst.inference_url, tokens[mode], MODEL, body, True, args.requests, args.concurrency)
                cpu = cpu_seconds(pids[mode]) - cpu0
                ok = len(chunk.latencies)
                runs[mode].append({"ok": ok, "errors": sum(chunk.errors.values()), "wall_s": chunk.wall_s, "cpu_s": cpu,
                                   "p50_ms": float(np.percentile(chunk.latencies, 50) * 1e3) if ok else float("nan"),
                                   "rps": ok / chunk.wall_s})
                print(f"  round {r + 1} {mode:3s}: {ok}/{args.requests} ok, {ok / chunk.wall_s:6.2f} req/s, "
                      f"p50 {runs[mode][-1]['p50_ms']:6.0f} ms, worker CPU {cpu / max(ok, 1) * 1e3:5.0f} ms/req"
                      + (f", errors {chunk.errors}" if chunk.errors else ""), flush=True)
        drains.append(wait_idle(pids["on"]))
        result["samples"] = {m: samples(i) for m, i in instances.items()}
        result["drain_s"] = [round(d, 1) for d in drains[1:]]  # the first is before any "on" burst
    finally:
        for mode in instances:
            server.stop(work / f"run-{mode}")
        shutil.rmtree(work, ignore_errors=True)
    result["runs"] = runs
    result["settings"] = {"rate": args.rate, "concurrency": args.concurrency, "requests_per_burst": args.requests,
                          "rounds": args.rounds, "batch_size": args.batch_size, "max_batch_delay_ms": args.max_batch_delay,
                          "ort_threads": args.ort_threads, "queue": args.queue or "default",
                          "sample_metrics": args.sample_metrics or "default"}
    result["machine"] = {"cpus": os.cpu_count(), "load_before": round(load_before[0], 2),
                         "load_after": round(os.getloadavg()[0], 2)}
    return result


def markdown(result: dict[str, Any]) -> str:
    runs, s = result["runs"], result["settings"]
    total = {m: {k: sum(r[k] for r in v) for k in ("ok", "errors", "wall_s", "cpu_s")} for m, v in runs.items()}
    rps = {m: t["ok"] / t["wall_s"] for m, t in total.items()}
    ratio = rps["on"] / rps["off"]
    per_round = [on["rps"] / off["rps"] for off, on in zip(runs["off"], runs["on"])]
    rows = ["| sampling | explained requests | req/s (all rounds) | req/s per round | p50 ms (median of rounds) | "
            "worker CPU ms/req | samples scored / dropped / failed |",
            "|---|---:|---:|---|---:|---:|---|"]
    for mode, label in (("off", "off (sample_rate 0)"), ("on", f"on (sample_rate {s['rate']})")):
        t, smp = total[mode], result.get("samples", {}).get(mode, {})
        failed = f" ({t['errors']} failed)" if t["errors"] else ""
        per = ", ".join(f"{r['rps']:.2f}" for r in runs[mode])
        rows.append(f"| {label} | {t['ok']}{failed} | {rps[mode]:.2f} | {per} | "
                    f"{statistics.median(r['p50_ms'] for r in runs[mode]):.0f} | {t['cpu_s'] / max(t['ok'], 1) * 1e3:.0f} | "
                    f"{smp.get('scored', 0):.0f} / {smp.get('dropped', 0):.0f} / {smp.get('failed', 0):.0f} |")
    lines = ["\n".join(rows), ""]
    lines.append(f"- throughput on / off: {ratio:.3f} (per round {', '.join(f'{v:.2f}' for v in per_round)}; "
                 f"goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'})")
    drawn = sum(result.get("samples", {}).get("on", {}).values())
    lines.append(f"- drawn {drawn:.0f} of {total['on']['ok']} explained requests on the sampling server "
                 f"(+ warm-up); its queue drained {', '.join(f'{d:.1f}' for d in result.get('drain_s', []))} s after each "
                 f"'on' burst (before the next 'off' one)")
    m = result["machine"]
    lines.append(f"- resnet50 224 px, GradCAM top-1, concurrency {s['concurrency']}, {s['requests_per_burst']} requests "
                 f"per burst x {s['rounds']} rounds per mode, server batch {s['batch_size']}, max delay "
                 f"{s['max_batch_delay_ms']} ms, ORT threads {s['ort_threads'] or 'all cores'}, sample_metrics "
                 f"{s['sample_metrics']}, queue {s['queue']}; {m['cpus']} CPUs, load average {m['load_before']:.1f} "
                 f"before / {m['load_after']:.1f} after")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=0.1, help="metrics.sample_rate of the sampling server (default 0.1)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--requests", type=int, default=64, help="explained requests per burst (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="bursts per mode, alternating off/on (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up requests per server (default 3)")
    p.add_argument("--sample-metrics", default="", help="metrics.sample_metrics (default: the config's)")
    p.add_argument("--queue", type=int, default=0, help="metrics.sample_queue (0: the config's default)")
    p.add_argument("--batch-size", type=int, default=8, help="server batch size (default 8)")
    p.add_argument("--max-batch-delay", type=int, default=10, help="server max batch delay in ms (default 10)")
    p.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime threads per worker (0 = all cores)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    from camserve.errors import CamserveError

    try:
        result = run(args)
    except CamserveError as exc:
        print(f"bench_sampling: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    print()
    print(markdown(result))
    print("\nReproduce:\n\n    python bench/bench_sampling.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
