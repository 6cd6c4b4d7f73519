"""The LAPACK calls of EigenCAM's projection, through scipy's Cython LAPACK API.

``scipy.linalg.cython_lapack`` exports every LAPACK routine of scipy's own OpenBLAS as a C
function pointer; this module calls some of them with :mod:`ctypes`:

* ``dpotrf`` (and BLAS's ``dtrsv`` for a solve with it): the Cholesky factor of a Gram
  matrix ``X X^T``, which is the ``L`` of ``X = L Q`` up to the signs of its columns, at a
  third of a QR's cost (its last pivot needs care: :func:`camserve.cam.projection._lower_factor`);
* ``dgeqrf``: ``X = L Q`` of a wide ``[m, n]`` matrix (m <= n) by Householder QR, the
  first step numpy's ``dgesdd`` takes on such a matrix (kept where the Cholesky factor
  cannot give ``L``: nearly dependent rows, non-finite entries);
* ``dgebrd`` + ``dbdsdc`` + ``dormbr``: the first left singular vector of a square ``L``
  as ``dgesdd`` (``JOBZ='S'``) computes it: the same bidiagonal, the same bidiagonal SVD,
  hence the same vector *with the same sign*, without forming the rest of ``U`` and ``V^T``
  (``dgesdd`` itself on anything unusual: see :func:`first_singular`).

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
def _routine(name: str, nargs: int, library: str = "lapack") -> Callable[..., None]:
    """LAPACK's (or with ``library="blas"`` BLAS's) ``name`` (every argument a pointer,
    Fortran style) from scipy's capsule."""
    from scipy.linalg import cython_blas, cython_lapack  # scipy is a runtime dependency; imported where used

    capsule = (cython_blas if library == "blas" else cython_lapack).__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * nargs))(address)


def _ptr(a: np.ndarray) -> int:
    """``a``'s data address (ctypes passes an int as a ``void *``): 1.3 us against
    ``a.ctypes.data_as``'s 3.7, of which EigenCAM's projection takes about 25 per sample."""
    return a.__array_interface__["data"][0]


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
    tau, info = np.empty(m), _Int(0)

    def qrf(work: int, lwork: object) -> None:
        dgeqrf(_ref(n), _ref(m), _ptr(at), _ref(n), _ptr(tau), work, lwork, ctypes.byref(info))

    work = _workspace(("dgeqrf", n, m), qrf) if blocked else np.empty(m)
    qrf(_ptr(work), _ref(len(work)))
    _check(info, "dgeqrf", at.shape)
    return np.asfortranarray(np.triu(at[:m]).T)


def cholesky_lower(g: np.ndarray) -> np.ndarray | None:
    """``L`` (lower triangular, Fortran-ordered) with ``L L^T = g`` for a symmetric positive
    definite ``g`` (``dpotrf``), or None where ``g`` is not positive definite. ``g`` is
    overwritten."""
    _fortran_f64(g, "cholesky_lower")
    n, m = g.shape
    if n != m:
        raise ValueError(f"cholesky_lower needs a square matrix, got {list(g.shape)}")
    info = _Int(0)
    _routine("dpotrf", 5)(ctypes.c_char_p(b"L"), _ref(n), _ptr(g), _ref(n), ctypes.byref(info))
    if info.value > 0:
        return None
    _check(info, "dpotrf", g.shape)
    np.copyto(g, 0.0, where=_strict_upper(n))  # one call: np.tril took 80 us after a graph run
    return g


@functools.lru_cache(maxsize=8)
def _strict_upper(n: int) -> np.ndarray:
    return np.asfortranarray(np.triu(np.ones((n, n), bool), 1))


def solve_lower(a: np.ndarray, x: np.ndarray, n: int) -> np.ndarray:
    """``x <- L^-1 x`` for the leading ``n x n`` block ``L`` of the lower triangular,
    Fortran-ordered ``a`` (``dtrsv``, in place, without copying the block out); returns ``x``."""
    _fortran_f64(a, "solve_lower")
    if x.dtype != np.float64 or x.shape != (n,) or not x.flags.c_contiguous or not 0 <= n <= min(a.shape):
        raise ValueError(f"solve_lower needs a contiguous float64 [{n}] right-hand side within {list(a.shape)}, "
                         f"got {x.dtype} {list(x.shape)}")
    if n:
        _routine("dtrsv", 8, "blas")(ctypes.c_char_p(b"L"), ctypes.c_char_p(b"N"), ctypes.c_char_p(b"N"), _ref(n), _ptr(a),
                                     _ref(a.shape[0]), _ptr(x), _ref(1))
    return x


#: Optimal workspace sizes by (routine, dimensions): a size depends on the dimensions alone
#: (and LAPACK's block sizes), and a query, cheap in a loop, cost 40-50 us right after an
#: ONNX Runtime run had evicted LAPACK's code (two per EigenCAM sample).
_LWORK: dict[tuple[object, ...], int] = {}


