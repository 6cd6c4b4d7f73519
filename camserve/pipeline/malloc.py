"""Where glibc's malloc puts large buffers while ONNX Runtime loads a graph.

Creating a session allocates and frees large copies of the weights (graph optimizations,
pre-packing). glibc's malloc serves a request of at least its *mmap threshold* with a mapping
of its own, given back to the system on free, and smaller ones from its heap, where freed
memory stays in the process. The threshold starts at 128 kB and rises to the size of every
mapped block that is freed (up to 32 MB), so which copies land on the heap, and so the load
peak, hangs on the order of the frees and on where the heap can grow in the randomized
address space: from one process to the next, vit_b_32's forward graph read 447, 537 or
636-645 MB at load, its explain graph 521, 557-559 or 660 MB.

:func:`loading` gives the heap's free memory back and fixes the threshold at 1 MB while a
session is created: every large buffer is then mapped and unmapped on its own, and the peak
is the live maximum, the same in every process (vit_b_32: forward 448 MB, explain 451 MB in
six of six). Afterwards the threshold is fixed at glibc's largest, 32 MB, with the heap
trimmed above 64 MB free, which is where the dynamic thresholds end up in a serving process:
the request path's arrays come from the heap (left at 1 MB, a fresh mapping's page faults
made resnet50's post-processing at N=8 1.7x slower). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
import threading
from collections.abc import Iterator

#: mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LOAD_MMAP_THRESHOLD = 1 << 20
SERVE_MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit hosts
SERVE_TRIM_THRESHOLD = 2 * SERVE_MMAP_THRESHOLD  # what the dynamic rule sets beside it

_LOCK = threading.Lock()
_depth = 0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc with ``mallopt`` and ``malloc_trim`` typed, or None on another C library."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _set(**values: int) -> bool:
    libc = _libc()
    if libc is None:
        return False
    params = {"mmap": M_MMAP_THRESHOLD, "trim": M_TRIM_THRESHOLD}
    return all(libc.mallopt(params[name], value) == 1 for name, value in values.items())


def _start_loading() -> bool:
    """Free heap memory back to the system (a request that fits in the heap's free top is
    served there whatever the threshold), then the 1 MB threshold."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return _set(mmap=LOAD_MMAP_THRESHOLD)


@contextlib.contextmanager
def loading() -> Iterator[bool]:
    """Large buffers mapped on their own while the block runs (see the module docstring);
    yields whether the C library took the setting. Nested and concurrent loads share it."""
    global _depth
    with _LOCK:
        _depth += 1
        active = _start_loading() if _depth == 1 else _libc() is not None
    try:
        yield active
    finally:
        with _LOCK:
            _depth -= 1
            if _depth == 0:
                _set(mmap=SERVE_MMAP_THRESHOLD, trim=SERVE_TRIM_THRESHOLD)
