"""camserve.pipeline.malloc: while a graph loads, a large block is a mapping of its own even
after glibc's dynamic threshold has risen; afterwards blocks up to 32 MB come from the heap.
Each check runs in a fresh interpreter, whose malloc has not been tuned by anything else."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

PROBE = textwrap.dedent("""
    import ctypes, json, sys
    from camserve.pipeline import malloc

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def on_heap(size):
        # where a fresh block of `size` bytes lands: inside the [heap] mapping or not
        p = libc.malloc(size)
        for line in open("/proc/self/maps"):
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                inside = lo <= p < hi
                break
        else:
            inside = False
        libc.free(p)
        return inside

    libc.free(libc.malloc(8 << 20))  # glibc's dynamic threshold rises to 8 MB
    out = {"default": on_heap(2 << 20)}
    with malloc.loading() as active:
        with malloc.loading():  # nested: still loading after the inner one ends
            pass
        out["loading"] = on_heap(2 << 20)
    out["active"] = active
    out["after"] = on_heap(16 << 20)
    print(json.dumps(out))
""")


def test_large_blocks_are_mappings_while_loading_and_heap_after() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"default": True, "loading": False, "active": True, "after": True}, seen
