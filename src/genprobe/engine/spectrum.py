"""The spectrum and the mean prediction of a kernel Θ(X, X), in memory or file-backed.

Shared by the empirical NTK probe (:mod:`genprobe.probes.ntk`) and the infinite-width phase
diagram (:mod:`genprobe.kernels.phase`), so that both use one ridge convention and one target
centring:

- the mean prediction μ(x) = Θ(x, X) (Θ(X, X) + r·I)⁻¹ Y, Y the mean-centred one-hot labels
  (one-hot − 1/C), r = ``ridge`` × the mean of Θ's diagonal (tr Θ / N: neural-tangents'
  relative ``diag_reg``), solved by Cholesky in place (:mod:`genprobe.engine.lapack`);
- with a training time η·t, the prediction after that much gradient flow on the MSE loss,
  Θ(x, X) Θ⁻¹ (I − e^{−(ηt/N)Θ}) Y, from the eigendecomposition;
- the spectrum: dense (LAPACK, in place) when the square matrix's upper triangle fits the memory
  budget, else the top and bottom :data:`LANCZOS_K` eigenvalues from ARPACK over the file;
  λ_max, λ_min, κ = λ_max / λ_min (inf when λ_min ≤ 0), and η < 2N / λ_max, the largest stable
  learning rate of full-batch gradient descent on the MSE of the linearized network.

A kernel is traced, (N, N), or per output, (N, N, K, K) (neural-tangents' layout).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..values import Data
from . import lapack
from .gramstore import DiskMatrix

logger = logging.getLogger(__name__)

LANCZOS_K = 10
"""Eigenvalues at each end of the spectrum when it comes from the Lanczos solver."""
CHUNK_BYTES = 32 * 2**20
"""Bytes of a streamed kernel read at a time (matrix products, the trace): rows of a 30,000-wide
kernel are 240 KB, so 1,024 of them would be 0.23 GiB on top of the N x N buffer."""


def as_square(kernel: np.ndarray) -> np.ndarray:
    """The kernel as a square matrix: (N, N), or (N·K, N·K) with rows (example, output)."""
    if kernel.ndim == 2:
        return kernel
    n, m, k, _ = kernel.shape
    return np.ascontiguousarray(np.asarray(kernel).transpose(0, 2, 1, 3)).reshape(n * k, m * k)


def analyse(kernel, kernel_test, train: Data, test: Data | None, classes: int, traced: bool,
            outputs_k: int, ridge: float, time: float | None, budget: int) -> dict:
    """Spectrum, learning rate and mean predictions of one state's kernels: `kernel` Θ(X, X)
    over `train` ((N, N) traced, or (N, N, K, K)), `kernel_test` Θ(X_test, X) over `test` (or
    None: no prediction), in memory or a :class:`DiskMatrix`. `budget`: bytes the dense
    spectrum may use. Keys: ``lambda_max``, ``lambda_min``, ``condition_number``,
    ``max_learning_rate``, ``mean_eigenvalue``, ``mean_prediction_accuracy`` (NaN without a
    test kernel), ``mean_prediction_accuracy_t`` (NaN without `time`), ``spectrum`` (dense or
    lanczos), ``eigenvalues`` (descending). DataError when Θ + r·I is not positive definite."""
    n = len(train)
    square = as_square(kernel)
    m = square.shape[0]
    # dense: the working copies of the square matrix fit (an in-memory kernel fitted the budget)
    dense = lapack.resident_bytes(m) <= budget or not isinstance(kernel, DiskMatrix)
    work = lapack.symmetric_buffer(m) if dense else None  # the solve, then the spectrum, in place
    predicted = predictions(kernel, kernel_test, square, work, train, test, classes, traced,
                            outputs_k, ridge, time, budget) if test is not None else {}
    eigs = eigenvalues(square, work)
    del work
    stats = {**ends(eigs, n),
             # the trace is the eigenvalues' sum: read the file again only for the Lanczos ends
             "mean_eigenvalue": float(np.mean(eigs)) if dense else trace(square) / m,
             "mean_prediction_accuracy": math.nan, "mean_prediction_accuracy_t": math.nan,
             "spectrum": "dense" if dense else "lanczos", "eigenvalues": eigs}
    return {**stats, **predicted}


def ends(eigs: np.ndarray, n: int) -> dict[str, float]:
    """``lambda_max``, ``lambda_min``, ``condition_number`` (inf when λ_min ≤ 0) and
    ``max_learning_rate`` (2N / λ_max) of descending eigenvalues `eigs` of an N-example kernel."""
    lam_max, lam_min = float(eigs[0]), float(eigs[-1])
    return {"lambda_max": lam_max, "lambda_min": lam_min,
            "condition_number": lam_max / lam_min if lam_min > 0 else math.inf,
            "max_learning_rate": 2 * n / lam_max if lam_max > 0 else math.inf}


def predictions(kernel, kernel_test, square, work, train: Data, test: Data, classes: int,
                 traced: bool, outputs_k: int, ridge: float, time: float | None, budget: int) -> dict:
    """Test accuracy of the mean prediction (and at `time`), solving in the buffer `work`."""
    n, m = len(train), square.shape[0]
    if work is None:
        logger.warning("the mean prediction needs the %d x %d kernel in memory (%.2f GiB), more "
                       "than the memory budget; it is NaN", m, m, lapack.resident_bytes(m) / 2**30)
        return {}
    stats = {}
    y = centred_targets(train.y, classes)
    full = not traced and outputs_k == classes
    targets = y.reshape(-1, 1) if full else y  # (N·K, 1) in (example, output) order, or (N, C)
    cross = as_square(kernel_test) if full else (kernel_test if traced else
                                               np.asarray(kernel_test).diagonal(axis1=2, axis2=3).mean(-1))
    system = square if (traced or full) else np.asarray(kernel).diagonal(axis1=2, axis2=3).mean(-1)
    if system is not square:
        work = lapack.symmetric_buffer(len(system))
    stats["mean_prediction_accuracy"] = accuracy(times(cross, solve(system, work, targets, ridge)),
                                                  test.y, classes, full)
    if time is not None and isinstance(system, DiskMatrix) and 16 * m * m > budget:
        logger.warning("the prediction at time=%g needs the eigenvectors of the %d x %d kernel "
                       "(two copies, %.2f GiB), more than the memory budget; it is NaN", time, m, m,
                       16 * m * m / 2**30)
    elif time is not None:
        w, v = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(fill(work, system)), UPLO="U"))
        c = time / n
        safe = np.where(w > 0, w, 1.0)
        gain = np.where(w > 0, -np.expm1(-c * safe) / safe, c)  # (1 − e^{−cλ})/λ → c as λ → 0
        stats["mean_prediction_accuracy_t"] = accuracy(times(cross, v @ (gain[:, None] * (v.T @ targets))),
                                                        test.y, classes, full)
    return stats


def centred_targets(labels: Tensor, classes: int) -> np.ndarray:
    """(N, C) float64 targets of the mean prediction: one-hot minus 1/C (mean-centred)."""
    return np.eye(classes)[labels.numpy()] - 1.0 / classes


def accuracy(pred: np.ndarray, labels: Tensor, classes: int, full: bool) -> float:
    pred = pred.reshape(len(labels), classes)
    return float((pred.argmax(1) == labels.numpy()).mean())


def fill(work: np.ndarray, matrix) -> np.ndarray:
    """`work` holding the upper triangle of the symmetric `matrix` (in memory, or read straight
    from its file): all that :mod:`genprobe.engine.lapack` reads, half the resident memory."""
    if isinstance(matrix, DiskMatrix):
        return matrix.upper_into(work)
    for i in range(len(matrix)):
        work[i, i:] = matrix[i, i:]
    return work


def solve(system, work: np.ndarray, targets: np.ndarray, ridge: float) -> np.ndarray:
    """(Θ + r·I)⁻¹ targets, r = ridge · mean(diag Θ), factoring in the buffer `work`."""
    a = fill(work, system)
    diagonal = np.einsum("ii->i", a)
    diagonal += ridge * float(diagonal.mean())
    try:
        return lapack.cho_solve_(a, targets)
    except np.linalg.LinAlgError:
        raise DataError(f"the NTK Θ(X, X) is not positive definite for the mean-prediction solve at "
                        f"ridge={ridge:g}; pass a larger ridge (e.g. ridge={max(ridge * 100, 1e-4):g})") from None


def eigenvalues(square, work: np.ndarray | None) -> np.ndarray:
    """Descending eigenvalues: all of them (LAPACK, in the buffer `work`) or, without a buffer,
    the Lanczos ends (module docstring)."""
    m = square.shape[0]
    if work is not None:
        return lapack.eigvalsh_(fill(work, square))[::-1].copy()
    import scipy.sparse.linalg

    k = min(LANCZOS_K, m - 2)
    op = scipy.sparse.linalg.LinearOperator((m, m), matvec=lambda v: times(square, v.ravel()), dtype=np.float64)
    top = lanczos(op, k, "largest")
    shift = float(top.max())
    flipped = scipy.sparse.linalg.LinearOperator(
        (m, m), matvec=lambda v: shift * v.ravel() - times(square, v.ravel()), dtype=np.float64)
    bottom = shift - lanczos(flipped, k, "smallest")
    return np.concatenate([np.sort(top)[::-1], np.sort(bottom)[::-1]])


def lanczos(op, k: int, which: str) -> np.ndarray:
    """The k largest eigenvalues of symmetric `op` (ARPACK); when some do not converge (clustered
    eigenvalues, e.g. a rank-deficient kernel's zeros), those that did, with a warning."""
    import scipy.sparse.linalg

    m = op.shape[0]
    try:
        return scipy.sparse.linalg.eigsh(op, k=k, which="LA", ncv=min(m, max(2 * k + 1, 4 * k)),
                                         maxiter=max(1000, 20 * m), return_eigenvectors=False)
    except scipy.sparse.linalg.ArpackNoConvergence as exc:
        if len(exc.eigenvalues) == 0:
            raise DataError(f"the Lanczos solver found none of the {which} {k} eigenvalues of the "
                            "kernel; give it the memory for a dense spectrum (memory_budget)") from None
        logger.warning("Lanczos converged on %d of the %s %d eigenvalues; reporting those",
                       len(exc.eigenvalues), which, k)
        return np.asarray(exc.eigenvalues, dtype=np.float64).real


def times(matrix, b: np.ndarray) -> np.ndarray:
    """matrix @ b, reading a file-backed matrix CHUNK_BYTES at a time."""
    if not isinstance(matrix, DiskMatrix):
        return matrix @ b
    step = chunk_rows(matrix)
    return np.concatenate([matrix[i:i + step] @ b for i in range(0, len(matrix), step)])


def trace(square) -> float:
    step = chunk_rows(square)
    return float(sum(np.trace(square[i:i + step, i:i + step]) for i in range(0, square.shape[0], step)))


def chunk_rows(matrix) -> int:
    return max(1, CHUNK_BYTES // (8 * int(np.prod(matrix.shape[1:]))))


__all__ = ["CHUNK_BYTES", "LANCZOS_K", "accuracy", "analyse", "as_square", "centred_targets", "eigenvalues", "ends",
           "fill", "predictions", "solve", "times", "trace"]
