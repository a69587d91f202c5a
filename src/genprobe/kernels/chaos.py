"""Order to chaos: the fixed points and depth scales of deep signal propagation (Poole et al. 2016,
Schoenholz et al. 2017; as used by Xiao, Pennington & Schoenholz 2020).

For a fully-connected network with weight and bias variances σ_w², σ_b² and activation φ, a
pre-activation of variance q maps to q' = σ_w² E[φ(√q z)²] + σ_b² (z ~ N(0, 1)); its fixed point is
q*. At q*, the correlation c of two inputs maps to c' = (σ_w² E[φ(u)φ(v)] + σ_b²)/q* with (u, v) of
variances q* and correlation c; c = 1 is always a fixed point, with slope

    χ₁ = σ_w² E[φ'(√q* z)²].

χ₁ < 1: the *ordered* phase (c → c* = 1, all inputs become alike; the NTK tends to a constant
matrix, its condition number blows up beyond ξ₁ = −1/log χ₁ layers). χ₁ > 1: the *chaotic* phase
(c → c* < 1; the NTK tends to a multiple of the identity, so the network stays trainable but its
mean prediction forgets the data beyond ξ* = −1/(log χ_c* − log χ₁) layers, with
χ_c* = σ_w² E[φ'(u)φ'(v)] at correlation c*). χ₁ = 1 is the critical line.

The expectations use the same closed forms as the kernel recursion
(:mod:`genprobe.kernels.infinite`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.optimize import brentq

from .infinite import Activation, _pair_map, _self_map, check_hyperparameters

_TOL = 1e-14


@dataclass(frozen=True)
class OrderToChaos:
    """Signal-propagation quantities of one (σ_w², σ_b², activation).

    Attributes:
        q_star: fixed point q* of the variance map (inf where the variance grows without bound,
            e.g. ReLU with σ_w² ≥ 2).
        chi1: χ₁, the slope of the correlation map at c = 1.
        c_star: the stable fixed point of the correlation map (1 in the ordered phase).
        chi_c_star: χ_c* = σ_w² E[φ'(u)φ'(v)] at correlation c* (= χ₁ in the ordered phase).
        phase: ``"ordered"`` (χ₁ < 1), ``"chaotic"`` (χ₁ > 1) or ``"critical"``.
        depth_scale: ξ₁ = −1/log χ₁ (ordered) or ξ* = −1/(log χ_c* − log χ₁) (chaotic), in
            layers; inf at the critical line, NaN where undefined (no finite q*).
    """

    sigma_w2: float
    sigma_b2: float
    activation: str
    q_star: float
    chi1: float
    c_star: float
    chi_c_star: float
    phase: str
    depth_scale: float


def _t(v: float) -> torch.Tensor:
    return torch.tensor(float(v), dtype=torch.float64)


def _mean_square(activation: str, q: float) -> float:
    """E[φ(√q z)²]."""
    return float(_self_map(activation, _t(q)))


def _pair(activation: str, q: float, c: float) -> tuple[float, float]:
    """(E[φ(u)φ(v)], E[φ'(u)φ'(v)]) for (u, v) of variance q and correlation c."""
    value, deriv = _pair_map(activation, _t(c * q), _t(q), _t(q))
    return float(value), float(deriv)


def fixed_point_variance(sigma_w2: float, sigma_b2: float, activation: Activation = "erf") -> float:
    """q*: the fixed point of q ↦ σ_w² E[φ(√q z)²] + σ_b² (inf when there is none)."""
    sigma_w2, sigma_b2 = check_hyperparameters(sigma_w2, sigma_b2, activation)
    if activation == "relu":  # E[relu(√q z)²] = q/2: a linear map, unbounded for σ_w² ≥ 2
        return sigma_b2 / (1 - sigma_w2 / 2) if sigma_w2 < 2 else math.inf
    if sigma_b2 == 0 and sigma_w2 * 4 / math.pi <= 1:  # erf: q = 0 is the stable fixed point
        return 0.0
    # erf: E[φ²] < 1, so q* lies in (0, σ_w² + σ_b²], where the map minus q changes sign once
    def gap(q: float) -> float:
        return sigma_w2 * _mean_square(activation, q) + sigma_b2 - q

    low = 1e-300 if sigma_b2 == 0 else 0.0
    return float(brentq(gap, low, sigma_w2 + sigma_b2, xtol=1e-300, rtol=1e-15))


def chi1(sigma_w2: float, sigma_b2: float, activation: Activation = "erf") -> float:
    """χ₁ = σ_w² E[φ'(√q* z)²]: the slope of the correlation map at c = 1 (1 is critical)."""
    q = fixed_point_variance(sigma_w2, sigma_b2, activation)
    if activation == "relu":
        return sigma_w2 / 2
    return sigma_w2 * _pair(activation, q, 1.0)[1]


def _correlation_gap(sigma_w2: float, sigma_b2: float, activation: str, q: float, c: float) -> float:
    return (sigma_w2 * _pair(activation, q, c)[0] + sigma_b2) / q - c


def order_to_chaos(sigma_w2: float, sigma_b2: float, activation: Activation = "erf") -> OrderToChaos:
    """q*, χ₁, c*, χ_c*, the phase and its depth scale (see the module docstring)."""
    sigma_w2, sigma_b2 = check_hyperparameters(sigma_w2, sigma_b2, activation)
    q = fixed_point_variance(sigma_w2, sigma_b2, activation)
    x1 = chi1(sigma_w2, sigma_b2, activation)
    phase = "ordered" if x1 < 1 - _TOL else "chaotic" if x1 > 1 + _TOL else "critical"
    if not 0 < q < math.inf:
        return OrderToChaos(sigma_w2, sigma_b2, activation, q, x1, math.nan, math.nan, phase,
                            math.nan)
    if phase != "chaotic":
        c, xc = 1.0, x1
        scale = -1 / math.log(x1) if phase == "ordered" else math.inf
    else:
        # c = 1 is unstable (slope χ₁ > 1) and the map is above the diagonal at c = −1 (σ_b² > 0)
        # or at c = 0 (odd φ, σ_b² = 0: c* = 0): the stable c* lies below 1
        eps = 1e-3
        while _correlation_gap(sigma_w2, sigma_b2, activation, q, 1 - eps) >= 0 and eps > 1e-12:
            eps /= 10
        lo = -1.0 if sigma_b2 > 0 else 1e-12
        if _correlation_gap(sigma_w2, sigma_b2, activation, q, lo) <= 0:
            c = 0.0 if sigma_b2 == 0 else lo
        else:
            c = float(brentq(lambda v: _correlation_gap(sigma_w2, sigma_b2, activation, q, v),
                             lo, 1 - eps, xtol=1e-15))
        xc = sigma_w2 * _pair(activation, q, c)[1]
        scale = -1 / (math.log(xc) - math.log(x1))
    return OrderToChaos(sigma_w2, sigma_b2, activation, q, x1, c, xc, phase, scale)


def critical_sigma_w2(sigma_b2: float, activation: Activation = "erf") -> float:
    """The σ_w² at which χ₁ = 1 for this σ_b² (ReLU: 2; erf with σ_b² = 0.18: ≈ 1.76)."""
    check_hyperparameters(1.0, sigma_b2, activation)
    if activation == "relu":
        return 2.0
    hi = 2.0
    while chi1(hi, sigma_b2, activation) < 1:  # χ₁ grows with σ_w²
        hi *= 2
    return float(brentq(lambda w: chi1(w, sigma_b2, activation) - 1, 1e-6, hi, xtol=1e-13))


__all__ = ["OrderToChaos", "chi1", "critical_sigma_w2", "fixed_point_variance", "order_to_chaos"]
