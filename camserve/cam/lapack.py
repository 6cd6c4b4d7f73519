"""The two LAPACK calls of EigenCAM's projection, through scipy's Cython LAPACK API.

``scipy.linalg.cython_lapack`` exports every LAPACK routine of scipy's own OpenBLAS as a C
function pointer; this module calls two of them with :mod:`ctypes`:

* ``dgelqf``: ``X = L Q`` of a wide ``[m, n]`` matrix (m <= n), the first step numpy's
  ``dgesdd`` takes on such a matrix, with the workspace LAPACK asks for (its blocked code,
  as numpy queries it too);
* ``dgesdd`` (``JOBZ='S'``) of the square ``L``: the rest of numpy's path (``dgebrd``,
  ``dbdsdc``, ``dormbr``), hence the same singular vectors *with the same sign*.

Why not ``scipy.linalg.lapack``: its f2py wrappers keep the GIL during the call, so the
per-sample factorizations ran one at a time on threads (8 vit_b_16 maps: 85 -> 73 ms on 2
threads), and their default workspaces are the minimal ones (unblocked code, rounding unlike
numpy's). A ctypes call releases the GIL. Arrays must be float64 and Fortran-ordered.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import numpy as np

_Int = ctypes.c_int


@functools.cache
def _routine(name: str, nargs: int) -> Callable[..., None]:
    """LAPACK's ``name`` (every argument a pointer, Fortran style) from scipy's capsule."""
    from scipy.linalg import cython_lapack  # scipy is a runtime dependency; imported where used

    capsule = cython_lapack.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * nargs))(address)


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(ctypes.c_void_p)


def _ref(value: int) -> object:
    return ctypes.byref(_Int(value))


def _check(info: ctypes.c_int, routine: str, shape: tuple[int, ...]) -> None:
    """LAPACK's ``info != 0`` as numpy's error (no convergence, a bad argument)."""
    if info.value:
        raise np.linalg.LinAlgError(f"{routine} failed (info={info.value}) on a matrix of shape {list(shape)}")


def _fortran_f64(a: np.ndarray, what: str) -> None:
    if a.dtype != np.float64 or not a.flags.f_contiguous or a.ndim != 2:
        raise ValueError(f"{what} needs a 2-d Fortran-ordered float64 array, got {a.dtype} {list(a.shape)} "
                         f"(F-contiguous: {a.flags.f_contiguous})")


def lq_lower(at: np.ndarray, blocked: bool = True) -> np.ndarray:
    """``L`` (``[m, m]``, lower triangular, Fortran-ordered) of ``X = L Q`` for a wide ``X``
    given as its transpose ``at = X^T [n, m]`` (n >= m): ``L = R^T`` of the QR ``X^T = Q^T R``
    (``dgeqrf``: the same reflectors as ``dgelqf`` of ``X``, applied down contiguous columns
    rather than along strided rows: 1.7x faster on [49, 2048]). ``at`` is overwritten.
    ``blocked``: the workspace LAPACK asks for (its blocked code, 10% faster on [196, 768]);
    else the minimal one (unblocked, scipy.linalg.lapack's default)."""
    _fortran_f64(at, "lq_lower")
    n, m = at.shape
    if m > n:
        raise ValueError(f"lq_lower needs the transpose of a wide matrix (rows >= columns), got {list(at.shape)}")
    dgeqrf = _routine("dgeqrf", 8)
    tau, info, query = np.empty(m), _Int(0), np.empty(1)
    lwork = m
    if blocked:
        dgeqrf(_ref(n), _ref(m), _ptr(at), _ref(n), _ptr(tau), _ptr(query), _ref(-1), ctypes.byref(info))
        lwork = max(int(query[0]), 1)
    work = np.empty(lwork)
    dgeqrf(_ref(n), _ref(m), _ptr(at), _ref(n), _ptr(tau), _ptr(work), _ref(lwork), ctypes.byref(info))
    _check(info, "dgeqrf", at.shape)
    return np.asfortranarray(np.triu(at[:m]).T)


def first_singular(a: np.ndarray) -> tuple[np.ndarray, float]:
    """``(u_1, s_1)``: the first left singular vector and value of a square ``a`` by
    ``dgesdd`` (``JOBZ='S'``, LAPACK's sign); ``a`` is overwritten."""
    _fortran_f64(a, "first_singular")
    m, n = a.shape
    if m != n:
        raise ValueError(f"first_singular needs a square matrix, got {list(a.shape)}")
    dgesdd = _routine("dgesdd", 14)
    s, u, vt = np.empty(n), np.empty((n, n), order="F"), np.empty((n, n), order="F")
    iwork, info, query, jobz = np.empty(8 * n, np.int32), _Int(0), np.empty(1), ctypes.c_char_p(b"S")
    dgesdd(jobz, _ref(n), _ref(n), _ptr(a), _ref(n), _ptr(s), _ptr(u), _ref(n), _ptr(vt), _ref(n),
           _ptr(query), _ref(-1), _ptr(iwork), ctypes.byref(info))
    work = np.empty(max(int(query[0]), 1))
    dgesdd(jobz, _ref(n), _ref(n), _ptr(a), _ref(n), _ptr(s), _ptr(u), _ref(n), _ptr(vt), _ref(n),
           _ptr(work), _ref(len(work)), _ptr(iwork), ctypes.byref(info))
    _check(info, "dgesdd", a.shape)
    return u[:, 0], float(s[0])
