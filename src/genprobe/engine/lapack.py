"""Eigenvalues and Cholesky solves of a symmetric matrix in place: one copy of the matrix in memory.

``torch.linalg.eigvalsh`` and ``torch.linalg.cholesky`` always work on their own copy of the
input, and scipy's ``overwrite_a`` routes go through the OpenBLAS that scipy bundles, which died
with SIGSEGV (inside ``dgemm_oncopy``) on a 30,000 × 30,000 kernel here (benchmarks/RESULTS.md).
At that size a second copy is 7.2 GB, so these functions call the LAPACK that torch itself links
(MKL in the x86 wheels, OpenBLAS elsewhere), through its exported Fortran symbols, on the caller's
buffer. Where torch exports no such symbol they fall back to torch.linalg, on a copy.

The matrix is a C-ordered float64 numpy array of which only the upper triangle (``a[i, j]``,
j ≥ i) is read (LAPACK sees the lower triangle of the transpose). Filled only there, a buffer from
:func:`symmetric_buffer` keeps about half its pages untouched, so the resident memory of an
N × N problem is ~4·N² bytes (3.4 GiB at N = 30,000) instead of 8·N².
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os

import numpy as np
import torch

_CHAR = ctypes.c_char_p


@functools.cache
def _routines() -> tuple[ctypes.CDLL, str, type] | None:
    """torch's LAPACK and its integer type (64-bit symbols when exported), or None."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    for suffix, int_type in (("_64_", ctypes.c_int64), ("_", ctypes.c_int32)):
        try:
            fns = [getattr(lib, f"{name}{suffix}") for name in ("dsyevd", "dpotrf", "dpotrs")]
        except AttributeError:
            continue
        for fn in fns:
            fn.restype = None
        return (lib, suffix, int_type)
    return None


def in_place() -> bool:
    """Whether the routines here work in the caller's buffer (else on a copy, through torch)."""
    return _routines() is not None


def resident_bytes(m: int) -> int:
    """Memory the routines here hold for an (m, m) problem: the upper triangle of a
    :func:`symmetric_buffer` plus a page per row (at most the whole buffer), or, falling back on
    torch.linalg, two copies."""
    return min(8 * m * m, 4 * m * (m + 1) + mmap.PAGESIZE * m) if in_place() else 16 * m * m


def symmetric_buffer(m: int) -> np.ndarray:
    """A writeable (m, m) float64 array whose memory becomes resident only where written: an
    anonymous mapping on small pages (numpy asks for transparent huge pages on large arrays,
    and a 2 MiB page spans several rows of both triangles)."""
    if m == 0:
        return np.empty((0, 0))
    mapping = mmap.mmap(-1, 8 * m * m)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mapping, dtype=np.float64).reshape(m, m)


def _check_square(a: np.ndarray) -> int:
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.dtype != np.float64 or not a.flags.c_contiguous \
            or not a.flags.writeable:
        raise ValueError(f"expected a writeable C-ordered float64 square matrix, got {a.dtype} {a.shape}")
    return a.shape[0]


def eigvalsh_(a: np.ndarray) -> np.ndarray:
    """The ascending eigenvalues (float64, (m,)) of the symmetric matrix whose upper triangle `a`
    (m, m) holds; `a` is overwritten. LinAlgError when LAPACK fails to converge."""
    m = _check_square(a)
    found = _routines()
    if found is None or m == 0:
        return torch.linalg.eigvalsh(torch.from_numpy(a), UPLO="U").numpy()
    lib, suffix, int_type = found
    fn = getattr(lib, f"dsyevd{suffix}")
    n, info = int_type(m), int_type(0)
    w = np.empty(m, dtype=np.float64)
    query, iquery = np.empty(1), np.empty(1, dtype=np.int64 if int_type is ctypes.c_int64 else np.int32)
    args = lambda work, lwork, iwork, liwork: fn(  # noqa: E731
        _CHAR(b"N"), _CHAR(b"L"), ctypes.byref(n), a.ctypes.data_as(ctypes.c_void_p), ctypes.byref(n),
        w.ctypes.data_as(ctypes.c_void_p), work.ctypes.data_as(ctypes.c_void_p), ctypes.byref(lwork),
        iwork.ctypes.data_as(ctypes.c_void_p), ctypes.byref(liwork), ctypes.byref(info),
        ctypes.c_size_t(1), ctypes.c_size_t(1))
    args(query, int_type(-1), iquery, int_type(-1))
    _raise(info.value, "dsyevd (workspace query)")
    work = np.empty(max(1, int(query[0])))
    iwork = np.empty(max(1, int(iquery[0])), dtype=iquery.dtype)
    args(work, int_type(len(work)), iwork, int_type(len(iwork)))
    _raise(info.value, "dsyevd")
    return w


def cho_solve_(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """X with A X = b for the symmetric positive definite A whose upper triangle `a` (m, m) holds;
    `a` is overwritten by the factor (Lᵀ in its upper triangle); `b` (m, r) or (m,) is not touched.
    LinAlgError when A is not positive definite."""
    m = _check_square(a)
    b = np.asarray(b, dtype=np.float64)
    found = _routines()
    if found is None or m == 0:
        t = torch.from_numpy(a)
        factor, status = torch.linalg.cholesky_ex(t, upper=True)
        if status.item():
            raise np.linalg.LinAlgError("the matrix is not positive definite")
        solved = torch.cholesky_solve(torch.from_numpy(b.reshape(m, -1)), factor, upper=True)
        return solved.numpy().reshape(b.shape)
    lib, suffix, int_type = found
    n, info = int_type(m), int_type(0)
    ptr = a.ctypes.data_as(ctypes.c_void_p)
    getattr(lib, f"dpotrf{suffix}")(_CHAR(b"L"), ctypes.byref(n), ptr, ctypes.byref(n), ctypes.byref(info),
                                    ctypes.c_size_t(1))
    if info.value > 0:
        raise np.linalg.LinAlgError("the matrix is not positive definite")
    _raise(info.value, "dpotrf")
    x = np.asfortranarray(b.reshape(m, -1).copy())
    r = int_type(x.shape[1])
    getattr(lib, f"dpotrs{suffix}")(_CHAR(b"L"), ctypes.byref(n), ctypes.byref(r), ptr, ctypes.byref(n),
                                    x.ctypes.data_as(ctypes.c_void_p), ctypes.byref(n), ctypes.byref(info),
                                    ctypes.c_size_t(1))
    _raise(info.value, "dpotrs")
    return np.ascontiguousarray(x).reshape(b.shape)


def _raise(info: int, routine: str) -> None:
    if info < 0:
        raise RuntimeError(f"LAPACK {routine} rejected argument {-info} (a bug in genprobe)")
    if info > 0:
        raise np.linalg.LinAlgError(f"LAPACK {routine} did not converge (info={info})")