def _workspace(key: tuple[object, ...], call: Callable[[int, object], None]) -> np.ndarray:
    """The optimal workspace LAPACK reports for ``call(work, lwork)`` (``lwork = -1``), asked
    once per ``key`` (the routine and every dimension the size can depend on)."""
    size = _LWORK.get(key)
    if size is None:
        query = np.empty(1)
        call(_ptr(query), _ref(-1))
        size = _LWORK[key] = max(int(query[0]), 1)
    return np.empty(size)


def first_singular(a: np.ndarray) -> tuple[np.ndarray, float]:
    """``(u_1, s_1)``: the first left singular vector and value of a square ``a``, exactly
    as ``dgesdd`` (``JOBZ='S'``) gives them, sign included; ``a`` is overwritten.

    ``dgesdd`` on a square matrix is ``dgebrd`` (``a = Q B P^T``), ``dbdsdc`` (``B = U_B S
    V_B^T``, every vector) and ``dormbr`` (``U = Q U_B``, ``V^T = V_B^T P^T``). The same calls
    on the same input give the same ``B`` and ``U_B`` bit for bit; here ``dormbr`` maps the
    first column of ``U_B`` alone and ``V^T`` is never formed (196 x 196: 4.5 -> 3.5 ms; at
    49 x 49 ``dbdsdc`` dominates: 0.28 -> 0.26 ms). Where ``dgesdd`` would rescale
    first (entries beyond 1e+-100) or refuse (a NaN or an inf), ``dgesdd`` itself runs."""
    _fortran_f64(a, "first_singular")
    m, n = a.shape
    if m != n:
        raise ValueError(f"first_singular needs a square matrix, got {list(a.shape)}")
    peak = float(np.abs(a).max()) if n else 0.0
    if not 1e-100 < peak < 1e100:
        return _first_singular_gesdd(a)
    info = _Int(0)
    d, e, tauq, taup = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    dgebrd = _routine("dgebrd", 10)

    def brd(work: int, lwork: object) -> None:
        dgebrd(_ref(n), _ref(n), _ptr(a), _ref(n), _ptr(d), _ptr(e), _ptr(tauq), _ptr(taup), work, lwork,
               ctypes.byref(info))

    work = _workspace(("dgebrd", n, n), brd)
    brd(_ptr(work), _ref(len(work)))
    _check(info, "dgebrd", a.shape)
    u, vt = np.zeros((n, n), order="F"), np.empty((n, n), order="F")
    work, iwork = np.empty(3 * n * n + 4 * n), np.empty(8 * n, np.int32)
    _routine("dbdsdc", 14)(ctypes.c_char_p(b"U"), ctypes.c_char_p(b"I"), _ref(n), _ptr(d), _ptr(e), _ptr(u), _ref(n),
                           _ptr(vt), _ref(n), None, None, _ptr(work), _ptr(iwork), ctypes.byref(info))
    _check(info, "dbdsdc", a.shape)
    first = np.asfortranarray(u[:, :1])
    dormbr = _routine("dormbr", 14)
    vect, side, trans = ctypes.c_char_p(b"Q"), ctypes.c_char_p(b"L"), ctypes.c_char_p(b"N")

    def mbr(work: int, lwork: object) -> None:
        dormbr(vect, side, trans, _ref(n), _ref(1), _ref(n), _ptr(a), _ref(n), _ptr(tauq), _ptr(first), _ref(n),
               work, lwork, ctypes.byref(info))

    work = _workspace(("dormbr", "QLN", n, 1, n), mbr)
    mbr(_ptr(work), _ref(len(work)))
    _check(info, "dormbr", a.shape)
    return first[:, 0], float(d[0])


def _first_singular_gesdd(a: np.ndarray) -> tuple[np.ndarray, float]:
    """:func:`first_singular` by ``dgesdd`` itself (``JOBZ='S'``), with its errors."""
    n = a.shape[0]
    dgesdd = _routine("dgesdd", 14)
    s, u, vt = np.empty(n), np.empty((n, n), order="F"), np.empty((n, n), order="F")
    iwork, info, jobz = np.empty(8 * n, np.int32), _Int(0), ctypes.c_char_p(b"S")

    def sdd(work: int, lwork: object) -> None:
        dgesdd(jobz, _ref(n), _ref(n), _ptr(a), _ref(n), _ptr(s), _ptr(u), _ref(n), _ptr(vt), _ref(n),
               work, lwork, _ptr(iwork), ctypes.byref(info))

    work = _workspace(("dgesdd", "S", n, n), sdd)
    sdd(_ptr(work), _ref(len(work)))
    _check(info, "dgesdd", a.shape)
    return u[:, 0], float(s[0])
