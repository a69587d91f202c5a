"""Xiao, Pennington & Schoenholz 2020 on built-in data: the NTK phase diagram's findings.

The authors' notebook setting (``Disentangling_Trainability_and_Generalization.ipynb``): an erf
FCN, σ_b² = 0.18, 40 values of σ_w² in [0.5, 3], depths 0–9 then 10–105 in steps of 5, 256
training images, mean-centred one-hot labels, relative ridge 1e-4 — here on the built-in digits
(8×8; 256 class-balanced training images, the whole 360-image test split) instead of CIFAR-10.
The CNN comparisons use fewer images (their kernels cost 64× and 4096× more per pair).
Findings that do not hold on this data are strict xfails stating the measured numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from genprobe.kernels import ntk_phase

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

NOTEBOOK_SIGMA_W2 = np.linspace(0.5, 3.0, 40).tolist()
NOTEBOOK_DEPTHS = list(range(10)) + [10 + 5 * i for i in range(20)]
DEEPEST = NOTEBOOK_DEPTHS[-1]


@pytest.fixture(scope="module")
def fcn():
    return ntk_phase(arch="fcn", sigma_w2=NOTEBOOK_SIGMA_W2, depths=NOTEBOOK_DEPTHS, sigma_b2=0.18,
                     activation="erf", data="digits", n_train=256, n_test=None, device="cpu")


def _at(result, depth):
    t = result.table
    return t[t["depth"] == depth].set_index("sigma_w2")


def _region(result, phase):
    p = result.phases
    return p[p["phase"] == phase].set_index("sigma_w2")


def test_fcn_accuracy_falls_to_chance_beyond_a_depth_set_by_sigma_w2(fcn):
    crit, chance = fcn.summary["critical_sigma_w2"], fcn.summary["chance"]
    assert fcn.self_check["passed"]
    assert (_at(fcn, 1)["test_accuracy"] > 0.9).all()  # every σ_w² generalizes when shallow
    deep = _at(fcn, DEEPEST)["test_accuracy"]
    far = [w for w in deep.index if w < crit - 0.85 or w > crit + 0.35]
    near = [w for w in deep.index if abs(w - crit) < 0.15]
    assert far and (deep[far] <= 2 * chance).all(), deep[far]  # measured 0.100–0.133
    assert near and (deep[near] > 0.9).all(), deep[near]  # measured 0.928–0.944
    for phase in ("ordered", "chaotic"):  # the fall tracks the depth scale ξ₁ / ξ*
        p = _region(fcn, phase)
        fell = p[p["generalizing_depth"] < DEEPEST]
        assert len(fell) >= 5
        rho = spearmanr(fell["generalizing_depth"], fell["depth_scale"]).statistic
        assert rho > 0.9, (phase, rho)


def test_fcn_loses_the_data_faster_in_the_chaotic_phase(fcn):
    crit = fcn.summary["critical_sigma_w2"]
    phases = fcn.phases.set_index("sigma_w2")
    depth = phases["generalizing_depth"]
    # in units of each phase's depth scale: measured ~34–38 ξ₁ (ordered), ~15–19 ξ* (chaotic)
    units = depth / phases["depth_scale"]
    fell = depth < DEEPEST
    ordered = units[fell & (phases["phase"] == "ordered")]
    chaotic = units[fell & (phases["phase"] == "chaotic")]
    assert chaotic.max() < ordered.min(), (chaotic.describe(), ordered.describe())
    # and in layers, at the same distance from the critical line
    grid = np.array(NOTEBOOK_SIGMA_W2)
    for delta in (0.4, 0.6, 0.8, 1.0):
        below = grid[np.argmin(np.abs(grid - (crit - delta)))]
        above = grid[np.argmin(np.abs(grid - (crit + delta)))]
        assert depth[above] < depth[below], (delta, depth[below], depth[above])


def test_fcn_condition_number_grows_when_ordered_and_tends_to_one_when_chaotic(fcn):
    kappa = fcn.grid("condition_number")
    later = kappa.loc[10:]
    for w, row in fcn.phases.set_index("sigma_w2").iterrows():
        k = later[w].to_numpy()
        if row["phase"] == "ordered" and row["depth_scale"] <= 15:
            assert (k[1:] >= (1 - 1e-9) * k[:-1]).all(), (w, k)  # κ = inf once λ_min <= 0
            assert k[-1] >= 100 * k[0], (w, k[0], k[-1])
        elif row["phase"] == "chaotic" and row["depth_scale"] <= 10:
            assert (k[1:] <= (1 + 1e-9) * k[:-1]).all(), (w, k)
            assert k[-1] < 1.5, (w, k[-1])
            if w > 2.05:
                assert k[-1] < 1.1, (w, k[-1])  # measured 1.037–1.087 at depth 105


# ----------------------------------------------------------------------------- CNNs

CNN_DEPTHS = [1, 10, 20, 30, 40, 50, 60, 70, 80, 100]


@pytest.fixture(scope="module")
def fcn_and_flatten():
    options = dict(sigma_w2=[0.75, 3.0], depths=CNN_DEPTHS, sigma_b2=0.18, activation="erf",
                   data="digits", n_train=100, n_test=200, device="cpu")
    return ntk_phase(arch="fcn", **options), ntk_phase(arch="cnn-flatten", **options)


def test_cnn_without_pooling_behaves_like_the_fcn(fcn_and_flatten):
    dense, flat = fcn_and_flatten
    chance = dense.summary["chance"]
    for w in (0.75, 3.0):  # one ordered, one chaotic σ_w², far from the critical line
        depth_fcn = dense.phases.set_index("sigma_w2").loc[w, "generalizing_depth"]
        depth_cnn = flat.phases.set_index("sigma_w2").loc[w, "generalizing_depth"]
        assert depth_cnn / depth_fcn == pytest.approx(1.0, abs=0.5), (w, depth_fcn, depth_cnn)
        for r in (dense, flat):
            assert _at(r, 100).loc[w, "test_accuracy"] <= 2 * chance
            assert _at(r, 1).loc[w, "test_accuracy"] > 0.85
    for r in (dense, flat):  # κ: blows up (ordered), tends to 1 (chaotic)
        assert _at(r, 100).loc[0.75, "condition_number"] > 1e12
        assert _at(r, 100).loc[3.0, "condition_number"] < 1.2


@pytest.fixture(scope="module")
def with_pooling():
    options = dict(sigma_w2=[2.5], depths=[1, 16, 32, 48], sigma_b2=0.18, activation="erf",
                   data="digits", n_train=40, n_test=100, device="cpu")
    return {arch: ntk_phase(arch=arch, **options) for arch in ("fcn", "cnn-flatten", "cnn-gap")}


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured on digits 8×8 (40 training, 100 test images, erf, σ_w² = 2.5, σ_b² = 0.18, chaotic): "
    "mean-prediction test accuracy at depths 1/16/32/48 — cnn-gap 0.84/0.88/0.83/0.41, "
    "cnn-flatten 0.80/0.84/0.84/0.82, fcn 0.80/0.85/0.85/0.68 (at depth 64: 0.11, 0.63, 0.22): "
    "GAP is a few points better when shallow but loses the data first at depth; on 4×4 pooled "
    "digits cnn-gap and cnn-flatten were within 0.02 of each other up to depth 200"))
def test_cnn_with_global_average_pooling_keeps_markedly_higher_accuracy_at_depth(with_pooling):
    deep = {arch: _at(r, 48).loc[2.5, "test_accuracy"] for arch, r in with_pooling.items()}
    assert deep["cnn-gap"] >= max(deep["fcn"], deep["cnn-flatten"]) + 0.1, deep
