"""Infinite-width NNGP/NTK recursions (genprobe.kernels) against independent routes.

- the closed-form expectations of one layer against numerical integration (1-D adaptive
  quadrature for ReLU, whose derivative is a step; 2-D Gauss–Hermite for erf);
- the fcn recursion against a hand-written loop over pairs of inputs that uses those numerical
  expectations;
- cnn-flatten and cnn-gap (1-D and 2-D inputs) against a literal loop over pairs of inputs and
  pairs of pixels, zero padding written out offset by offset;
- symmetry, positive semi-definiteness, batching, rectangular = square sub-block;
- the empirical NTK of wide NTK-parameterized zoo networks approaching the infinite NTK;
- order-to-chaos quantities against quadrature; the NTK phase diagram against a literal
  computation of one cell, save/load, plot, CLI; bad inputs.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
import torch
from scipy.integrate import quad

import genprobe as gp
from genprobe.errors import ConfigError, DataError
from genprobe.kernels import (
    critical_sigma_w2,
    fixed_point_variance,
    infinite,
    infinite_by_depth,
    ntk_phase,
    order_to_chaos,
)
from genprobe.kernels.infinite import _pair_map

pytestmark = pytest.mark.usefixtures("one_thread")

SW2, SB2 = 1.7, 0.18


# ----------------------------------------------------------------------------- references


def _phi(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def relu_expectations(s11: float, s22: float, s12: float) -> tuple[float, float]:
    """(E[relu(u) relu(v)], P(u > 0, v > 0)) by adaptive quadrature over u, with v | u Gaussian
    (mean β u, sd s) integrated in closed form: E[relu(v) | u] = m Φ(m/s) + s φ(m/s)."""
    beta, s = s12 / s11, math.sqrt(max(s22 - s12 * s12 / s11, 0.0))
    su = math.sqrt(s11)

    def density(u):
        return _phi(u / su) / su

    def relu_v(u):
        m = beta * u
        return max(m, 0.0) if s == 0 else m * _cdf(m / s) + s * _phi(m / s)

    def positive_v(u):
        m = beta * u
        return float(m > 0) if s == 0 else _cdf(m / s)

    value = quad(lambda u: u * relu_v(u) * density(u), 0, math.inf, epsabs=1e-13, epsrel=1e-12)[0]
    prob = quad(lambda u: positive_v(u) * density(u), 0, math.inf, epsabs=1e-13, epsrel=1e-12)[0]
    return value, prob


_GH_X, _GH_W = np.polynomial.hermite.hermgauss(150)


def erf_expectations(s11: float, s22: float, s12: float) -> tuple[float, float]:
    """(E[erf(u) erf(v)], E[erf'(u) erf'(v)]) by 2-D Gauss–Hermite quadrature (150 × 150 nodes:
    within 1e-12 of the truth for variances up to 2.5; larger ones need more nodes)."""
    from scipy.special import erf

    l11 = math.sqrt(s11)
    l21, l22 = s12 / l11, math.sqrt(max(s22 - s12 * s12 / s11, 0.0))
    z1, z2 = np.meshgrid(math.sqrt(2) * _GH_X, math.sqrt(2) * _GH_X, indexing="ij")
    w = np.outer(_GH_W, _GH_W) / math.pi
    u, v = l11 * z1, l21 * z1 + l22 * z2

    def d(t):
        return 2 / math.sqrt(math.pi) * np.exp(-t * t)

    return float((w * erf(u) * erf(v)).sum()), float((w * d(u) * d(v)).sum())


def numeric(activation: str, s11: float, s22: float, s12: float) -> tuple[float, float]:
    return (relu_expectations if activation == "relu" else erf_expectations)(s11, s22, s12)


def closed(activation: str, s11: float, s22: float, s12: float) -> tuple[float, float]:
    """The closed forms, written out once more for the literal loops (checked above against
    quadrature by test_closed_forms_match_quadrature)."""
    if activation == "relu":
        c = max(-1.0, min(1.0, s12 / math.sqrt(s11 * s22)))
        t = math.acos(c)
        return math.sqrt(s11 * s22) * (math.sin(t) + (math.pi - t) * c) / (2 * math.pi), \
            (math.pi - t) / (2 * math.pi)
    a = (1 + 2 * s11) * (1 + 2 * s22)
    return 2 / math.pi * math.asin(2 * s12 / math.sqrt(a)), 4 / math.pi / math.sqrt(a - 4 * s12 * s12)


def literal_fcn(x1, x2, depth, sw2, sb2, activation, expectations=numeric):
    """The fcn recursion, one pair of inputs at a time, with numerically integrated expectations."""
    xs = [np.asarray(v, dtype=float).reshape(-1) for v in (*x1, *x2)]
    n1, n = len(x1), len(xs)
    k = {(i, j): float(xs[i] @ xs[j]) / len(xs[0]) for i in range(n) for j in range(n)}
    t = {key: 0.0 for key in k}
    for _ in range(depth):
        k = {key: sw2 * v + sb2 for key, v in k.items()}
        t = {key: k[key] + sw2 * t[key] for key in k}
        post = {}
        for (i, j), v in k.items():
            value, deriv = expectations(activation, k[i, i], k[j, j], v)
            post[i, j] = value
            t[i, j] *= deriv
        k = post
    nngp = np.array([[sw2 * k[i, j] + sb2 for j in range(n1, n)] for i in range(n1)])
    ntk = nngp + sw2 * np.array([[t[i, j] for j in range(n1, n)] for i in range(n1)])
    return nngp, ntk


def literal_cnn(x1, x2, depth, sw2, sb2, activation, k, readout):
    """The CNN recursion one pair of inputs and one pair of pixels at a time: a stride-1 SAME
    convolution averages K(p + δ, p' + δ) over the k^d offsets δ, out-of-bounds terms zero."""
    xs = [np.asarray(v, dtype=float) for v in (*x1, *x2)]
    n1, n = len(x1), len(xs)
    c, shape = xs[0].shape[0], xs[0].shape[1:]
    pixels = list(np.ndindex(*shape))
    lo = (k - 1) // 2
    offsets = list(product(range(-lo, k - lo), repeat=len(shape)))
    keys = [(i, j, p, q) for i in range(n) for j in range(n) for p in pixels for q in pixels]
    kk = {(i, j, p, q): float(xs[i][(slice(None), *p)] @ xs[j][(slice(None), *q)]) / c
          for (i, j, p, q) in keys}
    tt = dict.fromkeys(keys, 0.0)

    def inside(p):
        return all(0 <= a < s for a, s in zip(p, shape, strict=True))

    for _ in range(depth):
        new_k, new_t = {}, {}
        for (i, j, p, q) in keys:
            sk = st = 0.0
            for off in offsets:
                pp = tuple(a + o for a, o in zip(p, off, strict=True))
                qq = tuple(a + o for a, o in zip(q, off, strict=True))
                if inside(pp) and inside(qq):
                    sk += kk[i, j, pp, qq]
                    st += tt[i, j, pp, qq]
            new_k[i, j, p, q] = sw2 * sk / len(offsets) + sb2
            new_t[i, j, p, q] = sw2 * st / len(offsets) + new_k[i, j, p, q]
        kk, tt = {}, {}
        for (i, j, p, q), v in new_k.items():
            value, deriv = closed(activation, new_k[i, i, p, p], new_k[j, j, q, q], v)
            kk[i, j, p, q], tt[i, j, p, q] = value, deriv * new_t[i, j, p, q]
    pairs = [(p, p) for p in pixels] if readout == "flatten" else [(p, q) for p in pixels for q in pixels]
    nngp = np.zeros((n1, n - n1))
    ntk = np.zeros((n1, n - n1))
    for i in range(n1):
        for j in range(n1, n):
            pk = sum(kk[i, j, p, q] for p, q in pairs) / len(pairs)
            pt = sum(tt[i, j, p, q] for p, q in pairs) / len(pairs)
            nngp[i, j - n1] = sw2 * pk + sb2
            ntk[i, j - n1] = nngp[i, j - n1] + sw2 * pt
    return nngp, ntk


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_closed_forms_match_quadrature(activation):
    rng = np.random.default_rng(1)
    for _ in range(12):
        s11, s22 = rng.uniform(0.05, 2.5, 2)
        s12 = rng.uniform(-0.98, 0.98) * math.sqrt(s11 * s22)
        value, deriv = _pair_map(activation, torch.tensor(s12, dtype=torch.float64),
                                 torch.tensor(s11, dtype=torch.float64),
                                 torch.tensor(s22, dtype=torch.float64))
        ref_value, ref_deriv = numeric(activation, s11, s22, s12)
        assert abs(float(value) - ref_value) < 1e-9 * max(1.0, abs(ref_value))
        assert abs(float(deriv) - ref_deriv) < 1e-9
        assert np.allclose(closed(activation, s11, s22, s12), (ref_value, ref_deriv), rtol=1e-9,
                           atol=1e-10)


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_one_hidden_layer_equals_the_closed_forms(activation):
    x = 0.7 * np.random.default_rng(2).normal(size=(3, 5))  # pre-activation variances < 2.5
    got = infinite("fcn", x, depth=1, sigma_w2=SW2, sigma_b2=SB2, activation=activation)
    cov = x @ x.T / 5 * SW2 + SB2
    nngp = np.empty((3, 3))
    ntk = np.empty((3, 3))
    for i, j in product(range(3), repeat=2):
        value, deriv = numeric(activation, cov[i, i], cov[j, j], cov[i, j])
        nngp[i, j] = SW2 * value + SB2
        ntk[i, j] = nngp[i, j] + SW2 * deriv * cov[i, j]  # Θ¹ = K¹ (first layer)
    assert rel(got.nngp, nngp) < 1e-9 and rel(got.ntk, ntk) < 1e-9


@pytest.mark.parametrize("activation, depth", [("relu", 2), ("erf", 3)])
def test_fcn_against_a_hand_written_loop_with_quadrature(activation, depth):
    rng = np.random.default_rng(3)
    x1, x2 = 0.7 * rng.normal(size=(2, 6)), 0.7 * rng.normal(size=(2, 6))
    got = infinite("fcn", x1, x2, depth=depth, sigma_w2=SW2, sigma_b2=SB2, activation=activation)
    nngp, ntk = literal_fcn(x1, x2, depth, SW2, SB2, activation)
    assert got.nngp.shape == (2, 2) and got.nngp.dtype == torch.float64
    assert rel(got.nngp, nngp) < 1e-8 and rel(got.ntk, ntk) < 1e-8
    # the closed forms in the same loop agree to rounding: the tolerance above is quadrature's
    nngp_c, ntk_c = literal_fcn(x1, x2, depth, SW2, SB2, activation, closed)
    assert rel(got.nngp, nngp_c) < 1e-13 and rel(got.ntk, ntk_c) < 1e-13


def test_depth_zero_is_the_readout_on_the_inputs():
    x = np.random.default_rng(4).normal(size=(3, 2, 4, 4))
    for arch in ("fcn", "cnn-flatten"):  # both: σ_w² x·x'/D + σ_b², Θ = K
        got = infinite(arch, x, depth=0, sigma_w2=SW2, sigma_b2=SB2)
        flat = x.reshape(3, -1)
        expected = SW2 * flat @ flat.T / flat.shape[1] + SB2
        assert rel(got.nngp, expected) < 1e-14 and rel(got.ntk, expected) < 1e-14
    got = infinite("cnn-gap", x, depth=0, sigma_w2=SW2, sigma_b2=SB2)
    pooled = x.mean(axis=(2, 3))  # GAP then Dense: the mean over all pixel pairs of x·x'/C
    expected = SW2 * pooled @ pooled.T / 2 + SB2
    assert rel(got.nngp, expected) < 1e-14


# ----------------------------------------------------------------------------- CNNs


@pytest.mark.parametrize("arch", ["cnn-flatten", "cnn-gap"])
@pytest.mark.parametrize("activation", ["relu", "erf"])
@pytest.mark.parametrize("shape, k", [((2, 5), 3), ((2, 4, 3), 3), ((1, 4, 4), 2)])
def test_cnn_against_a_literal_per_pixel_pair_loop(arch, activation, shape, k):
    rng = np.random.default_rng(5)
    x1, x2 = rng.normal(size=(2, *shape)), rng.normal(size=(1, *shape))
    got = infinite(arch, x1, x2, depth=2, sigma_w2=SW2, sigma_b2=SB2, activation=activation,
                   filter_size=k)
    nngp, ntk = literal_cnn(x1, x2, 2, SW2, SB2, activation, k, arch.split("-")[1])
    assert rel(got.nngp, nngp) < 1e-12 and rel(got.ntk, ntk) < 1e-12


def test_filter_size_one_is_a_pixelwise_fcn():
    """A 1×1 conv with a flatten readout: each pixel is an fcn of its C channels, averaged."""
    x = np.random.default_rng(6).normal(size=(3, 4, 2, 3))
    got = infinite("cnn-flatten", x, depth=3, sigma_w2=SW2, sigma_b2=SB2, activation="erf",
                   filter_size=1)
    per_pixel = [infinite("fcn", x[:, :, h, w], depth=3, sigma_w2=SW2, sigma_b2=SB2,
                          activation="erf") for h in range(2) for w in range(3)]
    for name in ("nngp", "ntk"):
        expected = torch.stack([getattr(r, name) for r in per_pixel]).mean(0)
        assert rel(getattr(got, name), expected) < 1e-13


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("arch, shape", [("fcn", (7,)), ("cnn-flatten", (2, 5, 4)),
                                         ("cnn-gap", (2, 5, 4)), ("cnn-gap", (3, 6))])
def test_symmetric_psd_and_batching_does_not_change_numbers(arch, shape):
    x = torch.randn(7, *shape, dtype=torch.float64)
    ref = infinite(arch, x, depth=3, sigma_w2=2.5, sigma_b2=0.1, activation="erf")
    for name in ("nngp", "ntk"):
        m = getattr(ref, name)
        assert torch.equal(m, m.T)
        eig = torch.linalg.eigvalsh(m)
        assert eig.min() > -1e-12 * eig.max()
    for batch_size, budget in ((1, None), (3, None), (None, 8 * 6 * 40 * 7)):
        got = infinite(arch, x, depth=3, sigma_w2=2.5, sigma_b2=0.1, activation="erf",
                       batch_size=batch_size, memory_budget=budget)
        assert got.batch_size == (batch_size or got.batch_size)
        assert rel(got.nngp, ref.nngp) < 1e-14 and rel(got.ntk, ref.ntk) < 1e-14
    # a rectangular call is the square kernel's block
    block = infinite(arch, x[:3], x[3:], depth=3, sigma_w2=2.5, sigma_b2=0.1, activation="erf",
                     batch_size=2)
    assert rel(block.ntk, ref.ntk[:3, 3:]) < 1e-14 and rel(block.nngp, ref.nngp[:3, 3:]) < 1e-14


def test_one_pass_over_depths_equals_each_depth_from_scratch():
    x = torch.randn(5, 1, 4, 4)
    got = infinite_by_depth("cnn-gap", x, depths=[3, 0, 1, 3], sigma_w2=1.3, sigma_b2=0.2)
    assert list(got) == [0, 1, 3]
    for d, k in got.items():
        alone = infinite("cnn-gap", x, depth=d, sigma_w2=1.3, sigma_b2=0.2)
        assert torch.equal(k.ntk, alone.ntk) and torch.equal(k.nngp, alone.nngp)


def test_numpy_and_tensor_inputs_agree_and_fcn_flattens():
    x = np.random.default_rng(7).normal(size=(4, 2, 3))
    a = infinite("fcn", x, depth=2, sigma_w2=SW2, sigma_b2=SB2)
    b = infinite("fcn", torch.from_numpy(x.reshape(4, 6)), depth=2, sigma_w2=SW2, sigma_b2=SB2)
    assert torch.equal(a.ntk, b.ntk)


def test_the_diagonal_stays_at_the_fixed_point_deep_in_the_chaotic_phase():
    """c = 1 is unstable for χ₁ > 1: an input's kernel with itself must not drift from q*."""
    x = torch.randn(4, 10, dtype=torch.float64)
    q = fixed_point_variance(2.5, 0.18, "erf")
    for arch, inputs in (("fcn", x), ("cnn-flatten", x.reshape(4, 1, 10))):
        deep = infinite(arch, inputs, torch.cat([inputs[:2], inputs]), depth=250, sigma_w2=2.5,
                        sigma_b2=0.18, activation="erf")
        nngp = deep.nngp[:, 2:]
        if arch == "fcn":  # K(x, x) = σ_w² E[φ²](q*) + σ_b² = q*
            assert torch.allclose(nngp.diagonal(), torch.full((4,), q, dtype=torch.float64),
                                  rtol=1e-12)
        assert torch.equal(deep.nngp[:, :2], nngp[:, :2])  # duplicates of x[0], x[1] alike
        assert torch.isfinite(deep.ntk).all() and (nngp.diagonal() > nngp[0, 1]).all()


# ----------------------------------------------------------------------------- wide networks


def _empirical_ntk(arch, x, width, depth, activation, seed):
    from genprobe.engine.grams import gram
    from genprobe.zoo import create_model

    torch.manual_seed(seed)
    common = dict(parameterization="ntk", sigma_w=math.sqrt(SW2), sigma_b=math.sqrt(SB2),
                  activation=activation, depth=depth)
    if arch == "fcn":
        model = create_model("fcn", x.shape[1:], 3, width=width, **common)
    else:
        model = create_model("cnn", x.shape[1:], 3, channels=width, readout=arch.split("-")[1],
                             downsample=0, kernel_size=3, **common)
    model = model.double()
    theta = gram(model, model.state_dict(), x, of="outputs", device="cpu").matrix  # (N, N, K, K)
    return theta.diagonal(dim1=2, dim2=3).mean(-1)  # mean over k of Θ[:, :, k, k]


@pytest.mark.parametrize("arch, widths, activation", [
    ("fcn", (16, 128, 1024), "erf"),
    ("cnn-flatten", (8, 64, 512), "relu"),
    ("cnn-gap", (8, 64, 512), "relu"),
])
def test_wide_zoo_networks_approach_the_infinite_ntk(arch, widths, activation):
    """The zoo's NTK-parameterized fcn / stride-1 cnn (flatten or gap readout) are the networks
    whose infinite-width limit the recursion computes: their empirical NTK (mean over the K
    outputs) approaches it as the width (channels) grows, error ~ 1/√width."""
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    exact = infinite(arch, x, depth=2, sigma_w2=SW2, sigma_b2=SB2, activation=activation).ntk
    errors = []
    for width in widths:  # three initializations per width: the error is a random quantity
        errs = [rel(_empirical_ntk(arch, x, width, 2, activation, seed), exact) for seed in range(3)]
        errors.append(float(np.mean(errs)))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.1 and errors[2] < errors[0] / 4, errors  # 64× wider: ~1/8 expected


# ----------------------------------------------------------------------------- order to chaos


def _gh_1d(f, q):
    z = math.sqrt(2 * q) * _GH_X
    return float((_GH_W * f(z)).sum() / math.sqrt(math.pi))


def test_order_to_chaos_against_quadrature():
    from scipy.special import erf

    def erf_d(t):
        return 2 / math.sqrt(math.pi) * np.exp(-t * t)

    for w in (0.8, 1.5, 2.2, 3.0):
        oc = order_to_chaos(w, 0.18, "erf")
        q = oc.q_star
        assert abs(w * _gh_1d(lambda z: erf(z) ** 2, q) + 0.18 - q) < 1e-12  # a fixed point
        assert abs(oc.chi1 - w * _gh_1d(lambda z: erf_d(z) ** 2, q)) < 1e-12
        assert oc.phase == ("ordered" if oc.chi1 < 1 else "chaotic")
        if oc.phase == "ordered":
            assert oc.c_star == 1.0 and oc.depth_scale == pytest.approx(-1 / math.log(oc.chi1))
            continue

        def c_map(c, w=w, q=q):
            return (w * erf_expectations(q, q, c * q)[0] + 0.18) / q

        c = oc.c_star
        assert 0 < c < 1 and abs(c_map(c) - c) < 1e-10
        h = 1e-5
        slope = (c_map(c + h) - c_map(c - h)) / (2 * h)
        assert abs(oc.chi_c_star - slope) < 1e-7 and oc.chi_c_star < 1 < oc.chi1
        assert oc.depth_scale == pytest.approx(-1 / (math.log(oc.chi_c_star) - math.log(oc.chi1)))


def test_critical_sigma_w2():
    crit = critical_sigma_w2(0.18, "erf")
    assert abs(crit - 1.76) < 0.015  # the paper's notebook: 1.76
    assert order_to_chaos(crit, 0.18, "erf").chi1 == pytest.approx(1.0, abs=1e-10)
    assert critical_sigma_w2(0.3, "relu") == 2.0
    assert order_to_chaos(1.0, 0.1, "relu").q_star == pytest.approx(0.2)  # σ_b²/(1 − σ_w²/2)
    assert math.isinf(order_to_chaos(2.5, 0.1, "relu").q_star)


# ----------------------------------------------------------------------------- phase diagram


def _toy_data(n=60, d=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    x = centres[y] + torch.randn(n, d, generator=g)
    return x[: n // 2], y[: n // 2], x[n // 2:], y[n // 2:]


def test_ntk_phase_against_a_literal_cell_and_round_trip(tmp_path):
    data = _toy_data()
    r = ntk_phase(sigma_w2=[0.8, 2.5], depths=[1, 3, 6], data=data, n_train=21, n_test=30,
                  device="cpu")
    assert isinstance(r, gp.NTKPhaseResult) and len(r.table) == 6
    assert {"sigma_w2", "depth", "condition_number", "lambda_max", "lambda_min", "test_accuracy",
            "chi1"} <= set(r.table.columns)
    assert r.self_check["passed"]
    assert r.summary["chance"] == pytest.approx(1 / 3)
    # one cell by hand: the same class-balanced subsets, numpy's eigh and solve
    from genprobe.options import sample
    from genprobe.values import Data

    train = Data(data[0], data[1]).subset(sample(Data(data[0], data[1]), num_classes=3, n=21,
                                                 seed=0, split="train"))
    test = Data(data[2], data[3]).subset(sample(Data(data[2], data[3]), num_classes=3, n=30,
                                                seed=0, split="test"))
    theta = infinite("fcn", torch.cat([train.x, test.x]), train.x, depth=3, sigma_w2=2.5,
                     sigma_b2=0.18, activation="erf").ntk.numpy()
    tr = theta[:21]
    eig = np.linalg.eigvalsh((tr + tr.T) / 2)
    y = np.eye(3)[train.y.numpy()] - 1 / 3
    mu = theta[21:] @ np.linalg.solve(tr + 1e-4 * np.trace(tr) / 21 * np.eye(21), y)
    row = r.table[(r.table["sigma_w2"] == 2.5) & (r.table["depth"] == 3)].iloc[0]
    assert row["condition_number"] == pytest.approx(eig[-1] / eig[0], rel=1e-8)
    assert row["test_accuracy"] == np.mean(mu.argmax(1) == test.y.numpy())
    assert row["chi1"] == pytest.approx(order_to_chaos(2.5, 0.18).chi1)
    assert set(r.phases["phase"]) == {"ordered", "chaotic"}
    assert "σw²=2.5" in r.brief().columns and r.reading()
    fig = r.plot()
    assert len(fig.axes) >= 2
    r.save(tmp_path / "phase", figure=True)
    back = gp.load(tmp_path / "phase")
    assert type(back) is gp.NTKPhaseResult
    assert back.table.equals(r.table) and back.phases.equals(r.phases)
    assert back.depth_scales.equals(r.depth_scales) and len(r.depth_scales) == 200
    assert back.summary == r.summary and back.meta == r.meta
    assert (tmp_path / "phase" / "figure.png").is_file()


def test_ntk_phase_cnn_reads_vectors_as_1d_signals():
    x_tr, y_tr, x_te, y_te = _toy_data(d=6)
    r = ntk_phase(arch="cnn-gap", sigma_w2=[1.0], depths=[2], data=(x_tr, y_tr, x_te, y_te),
                  n_train=12, n_test=9, device="cpu")
    direct = infinite("cnn-gap", x_tr[:1].unsqueeze(1), depth=2, sigma_w2=1.0, sigma_b2=0.18,
                      activation="erf")
    assert r.meta["data"]["input_shape"] == [1, 6] and direct.ntk.shape == (1, 1)


def test_cli_ntk_phase(tmp_path, capsys):
    from genprobe.cli import main

    out = tmp_path / "phase"
    try:
        main(["ntk-phase", "--dataset", "digits", "--sigma-w2", "1,2.5", "--depths", "1,4",
              "--n-train", "30", "--n-test", "40", "--device", "cpu", "--out", str(out)])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "critical_sigma_w2=1.748" in printed.out and (out / "figure.png").is_file()
    assert len(gp.load(out).table) == 4
    try:
        main(["ntk-phase", "--sigma-w2", "1,x", "--out", str(tmp_path / "bad")])
        code = 0
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--sigma-w2" in err
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- bad inputs


X = np.zeros((2, 1, 4, 4))


@pytest.mark.parametrize("call, error, message", [
    (lambda: infinite("resnet", X, depth=1, sigma_w2=1, sigma_b2=0), ConfigError,
     "'fcn', 'cnn-flatten', 'cnn-gap'"),
    (lambda: infinite("fcn", X, depth=1, sigma_w2=1, sigma_b2=0, activation="tanh"), ConfigError,
     "'relu', 'erf'"),
    (lambda: infinite("fcn", X, depth=-1, sigma_w2=1, sigma_b2=0), ConfigError, "depth must be"),
    (lambda: infinite("fcn", X, depth=1.5, sigma_w2=1, sigma_b2=0), ConfigError, "depth must be"),
    (lambda: infinite("fcn", X, depth=1, sigma_w2=0, sigma_b2=0), ConfigError, "sigma_w2 must be"),
    (lambda: infinite("fcn", X, depth=1, sigma_w2=1, sigma_b2=-0.1), ConfigError, "sigma_b2 must"),
    (lambda: infinite("fcn", X, depth=1, sigma_w2=math.nan, sigma_b2=0), ConfigError, "sigma_w2"),
    (lambda: infinite("cnn-gap", X[:, 0, 0], depth=1, sigma_w2=1, sigma_b2=0), DataError,
     "(N, C, L) (1-D) or (N, C, H, W)"),
    (lambda: infinite("cnn-flatten", np.zeros((2, 1, 2, 2, 2)), depth=1, sigma_w2=1, sigma_b2=0),
     DataError, "(N, C, H, W)"),
    (lambda: infinite("fcn", np.zeros(3), depth=1, sigma_w2=1, sigma_b2=0), DataError, "(N, D)"),
    (lambda: infinite("fcn", np.zeros((0, 5)), depth=1, sigma_w2=1, sigma_b2=0), DataError,
     "x1 has shape (0, 5): no examples"),
    (lambda: infinite("cnn-gap", np.zeros((0, 1, 4, 4)), depth=1, sigma_w2=1, sigma_b2=0),
     DataError, "no examples"),
    (lambda: infinite("fcn", X, X[:, :, :2], depth=1, sigma_w2=1, sigma_b2=0), DataError,
     "same shape"),
    (lambda: infinite("fcn", np.full((2, 3), np.nan), depth=1, sigma_w2=1, sigma_b2=0), DataError,
     "NaN"),
    (lambda: infinite("fcn", "abc", depth=1, sigma_w2=1, sigma_b2=0), DataError, "numeric array"),
    (lambda: infinite("fcn", np.ones((2, 2), dtype=complex), depth=1, sigma_w2=1, sigma_b2=0),
     DataError, "real numbers"),
    (lambda: infinite("cnn-gap", X, depth=1, sigma_w2=1, sigma_b2=0, filter_size=0), ConfigError,
     "filter_size"),
    (lambda: infinite("cnn-gap", X, depth=1, sigma_w2=1, sigma_b2=0, batch_size=0), ConfigError,
     "batch_size"),
    (lambda: infinite_by_depth("fcn", X, depths=[], sigma_w2=1, sigma_b2=0), ConfigError,
     "depths is empty"),
    (lambda: ntk_phase(sigma_w2=[], depths=[1]), ConfigError, "sigma_w2 is empty"),
    (lambda: ntk_phase(sigma_w2=[1], depths=[1], data="nope"), DataError, "unknown dataset"),
    (lambda: ntk_phase(sigma_w2=[1], depths=[1], ridge=-1), ConfigError, "ridge"),
    (lambda: ntk_phase(sigma_w2=[1], depths=[1], n_train=10**6), DataError, "larger than"),
    (lambda: ntk_phase(sigma_w2=[1], depths=[1], data=(X, X, X, X)), DataError, "class indices"),
    (lambda: ntk_phase(arch="cnn", sigma_w2=[1], depths=[1]), ConfigError, "'cnn-flatten'"),
])
def test_bad_inputs_raise_one_line(call, error, message):
    with pytest.raises(error) as info:
        call()
    text = str(info.value)
    assert message in text and "\n" not in text, text


@pytest.mark.parametrize("activation, sigma_w2", [("relu", 2.5), ("erf", 6.0)])
def test_the_overflow_depth_is_where_the_kernel_leaves_float64(activation, sigma_w2):
    """For an fcn the diagonal recursion of the largest input is exact: one layer short of the
    refused depth the kernel is finite and its largest entry within one layer's growth of 1e300."""
    from genprobe.kernels.infinite import OVERFLOW, overflow_depth

    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    at = overflow_depth(x, sigma_w2, 0.18, activation, 100_000)
    assert at is not None and at > 10
    last = infinite("fcn", x, depth=at - 1, sigma_w2=sigma_w2, sigma_b2=0.18, activation=activation)
    top = float(last.ntk.diagonal().max())
    assert math.isfinite(top) and OVERFLOW / (2 * sigma_w2) < top <= OVERFLOW
    with pytest.raises(ConfigError, match=f"overflows float64 from depth {at} on"):
        infinite("fcn", x, depth=at, sigma_w2=sigma_w2, sigma_b2=0.18, activation=activation)
    assert overflow_depth(x, 1.0, 0.18, "erf", 100_000) is None  # ordered phase: bounded


def test_ntk_phase_refuses_an_overflowing_depth_before_any_work():
    with pytest.raises(ConfigError, match="overflows float64 already at depth 0"):
        gp.ntk_phase(sigma_w2=[1e308], depths=[1], n_train=10, n_test=10)
    with pytest.raises(ConfigError, match=r"depth 100000: .* use depths below"):
        gp.ntk_phase(sigma_w2=[1.0, 2.0], depths=[1, 100_000], n_train=10, n_test=10)
