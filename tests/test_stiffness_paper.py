"""Fort, Nowak, Jastrzebski & Narayanan (2019) stiffness findings on built-in data (slow).

Setting, fixed before looking at any stiffness number and not tuned afterwards: a 2-hidden-layer
ReLU FCN (width 256) trained on 5,000 MNIST images for 5 epochs with the default training
settings (SGD, momentum 0.9, cosine schedule) at learning rates 0.01, 0.05 (the default) and 0.2;
stiffness of a class-balanced sample of 20 training images per class (N = 200), cosine input
distance, 20 bins. Runs are trained once and cached (tests/runs.py). Each test < 3 min on 2 cores.

Where a finding does not hold on this setting the test is a strict xfail whose reason gives the
numbers measured (also in benchmarks/RESULTS.md, "stiffness").
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy.stats import spearmanr

import genprobe as gp
from runs import trained_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
log = logging.getLogger(__name__)

LRS = (0.01, 0.05, 0.2)
DEFAULT_LR = 0.05
RUN = dict(dataset="mnist", epochs=5, n_train=5000, n_test=1000, arch_options={"width": 256, "depth": 2})


def _stiffness(lr: float, checkpoints=None) -> gp.StiffnessResult:
    subject = gp.Subject.load(trained_run("fcn", lr=lr, **RUN))
    r = gp.stiffness(subject, per_class=20, checkpoints=checkpoints, seed=0)
    log.warning("stiffness lr=%s: %s\n%s", lr, {k: round(v, 4) for k, v in r.summary.items()},
                r.over_training.round(4).to_string())
    return r



@pytest.fixture(scope="module")
def trained():
    """The default-lr run with every checkpoint."""
    return _stiffness(DEFAULT_LR, checkpoints="all")


@pytest.fixture(scope="module")
def by_lr(trained):
    return {lr: trained if lr == DEFAULT_LR else _stiffness(lr) for lr in LRS}


def test_within_class_exceeds_between_class(trained):
    # measured: within 0.37, between -0.019 (lr 0.05); at lr 0.01 / 0.2: 0.52 / 0.30 vs
    # -0.040 / -0.012 (checked in the learning-rate test)
    assert trained.summary["within_class"] > trained.summary["between_class"] + 0.1
    assert trained.summary["within_class"] > 0 and trained.summary["within_class_sign"] > 0.5


def test_between_class_ends_near_zero(trained):
    # measured: -0.019 at the end of training (within-class 0.37)
    assert abs(trained.summary["between_class"]) < 0.05


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "does not hold here: between-class cosine stiffness is already negative at initialization "
    "(-0.032: near-uniform predictions make (p - e_a)·(p - e_b) < 0 for a ≠ b) and moves toward "
    "zero during training (-0.017, -0.019, -0.018, -0.019, -0.019 after epochs 1-5, lr 0.05); "
    "between-class sign stiffness likewise rises from -0.91 to -0.014"))
def test_between_class_falls_during_training(trained):
    states = trained.over_training.set_index("checkpoint")
    assert states.loc["final", "between_class"] < states.loc["0", "between_class"]


def test_stiffness_decreases_with_input_distance(trained):
    # measured (lr 0.05): mean cosine stiffness 0.83 in the nearest bin, ~0.00 beyond distance 0.55
    for r in [trained]:
        curve = r.distance_curve[(r.distance_curve["checkpoint"] == "final")
                                 & (r.distance_curve["pairs"] >= 20)]
        mid = 0.5 * (curve["bin_low"] + curve["bin_high"])
        rho = spearmanr(mid, curve["cosine"]).statistic
        assert rho < -0.5
        near, far = curve["cosine"].iloc[:3].mean(), curve["cosine"].iloc[-3:].mean()
        assert near > far + 0.3


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "does not hold here (it is the finding of the paper's first arXiv version): critical length "
    "0.571 / 0.979 / 0.915 (cosine distance) at lr 0.01 / 0.05 / 0.2; the cosine curve reaches "
    "~0 near distance 0.5 and its later zero crossings are within ±0.01 of noise"))
def test_larger_learning_rate_smaller_critical_length(by_lr):
    for r in by_lr.values():  # the class structure holds at every learning rate
        assert r.summary["within_class"] > r.summary["between_class"] + 0.1
    xi = [by_lr[lr].summary["critical_length"] for lr in LRS]
    assert np.all(np.isfinite(xi))
    assert xi[2] < xi[0]
