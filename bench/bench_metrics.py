"""What camserve's metrics cost a worker per server batch: TorchServe histograms vs bucket counters.

TorchServe's histograms have fixed buckets (5 ms .. 10 s), so camserve records each of its
histograms as ``NAME_bucket{le}`` / ``NAME_sum`` / ``NAME_count`` counters (issue 11). Each
counter update is one ``[METRICS]`` log line from the worker to the frontend, so a batch
now writes more lines. This measures, in-process with TorchServe's own metric cache and a
log handler like the worker's (stdout, here sent to /dev/null), the lines and microseconds
per server batch of one GradCAM model call, for both ways, interleaved in one run:

* ``histograms``: one TorchServe histogram observation per value (the old way);
* ``buckets``: camserve's :class:`camserve.pipeline.metrics.Recorder` as the handler uses it: plain
  counters at once, histogram deltas in memory, sent by a background thread once a second
  (its cost per flush is printed separately: it does not grow with the request rate).

The frontend's parsing of the extra lines is not in these figures (it runs in the JVM, off
the worker's critical path).

    python bench/bench_metrics.py [--batches 2000]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def cache_for(metrics_yaml: Path):
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    cache = MetricsCacheYamlImpl(config_file_path=str(metrics_yaml))
    cache.initialize_cache()
    return cache


class Counting(logging.Handler):
    """Writes each record like the worker's stdout handler does, and counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines = 0
        self.stream = open(os.devnull, "w")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1
        self.stream.write(self.format(record) + "\n")


def old_batch(cache, dims: list[str]) -> None:
    """One server batch recorded with plain TorchServe histograms (pre-issue-11 handler)."""
    from ts.metrics.metric_type_enum import MetricTypes

    counter, histogram = MetricTypes.COUNTER, MetricTypes.HISTOGRAM
    cache.get_metric("camserve_requests_total", counter).add_or_update(1, dims)
    cache.get_metric("camserve_batch_size", histogram).add_or_update(1, dims)
    cache.get_metric("camserve_explain_latency_seconds", histogram).add_or_update(0.004, [*dims, "gradcam"])
    for name, value in (("camserve_inference_latency_seconds", 0.05), ("camserve_preprocess_latency_seconds", 0.002),
                        ("camserve_encode_latency_seconds", 0.003)):
        cache.get_metric(name, histogram).add_or_update(value, dims)


def new_batch(recorder) -> None:
    """The same batch through camserve's Recorder (bucket counters, plus the per-request latency)."""
    recorder.requests(1)
    recorder.batch(1)
    recorder.explain("gradcam", 0.004)
    recorder.inference(0.05)
    recorder.preprocess(0.002)
    recorder.encode(0.003)
    recorder.request_latency(0.06, 1)


def main() -> int:
    import yaml

    from camserve.pipeline.metrics import METRICS, Recorder, metrics_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    handler = Counting()
    logger = logging.getLogger("ts.metrics")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    with tempfile.TemporaryDirectory() as tmp:
        new_yaml = Path(tmp) / "new.yaml"
        new_yaml.write_text(yaml.safe_dump(metrics_config()))
        old = yaml.safe_load(new_yaml.read_text())
        old["model_metrics"] = {"counter": [{"name": n, "unit": u, "dimensions": list(d)} for n, k, u, d, _ in METRICS if k == "counter"],
                                "histogram": [{"name": n, "unit": u, "dimensions": list(d)} for n, k, u, d, _ in METRICS if k == "histogram"]}
        old_yaml = Path(tmp) / "old.yaml"
        old_yaml.write_text(yaml.safe_dump(old))
        old_cache, new_cache = cache_for(old_yaml), cache_for(new_yaml)
    recorder = Recorder(new_cache, "resnet50", "1.0", max_batch_size=64)
    dims = ["resnet50", "1.0"]
    times: dict[str, list[float]] = {"histograms": [], "buckets": []}
    lines: dict[str, int] = {}
    flush_us: list[float] = []
    flush_lines = 0
    for _ in range(args.rounds):  # interleaved, so machine noise hits both alike
        for name, run in (("histograms", lambda: old_batch(old_cache, dims)), ("buckets", lambda: new_batch(recorder))):
            before = handler.lines
            start = time.perf_counter()
            for _ in range(args.batches):
                run()
            times[name].append((time.perf_counter() - start) / args.batches * 1e6)
            lines[name] = (handler.lines - before) // args.batches
        before = handler.lines  # what the background thread sends once per flush_s, however many batches
        start = time.perf_counter()
        recorder.flush()
        flush_us.append((time.perf_counter() - start) * 1e6)
        flush_lines = handler.lines - before
    old_us, new_us = statistics.median(times["histograms"]), statistics.median(times["buckets"])
    print("| metrics | log lines per batch (request path) | us per batch on the request path (median of rounds) |")
    print("|---|---:|---:|")
    print(f"| TorchServe histograms (before) | {lines['histograms']} | {old_us:.0f} |")
    print(f"| camserve bucket counters | {lines['buckets']} | {new_us:.0f} |")
    print(f"ratio buckets / histograms on the request path: {new_us / old_us:.2f}")
    print(f"background flush (once per second, any number of batches): {flush_lines} lines, "
          f"{statistics.median(flush_us) / 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
