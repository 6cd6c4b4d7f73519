"""Side-by-side timing for the benchmarks: each call once to warm up, then ``repeats`` rounds
that run every call in turn, the order reversed every other round (this machine is shared and
noisy: alternating keeps the ratios fair when the load changes), medians in seconds."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    # as the servers set them (imported before numpy): BLAS threads left spinning after a
    # method's numpy work slow the graph run that follows (detection at batch 1: 1.24-1.30x
    # with them, 1.00x run by run alone)
    os.environ.setdefault(_var, "1")
# Sessions that take turns must not spin-wait between runs: each has its own intra-op threads,
# and the idle session's spinning slowed the other one's run by up to 1.5x (vit_b_32 at batch 1:
# 80 ms side by side against 53 ms with spinning off; alone, spinning is 2-10% faster).
os.environ.setdefault("CAMSERVE_SPIN", "0")


def medians(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call name over ``repeats`` alternating rounds (after one warm-up each)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    items = list(calls.items())
    for round_ in range(repeats):
        for name, fn in items if round_ % 2 == 0 else items[::-1]:  # no call always runs first
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def ratio_table(title: str, runs: dict[int, dict[str, float]], base: str = "forward") -> str:
    """A markdown table of per-batch medians (``runs[batch][name]`` seconds) and their ratio
    to ``base``, under ``title``; each row is also printed to stderr as it is made."""
    import sys

    lines = [title, "", "| batch | run | ms | / forward |", "|---:|---|---:|---:|"]
    for batch, med in runs.items():
        for name, seconds in med.items():
            ratio = seconds / med[base]
            print(f"batch {batch} {name:18s} {seconds * 1000:8.1f} ms  {ratio:5.2f}x {base}", file=sys.stderr)
            lines.append(f"| {batch} | {name} | {seconds * 1000:.1f} | {ratio:.2f}x |")
    return "\n".join(lines)
