"""Morcos, Barrett, Rabinowitz & Botvinick (2018) findings on built-in data (slow: trains small
runs once, cached; see tests/runs.py).

Settings were fixed before measuring, with one change: the first settings (60 epochs, weight decay
5e-4) left the corrupted-label networks unable to fit their labels (train error 0.15-0.51), which
the paper's setting requires, so training was made longer and without weight decay (every network
now fits its labels exactly). No setting was tuned to make a finding hold.
Where a finding does not hold on our data the test is a strict xfail whose reason gives the
numbers we measured. Ablation curves of the label-corruption family are measured on each
network's own training set (the labels it was trained on), where every network fits its labels,
so that the curves compare reliance on single directions rather than accuracy.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy.stats import kendalltau

import genprobe as gp
from runs import trained_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("paper_threads")]
log = logging.getLogger(__name__)

FCN = dict(dataset="digits", epochs=150, n_train=500, weight_decay=0.0, checkpoints="0,150",
           arch_options={"width": 256, "depth": 2})
"""Long enough, without weight decay, for every network to fit its own labels (p = 1 included),
as the paper's networks do."""
CORRUPTION = (0.0, 0.2, 0.5, 1.0)
ABLATE = dict(split="train", orders=5, steps=16)


@pytest.fixture(scope="module")
def family():
    """{p: (subject, ablation on the training set, generalization gap)} for the fcn family."""
    out = {}
    for p in CORRUPTION:
        subject = gp.Subject.load(trained_run("fcn", label_noise=p, **FCN))
        train = gp.evaluate(subject.model, subject.final, subject.train)
        test = gp.evaluate(subject.model, subject.final, subject.test)
        r = gp.ablation(subject, **ABLATE)
        out[p] = (subject, r, test.error - train.error, train.error)
        log.warning("p=%.1f train error %.4f test error %.4f, ablation AUC (train) %s", p,
                    train.error, test.error, {k: round(v, 4) for k, v in r.summary.items()})
    return out


def test_label_corruption_lowers_ablation_auc(family):
    aucs = [family[p][1].summary["auc_all"] for p in CORRUPTION]
    fitted = [family[p][3] for p in CORRUPTION]
    log.warning("auc by p %s (train error %s)", aucs, fitted)
    assert max(fitted) < 0.01  # every network fits its own labels
    assert all(a > b for a, b in zip(aucs, aucs[1:], strict=False))


def test_better_generalizing_networks_rely_less_on_single_directions(family):
    gaps = [family[p][2] for p in CORRUPTION]
    aucs = [family[p][1].summary["auc_all"] for p in CORRUPTION]
    tau = kendalltau(gaps, aucs).statistic
    log.warning("gap %s vs auc %s: Kendall tau %.3f", np.round(gaps, 4), np.round(aucs, 4), tau)
    assert tau < -0.5


def test_mean_ablation_hurts_more_than_zero_ablation(family):
    subject = family[0.0][0]
    zero = family[0.0][1].summary["auc_all"]
    mean = gp.ablation(subject, mode="mean", **ABLATE).summary["auc_all"]
    log.warning("clean fcn: AUC zero-ablation %.4f, mean-ablation %.4f", zero, mean)
    assert mean < zero


def test_selectivity_is_a_weak_predictor_of_importance(family):
    r = gp.selectivity(family[0.0][0], split="test")
    rho = r.summary["selectivity_importance_spearman"]
    log.warning("clean fcn: mean selectivity %.4f, Spearman(selectivity, importance) %.3f",
                r.summary["mean_selectivity"], rho)
    assert abs(rho) < 0.5


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="does not hold on our data: the fcn (2 x 256, digits, 150 "
                   "epochs) has mean selectivity 0.4555 without BatchNorm and 0.6454 with it "
                   "(the paper: BatchNorm lowers selectivity, on CIFAR-10 CNNs)")
def test_batchnorm_lowers_selectivity():
    options = dict(FCN, arch_options={"width": 256, "depth": 2, "batchnorm": True})
    plain = gp.selectivity(gp.Subject.load(trained_run("fcn", **FCN)), importance=False)
    bn = gp.selectivity(gp.Subject.load(trained_run("fcn", **options)), importance=False)
    log.warning("mean selectivity without BN %.4f, with BN %.4f", plain.summary["mean_selectivity"],
                bn.summary["mean_selectivity"])
    assert bn.summary["mean_selectivity"] < plain.summary["mean_selectivity"]
