"""EigenCAM's LAPACK calls (camserve.cam.lapack) and the post-processing threads
(camserve.cam.parallel): the same numbers as numpy's SVD, sign included, on any thread count."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from camserve.cam import lapack, parallel
from camserve.cam.projection import _lower_factor, first_component

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


def _relu_maps(shape: tuple[int, ...], dominant: bool) -> np.ndarray:
    """ReLU'd Gaussian maps, with or without one strong direction (a real CAM's case)."""
    a = RNG.standard_normal(shape, dtype=np.float32)
    if dominant:
        c, h, w = shape
        a += 3 * np.outer(RNG.standard_normal(c), RNG.standard_normal(h * w)).reshape(shape).astype(np.float32)
    return np.maximum(a, 0)


@pytest.mark.parametrize("shape, count", [((2048, 7, 7), 12), ((768, 14, 14), 12), ((512, 4, 4), 40)])
def test_first_component_keeps_numpys_sign_on_many_samples(shape: tuple[int, ...], count: int) -> None:
    """The Gram/Cholesky factor gives numpy's sign, also on data with no dominant direction
    (where the sign can hang on the tiny last pivot: a shifted Gram matrix flipped some)."""
    maps = np.stack([_relu_maps(shape, dominant=bool(k % 2)) for k in range(count)])
    ref = _oracle(maps)
    got = first_component(maps)
    assert [float((g * r).sum()) > 0 for g, r in zip(got, ref)] == [True] * count
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())


def test_lower_factor_is_the_qr_factor_with_positive_columns() -> None:
    """Every entry of the QR's ``L`` (signs made positive), the tiny last pivot included;
    the QR itself where the Gram matrix is not positive definite."""
    a = _relu_maps((768, 14, 14), dominant=False).reshape(768, 196)
    centred = np.empty((196, 768))
    np.subtract(a.T, a.T.mean(axis=0, keepdims=True), out=centred, dtype=np.float32)
    qr = lapack.lq_lower(np.asfortranarray(centred.T.copy()))
    qr = qr * np.sign(np.diag(qr))
    lower = _lower_factor(centred.copy())
    assert lower.flags.f_contiguous and not np.triu(lower, 1).any()
    assert 0 < qr[-1, -1] < 1e-5 * qr[0, 0]  # float32 centring leaves a residue, not a zero
    assert lower[-1, -1] == pytest.approx(qr[-1, -1], rel=1e-6)
    np.testing.assert_allclose(lower, qr, rtol=0, atol=1e-9 * qr[0, 0])
    # two equal positions: not positive definite below the last pivot -> the QR, unchanged
    twin = centred.copy()
    twin[1] = twin[0]
    expected = lapack.lq_lower(np.asfortranarray(twin.T.copy()))
    np.testing.assert_array_equal(_lower_factor(twin), expected)
    assert not _lower_factor(np.zeros((49, 100))).any()


def test_first_component_with_equal_positions_and_zero_samples() -> None:
    maps = _relu_maps((1024, 7, 7), dominant=True)[None].repeat(3, axis=0)
    maps[1, :, 0, :2] = 0  # two positions equal
    maps[2] = 0
    got = first_component(maps)
    ref = _oracle(maps)
    assert float((got[0] * ref[0]).sum()) > 0 and float((got[1] * ref[1]).sum()) > 0
    np.testing.assert_allclose(got[:2], ref[:2], atol=1e-5 * np.abs(ref).max())
    assert not got[2].any()


def test_cholesky_lower() -> None:
    x = RNG.standard_normal((6, 20))
    lower = lapack.cholesky_lower(np.asfortranarray(x @ x.T))
    np.testing.assert_allclose(lower @ lower.T, x @ x.T, rtol=1e-12, atol=1e-12)
    assert not np.triu(lower, 1).any() and (np.diag(lower) > 0).all()
    assert lapack.cholesky_lower(np.asfortranarray(-np.eye(3))) is None
    with pytest.raises(ValueError, match="square"):
        lapack.cholesky_lower(np.asfortranarray(np.ones((2, 3))))


def test_solve_lower_uses_the_leading_block_in_place() -> None:
    a = np.asfortranarray(np.tril(RNG.standard_normal((5, 5))) + 4 * np.eye(5))
    a[4, :] = np.nan  # outside the leading 4 x 4 block: never read
    x = RNG.standard_normal(4)
    expected = np.linalg.solve(a[:4, :4], x)
    out = lapack.solve_lower(a, x, 4)
    assert out is x
    np.testing.assert_allclose(x, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="right-hand side"):
        lapack.solve_lower(a, np.ones(3), 4)


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
    for n in (1, 5, 26, 49, 196):
        for a in (RNG.standard_normal((n, n)), np.tril(RNG.standard_normal((n, n))), RNG.standard_normal((n, n)) * 1e-120):
            u, s, _ = np.linalg.svd(a)
            u1, s1 = lapack.first_singular(a.copy(order="F"))
            assert s1 == pytest.approx(s[0], rel=1e-12)
            np.testing.assert_allclose(u1, u[:, 0], atol=1e-10)
            g1, t1 = lapack._first_singular_gesdd(a.copy(order="F"))  # dgesdd itself: the same bits but dormbr's
            assert t1 == s1
            np.testing.assert_allclose(u1, g1, rtol=0, atol=1e-13)
    assert lapack.first_singular(np.zeros((3, 3), order="F"))[1] == 0.0
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
