"""The in-place symmetric eigenvalues and Cholesky solve against numpy, through torch's LAPACK
symbols and through the torch.linalg fallback."""

import numpy as np
import pytest

from genprobe.engine import lapack


@pytest.fixture(params=["symbols", "fallback"])
def route(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setattr(lapack, "_routines", lambda: None)
    else:
        assert lapack._routines() is not None, "torch exports no LAPACK symbols here"
    return request.param


def _spd(m: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((m, m + 3))
    return x @ x.T + 0.1 * np.eye(m)


def _upper_only(a: np.ndarray) -> np.ndarray:
    """`a` in a symmetric_buffer with NaN below the diagonal: a routine that read it would say so."""
    out = lapack.symmetric_buffer(len(a))
    out[:] = a
    out[np.tril_indices(len(a), -1)] = np.nan
    return out


@pytest.mark.parametrize("m", [1, 2, 7, 130])
def test_eigenvalues_in_place(route, m):
    a = _spd(m, m)
    a[0, -1] = a[-1, 0] = a[0, -1] + 0.5  # not a multiple of the identity, both halves equal
    expected = np.linalg.eigvalsh(a)
    w = lapack.eigvalsh_(_upper_only(a))
    np.testing.assert_allclose(w, expected, rtol=1e-10, atol=1e-12 * expected.max())


@pytest.mark.parametrize("m", [1, 5, 130])
def test_cholesky_solve_in_place(route, m):
    a, b = _spd(m, m + 1), np.random.default_rng(1).standard_normal((m, 3))
    b_before = b.copy()
    x = lapack.cho_solve_(_upper_only(a), b)
    np.testing.assert_allclose(a @ x, b, rtol=0, atol=1e-9 * np.abs(b).max())
    np.testing.assert_array_equal(b, b_before)
    one = lapack.cho_solve_(_upper_only(a), b[:, 0])  # a vector right-hand side keeps its shape
    assert one.shape == (m,)
    np.testing.assert_allclose(one, x[:, 0], rtol=1e-12, atol=1e-12)


def test_not_positive_definite_is_a_linalg_error(route):
    a = _spd(6, 0)
    a[3, 3] = -50.0
    with pytest.raises(np.linalg.LinAlgError):
        lapack.cho_solve_(a, np.ones((6, 1)))


def test_refuses_a_matrix_it_cannot_overwrite():
    a = _spd(4, 0)
    with pytest.raises(ValueError, match="writeable C-ordered float64"):
        lapack.eigvalsh_(np.asfortranarray(a[:, :3] @ a[:3, :]))  # not C-ordered
    with pytest.raises(ValueError):
        lapack.eigvalsh_(a.astype(np.float32))


def test_the_symbols_work_in_the_callers_buffer_on_its_upper_triangle():
    assert lapack.in_place()
    a = _spd(50, 3)
    work = _upper_only(a)
    lapack.eigvalsh_(work)
    assert not np.array_equal(np.triu(work), np.triu(a))  # reduced there: no copy was made
    assert np.isnan(work[np.tril_indices(50, -1)]).all()  # the lower triangle never written
    work = _upper_only(a)
    lapack.cho_solve_(work, np.ones(50))
    np.testing.assert_allclose(np.triu(work), np.linalg.cholesky(a).T, rtol=1e-10, atol=1e-12)
    assert lapack.resident_bytes(1000) < 8 * 1000**2 // 2 + 1000 * 2**16
