"""Threads for CAM post-processing: the session's cores, idle once the graph has answered.

The pool's size is the session's: ``explain()`` runs with ``threads`` = the intra-op threads
of ONNX Runtime's session (:func:`session_threads`). Two uses: the per-sample calls that
have no batched form (EigenCAM's LAPACK factorizations, PNG encoding: :func:`map_items`),
and a large batch's methods split by rows (:func:`map_rows`: numpy releases the GIL in its
loops, so a batch of 8 or 32 runs on every core instead of one). Outside ``explain()`` (a
method called on its own) it is 1: no threads. Pool workers see 1 too (a context variable
does not follow a task into the pool), so nested calls never wait on their own pool.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, TypeVar

import numpy as np

_THREADS: ContextVar[int] = ContextVar("camserve_cam_threads", default=1)
_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
R = TypeVar("R")

#: Input elements below which one thread does a whole batch: a split costs a hand-off to the
#: pool (tens of microseconds) that a small batch (resnet50 layer4 at N=1: 200 000) does not
#: win back.
MIN_SPLIT_ELEMENTS = 400_000


def threads() -> int:
    """The post-processing threads of the current context."""
    return _THREADS.get()


@contextlib.contextmanager
def using(count: int) -> Iterator[None]:
    """Post-processing runs on up to ``count`` threads while active (values < 1 read as 1)."""
    token = _THREADS.set(max(1, int(count)))
    try:
        yield
    finally:
        _THREADS.reset(token)


def session_threads(fn: F) -> F:
    """Run ``fn(session, ...)`` with the session's ``threads`` (1 where it has none)."""

    @functools.wraps(fn)
    def wrapper(session: Any, *args: Any, **kwargs: Any) -> Any:
        with using(getattr(session, "threads", 1) or 1):
            return fn(session, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _pool(size: int) -> ThreadPoolExecutor:
    with _LOCK:
        if size not in _POOLS:
            _POOLS[size] = ThreadPoolExecutor(max_workers=size, thread_name_prefix="camserve-cam")
        return _POOLS[size]


def map_items(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]`` on up to :func:`threads` threads (order kept): for calls
    that release the GIL (OpenCV's encoders, LAPACK through ctypes)."""
    out: list[Any] = [None] * len(items)

    def job(i: int) -> None:
        out[i] = fn(items[i])

    for_each(job, len(items))
    return out


def for_each(job: Callable[[int], None], count: int) -> None:
    """``job(i)`` for ``i`` in ``range(count)``, on up to :func:`threads` threads (in this
    thread alone when that is 1 or there is one job); the first error is raised."""
    size = min(threads(), count)
    if size <= 1:
        for i in range(count):
            job(i)
        return
    for future in [_pool(size).submit(job, i) for i in range(count)]:
        future.result()


def row_parts(count: int, elements: int) -> list[slice]:
    """``range(count)`` rows as contiguous parts: one per thread where the batch's ``elements``
    are worth splitting (see :data:`MIN_SPLIT_ELEMENTS`), else a single part."""
    parts = max(1, min(threads(), count, elements // MIN_SPLIT_ELEMENTS))
    bounds = [count * i // parts for i in range(parts + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def map_rows(fn: Callable[[slice], tuple[np.ndarray, ...]], count: int, elements: int) -> tuple[np.ndarray, ...]:
    """``fn(rows)`` over :func:`row_parts` on the threads, each output concatenated along its
    first axis in row order: the batch's result for row-wise ``fn``."""
    results = map_items(fn, row_parts(count, elements))
    if len(results) == 1:
        return results[0]
    return tuple(np.concatenate(column) for column in zip(*results))
