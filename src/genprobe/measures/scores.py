"""The weighted scores of :mod:`genprobe.measures.ranking`: Kendall's τ-b, Jiang et al.'s
granulated τ and the CMI (both conventions) on weighted pairs of models, and the bootstrap's
intervals, p-values, Holm's adjustment and resampling.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..seeds import seed_sequence

# ----------------------------------------------------------------------------- weighted scores
# Every score takes W, a (B, n) array of model weights: row b is one resample's counts (the point
# estimate is a row of ones; a model where the measure is NaN has weight 0). Pairs (i, j) of
# distinct models weigh W_bi · W_bj.


def signs(v: np.ndarray) -> np.ndarray:
    """(n, n) int8: sign(v_i − v_j), by comparison (infinite values order correctly)."""
    return (v[:, None] > v[None, :]).astype(np.int8) - (v[:, None] < v[None, :]).astype(np.int8)


def _quad(W: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Σ_ij W_bi S_ij W_bj per row b."""
    return np.einsum("bi,bi->b", W @ S, W)


def tau_b(sx: np.ndarray, sy: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Kendall's τ-b per row of W: Σ w_i w_j sign·sign / √(Σ w_i w_j |sign x| · Σ w_i w_j |sign y|),
    ties corrected as ``scipy.stats.kendalltau``; NaN where the measure or the target is constant."""
    sx, sy = sx.astype(np.float64), sy.astype(np.float64)
    num = _quad(W, sx * sy)
    den = np.sqrt(_quad(W, np.abs(sx)) * _quad(W, np.abs(sy)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def cell_codes(codes: Sequence[np.ndarray], n: int) -> np.ndarray:
    """One int per model naming its combination of the given hyper-parameter codes."""
    if not codes:
        return np.zeros(n, dtype=np.int64)
    return np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)[1].reshape(-1)


def granulated(sx, sy, codes: Mapping[str, np.ndarray], W) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Ψ and each ψ_h per row of W (Jiang et al.): ψ_h is the mean, over the groups of models
    equal in every other hyper-parameter that hold ≥ 2 values of h (weight > 0), of τ-b within
    the group (0 where the measure or the gap is constant there: τ-a's value; a measure that
    does not move along an axis tells nothing about it and must not drop out of that axis's
    mean); Ψ is the mean of the ψ_h that have a group."""
    B, n = W.shape
    per_axis: dict[str, np.ndarray] = {}
    for h, axis in codes.items():
        group = cell_codes([c for o, c in codes.items() if o != h], n)
        total, count = np.zeros(B), np.zeros(B)
        for gid in np.unique(group):
            idx = np.flatnonzero(group == gid)
            values = np.unique(axis[idx])
            if len(values) < 2:
                continue
            Wg = W[:, idx]
            present = np.stack([(Wg[:, axis[idx] == v] > 0).any(axis=1) for v in values], axis=1)
            valid = present.sum(axis=1) >= 2
            tau = np.nan_to_num(tau_b(sx[np.ix_(idx, idx)], sy[np.ix_(idx, idx)], Wg), nan=0.0)
            total += np.where(valid, tau, 0.0)
            count += valid
        if count.any():
            with np.errstate(invalid="ignore", divide="ignore"):
                per_axis[h] = np.where(count > 0, total / np.where(count > 0, count, 1), np.nan)
    if not per_axis:
        return np.full(B, np.nan), per_axis
    stacked = np.stack(list(per_axis.values()))
    finite = np.isfinite(stacked)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(finite, stacked, 0.0).sum(axis=0) / finite.sum(axis=0)
    return np.where(finite.any(axis=0), mean, np.nan), per_axis


def _pair_tables(sx, sy, cell: np.ndarray, W: np.ndarray, *, self_pairs: bool,
                 tie_sign: int | None) -> np.ndarray:
    """(B, cells², 3, 3) weighted pair counts by (cell of i, cell of j), V_g, V_μ. `tie_sign`:
    None keeps a tie as its own category; −1 counts a tie as "−" (the competition's code).
    `self_pairs`: also pair every model with itself (weight W_i², the competition's code)."""
    from scipy import sparse

    n = len(cell)
    cells = int(cell.max()) + 1
    vg, vm = sy.astype(np.int64), sx.astype(np.int64)
    if tie_sign is not None:
        vg, vm = np.where(vg == 0, tie_sign, vg), np.where(vm == 0, tie_sign, vm)
    key = ((cell[:, None] * cells + cell[None, :]) * 9 + (vg + 1) * 3 + (vm + 1)).reshape(-1)
    onehot = sparse.csr_matrix((np.ones(n * n), (np.arange(n * n), key)),
                               shape=(n * n, cells * cells * 9))
    out = np.empty((W.shape[0], cells * cells * 9))
    step = max(1, 2**22 // max(n * n, 1))
    for start in range(0, W.shape[0], step):
        w = W[start:start + step]
        pairs = w[:, :, None] * w[:, None, :]
        if not self_pairs:
            pairs[:, np.arange(n), np.arange(n)] = 0.0
        out[start:start + step] = (onehot.T @ pairs.reshape(len(w), -1).T).T
    return out.reshape(W.shape[0], cells * cells, 3, 3)


def _normalized_cmi(joint: np.ndarray) -> np.ndarray:
    """I(V_μ; V_g | U) / H(V_g | U) per row from pair weights (B, cells, V_g, V_μ), the
    expectations over U weighted by each cell's share of the pairs; ∞ where H = 0."""
    total = joint.sum(axis=(1, 2, 3))
    cell = joint.sum(axis=(2, 3), keepdims=True)
    gap = joint.sum(axis=3, keepdims=True)
    measure = joint.sum(axis=2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mi = np.where(joint > 0, joint * np.log(joint * cell / (gap * measure)), 0.0)
        h = np.where(gap > 0, -gap * np.log(gap / cell), 0.0)
        mi, h = mi.sum(axis=(1, 2, 3)) / total, h.sum(axis=(1, 2, 3)) / total
        return np.where(h > 1e-12, mi / np.where(h > 1e-12, h, 1.0), np.inf)


def cmi_paper(sx, sy, codes: Mapping[str, np.ndarray], W) -> tuple[np.ndarray, list[str]]:
    """The CMI score per row of W (module docstring, ``"paper"``) and the point estimate's
    minimizing conditioning set (row 0)."""
    names, n = list(codes), W.shape[1]
    best, chosen = np.full(W.shape[0], np.inf), []
    for size in range(min(2, len(names)), -1, -1):  # pairs; smaller sets only where none scores
        todo = ~np.isfinite(best)
        if not todo.any():
            break
        level, level_set = np.full(W.shape[0], np.inf), [None] * W.shape[0]
        for subset in itertools.combinations(names, size):
            cell = cell_codes([codes[h] for h in subset], n)
            joint = _pair_tables(sx, sy, cell, W, self_pairs=False, tie_sign=None)
            ratio = _normalized_cmi(joint)
            if ratio[0] < level[0]:
                level_set[0] = list(subset)
            level = np.minimum(level, ratio)
        if todo[0] and np.isfinite(level[0]):
            chosen = level_set[0]
        best = np.where(todo, level, best)
    return np.where(np.isfinite(best), best, np.nan), chosen


def cmi_pgdl(sx, sy, codes: Mapping[str, np.ndarray], W) -> tuple[np.ndarray, list[str]]:
    """The competition's score per row of W (module docstring, ``"pgdl"``): for each pair of
    hyper-parameters, the cells are the (value of i, value of j) combinations of both
    hyper-parameters over ordered pairs (i, j) of models, every model also paired with itself;
    V = "+" when g_i > g_j (μ_i > μ_j) and "−" otherwise (a tie is "−"); per cell, in bits,
    MI of its 2×2 table and H_g = −Σ p log2(p + 1e-12); the score is mean over cells of MI /
    mean over cells of H_g (cells unweighted), minimized over the pairs of hyper-parameters."""
    names, n = list(codes), W.shape[1]
    best, chosen = np.full(W.shape[0], np.inf), []
    for subset in itertools.combinations(names, 2):
        cell = cell_codes([codes[h] for h in subset], n)
        joint = _pair_tables(sx, sy, cell, W, self_pairs=True, tie_sign=-1)[:, :, ::2, ::2]
        size = joint.sum(axis=(2, 3), keepdims=True)  # (B, cells, 1, 1)
        present = size[:, :, 0, 0] > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            p = joint / size
            rows, cols = p.sum(axis=3, keepdims=True), p.sum(axis=2, keepdims=True)
            mi = np.where(joint > 0, p * np.log2(p / (rows * cols)), 0.0).sum(axis=(2, 3))
            h = -(rows * np.log2(rows + 1e-12)).sum(axis=(2, 3))
            cells = present.sum(axis=1)
            ratio = (np.where(present, mi, 0.0).sum(axis=1) / cells) / \
                (np.where(present, h, 0.0).sum(axis=1) / cells)
        ratio = np.where(cells > 0, ratio, np.inf)
        if ratio[0] < best[0]:
            chosen = list(subset)
        best = np.fmin(best, ratio)
    return np.where(np.isfinite(best), best, np.nan), chosen



def interval(replicates: np.ndarray, level: float, point: float) -> tuple[float, float]:
    """The bias-corrected percentile interval (Efron's BC) of the bootstrap `replicates` around
    the estimate `point`: the percentiles Φ(2 z₀ ± z_{(1+level)/2}), z₀ = Φ⁻¹(share of replicates
    below the estimate, ties counted half). Without bias (z₀ = 0) it is the percentile interval;
    it matters for the CMI, whose resamples sit above the estimate (an information measured on
    fewer distinct pairs is biased upward)."""
    from scipy.stats import norm

    finite = replicates[np.isfinite(replicates)]
    if len(finite) < max(2, len(replicates) // 2) or not math.isfinite(point):
        return math.nan, math.nan
    z0 = norm.ppf(_share_below(finite, point))
    z = norm.ppf((1.0 + level) / 2.0)
    lo, hi = np.quantile(finite, norm.cdf([2 * z0 - z, 2 * z0 + z]))
    return float(lo), float(hi)


def _share_below(finite: np.ndarray, value: float) -> float:
    """The share of `finite` below `value`, ties counted half, kept within (0, 1)."""
    share = (np.count_nonzero(finite < value) + 0.5 * np.count_nonzero(finite == value)) / len(finite)
    return min(max(share, 0.5 / len(finite)), 1.0 - 0.5 / len(finite))


def p_value(replicates: np.ndarray, point: float) -> float:
    """Two-sided bootstrap p-value of a zero difference, consistent with :func:`_interval`: the
    smallest 1 − level at which the bias-corrected interval leaves out 0,
    2 (1 − Φ(|2 z₀ − Φ⁻¹(share of replicates below 0)|)); without bias, twice the smaller tail."""
    from scipy.stats import norm

    finite = replicates[np.isfinite(replicates)]
    if len(finite) < max(2, len(replicates) // 2) or not math.isfinite(point):
        return math.nan
    z0 = norm.ppf(_share_below(finite, point))
    return float(min(1.0, 2.0 * norm.sf(abs(2 * z0 - norm.ppf(_share_below(finite, 0.0))))))


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN stays NaN)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def resample(n: int, clusters: np.ndarray, B: int, seed: int) -> np.ndarray:
    """(1 + B, n) weights: a row of ones (the point estimate), then B resamples of the clusters
    with replacement (each model weighs its cluster's count)."""
    rng = np.random.default_rng(seed_sequence(seed))
    k = int(clusters.max()) + 1 if n else 0
    counts = rng.multinomial(k, np.full(k, 1.0 / k), size=B).astype(np.float64) if k and B \
        else np.zeros((0, k))
    return np.vstack([np.ones((1, n)), counts[:, clusters]]) if n else np.ones((1 + B, 0))


__all__ = ["cell_codes", "cmi_paper", "cmi_pgdl", "granulated", "holm", "interval", "p_value", "resample",
           "signs", "tau_b"]
