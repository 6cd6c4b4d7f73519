"""Threads for the per-sample parts of CAM post-processing (EigenCAM's LAPACK calls).

Most methods are batched numpy and need no threads. EigenCAM factors one matrix per
sample and LAPACK has no batched form, so those calls run on a small shared pool. The
pool's size is the session's: ``explain()`` runs with ``threads`` = the intra-op threads
of ONNX Runtime's session (:func:`session_threads`), whose cores are idle once the graph
has answered. Outside ``explain()`` (a method called on its own) it is 1: no threads.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, TypeVar

_THREADS: ContextVar[int] = ContextVar("camserve_cam_threads", default=1)
_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
R = TypeVar("R")


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
