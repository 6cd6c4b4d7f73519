"""Side-by-side timing for the benchmarks: each call once to warm up, then ``repeats`` rounds
that run every call in turn (this machine is shared and noisy: alternating keeps the ratios
fair when the load changes), medians in seconds."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def medians(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call name over ``repeats`` alternating rounds (after one warm-up each)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
