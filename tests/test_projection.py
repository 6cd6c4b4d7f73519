"""EigenCAM's LAPACK calls (camserve.cam.lapack) and the post-processing threads
(camserve.cam.parallel): the same numbers as numpy's SVD, sign included, on any thread count."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from camserve.cam import lapack, parallel
from camserve.cam.projection import first_component

RNG = np.random.default_rng(16)


def _oracle(maps: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's projection, written out: numpy's full SVD of each centred ``X``."""
    out = []
    for a in maps:
        x = a.reshape(a.shape[0], -1).T
        x = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(x, full_matrices=True)
        out.append((x @ vt[0]).reshape(a.shape[1:]))
    return np.float32(out)


@pytest.mark.parametrize("shape", [(3, 2048, 7, 7), (2, 768, 14, 14), (4, 512, 4, 4)])
def test_first_component_is_numpys_on_any_thread_count(shape: tuple[int, ...]) -> None:
    maps = np.maximum(RNG.standard_normal(shape, dtype=np.float32), 0)
    one = first_component(maps)
    with parallel.using(2):
        two = first_component(maps)
    with parallel.using(8):  # more threads than samples
        eight = first_component(maps)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, eight)
    ref = _oracle(maps)
    assert all(float((o * r).sum()) > 0 for o, r in zip(one, ref))  # LAPACK's sign
    np.testing.assert_allclose(one, ref, atol=1e-5 * np.abs(ref).max())


def test_lq_lower_is_lapacks_factor() -> None:
    x = RNG.standard_normal((49, 300))
    lower = lapack.lq_lower(x.T.copy(order="F"))  # overwritten: x.T itself is Fortran-ordered x
    assert lower.shape == (49, 49) and lower.flags.f_contiguous
    assert not np.triu(lower, 1).any()
    np.testing.assert_allclose(lower @ lower.T, x @ x.T, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(lapack.lq_lower(x.T.copy(order="F"), blocked=False), lower, atol=1e-10)
    with pytest.raises(ValueError, match="Fortran-ordered float64"):
        lapack.lq_lower(np.ascontiguousarray(x.T))
    with pytest.raises(ValueError, match="Fortran-ordered float64"):
        lapack.lq_lower(np.asfortranarray(x.T, dtype=np.float32))
    with pytest.raises(ValueError, match="rows >= columns"):
        lapack.lq_lower(np.asfortranarray(x))


def test_first_singular_is_numpys_with_its_sign() -> None:
    for n in (1, 5, 49, 196):
        a = RNG.standard_normal((n, n))
        u, s, _ = np.linalg.svd(a)
        u1, s1 = lapack.first_singular(a.copy(order="F"))
        assert s1 == pytest.approx(s[0], rel=1e-12)
        np.testing.assert_allclose(u1, u[:, 0], atol=1e-10)
    with pytest.raises(ValueError, match="square"):
        lapack.first_singular(np.asfortranarray(RNG.standard_normal((3, 4))))
    bad = np.asfortranarray(RNG.standard_normal((4, 4)))
    bad[0, 0] = np.nan
    with pytest.raises(np.linalg.LinAlgError, match=r"dgesdd failed .* \[4, 4\]"):
        lapack.first_singular(bad)


def test_for_each_runs_every_job_on_the_context_threads_and_raises_the_first_error() -> None:
    seen: list[tuple[int, str]] = []
    lock = threading.Lock()

    def job(i: int) -> None:
        with lock:
            seen.append((i, threading.current_thread().name))

    assert parallel.threads() == 1
    parallel.for_each(job, 4)
    assert sorted(i for i, _ in seen) == [0, 1, 2, 3] and {t for _, t in seen} == {threading.current_thread().name}
    seen.clear()
    with parallel.using(2):
        assert parallel.threads() == 2
        parallel.for_each(job, 6)
    assert parallel.threads() == 1
    assert sorted(i for i, _ in seen) == list(range(6)) and all(t.startswith("camserve-cam") for _, t in seen)

    def fails(i: int) -> None:
        if i == 3:
            raise ValueError(f"job {i} failed")

    with parallel.using(2), pytest.raises(ValueError, match="job 3 failed"):
        parallel.for_each(fails, 5)


def test_session_threads_follow_the_session() -> None:
    class Session:
        threads = 3

    @parallel.session_threads
    def read(session: object) -> int:
        return parallel.threads()

    assert read(Session()) == 3
    assert read(object()) == 1
    assert parallel.threads() == 1


def test_heatmap_pngs_are_the_same_on_threads() -> None:
    from camserve.pipeline import render

    cams = RNG.random((5, 32, 32), dtype=np.float32)
    serial = render.heatmap_png(cams)
    with parallel.using(2):
        assert render.heatmap_png(cams) == serial
    assert len(serial) == 5 and all(p.startswith(b"\x89PNG") for p in serial)
