"""Chatterji et al.'s findings with module criticality, on the built-in digits (slow).

Each test trains (or reuses, see tests/runs.py) small models and probes them with a reduced
search (a 500-example seeded subset of the training set, 6 α values, 4 noise draws, one α
refinement round, valley="search") to stay within a few minutes on 2 CPU cores. Numbers are logged (run with
``-s -o log_cli=true --log-cli-level=INFO`` to see them).
"""

import functools
import logging

import numpy as np
import pytest

import genprobe as gp
from runs import trained_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("paper_threads")]
log = logging.getLogger(__name__)

FAST = dict(n=500, samples=4, alphas=np.linspace(0, 1, 6), refine=1, valley="search",
            seed=0)


def _probe(path, **options):
    subject = gp.Subject.load(path)
    return subject, gp.criticality(subject, **(FAST | options))


def _gap(subject):
    train = gp.evaluate(subject.model, subject.final, subject.train)
    test = gp.evaluate(subject.model, subject.final, subject.test)
    return train.error, test.error, test.error - train.error


def test_robust_modules_are_less_critical():
    """Modules robust to re-initialization (gp.robustness) have lower μ_i than critical ones."""
    path = trained_run("fcn", "digits", epochs=20, arch_options={"width": 256, "depth": 3})
    subject, crit = _probe(path)
    rob = gp.robustness(subject, rerandomize=False)
    table = crit.modules.merge(rob.modules[["module", "robust", "delta_error"]], on="module")
    log.info("fcn digits: criticality vs robustness\n%s", table.to_string())
    robust = table.loc[table.robust, "criticality"]
    critical = table.loc[~table.robust, "criticality"]
    assert len(robust) and len(critical)
    assert robust.mean() < critical.mean()
    assert robust.max() < critical.max()


@functools.cache
def _corruption_family():
    """(p, train error, test error, gap, network μ, bound) for the same FCN at p = 0, 0.2, 0.5."""
    rows = []
    for p in (0.0, 0.2, 0.5):
        # no weight decay and 60 epochs: the net fits most corrupted labels (train error ≤ 0.1)
        path = trained_run("fcn", "digits", epochs=60, n_train=600, label_noise=p,
                           weight_decay=0.0, arch_options={"width": 512, "depth": 2})
        subject, crit = _probe(path)
        train_err, test_err, gap = _gap(subject)
        rows.append((p, train_err, test_err, gap, crit.summary["network_criticality"],
                     crit.summary["bound"]))
    log.info("label corruption: (p, train err, test err, gap, network μ, bound)\n%s",
             "\n".join(" ".join(f"{v:.4g}" for v in r) for r in rows))
    return rows


def test_network_criticality_rises_with_label_corruption():
    """Same FCN, labels corrupted with p ∈ {0, 0.2, 0.5}: the generalization gap (test error −
    error on the corrupted training labels) rises with p, and so does network criticality from
    clean to corrupted labels. Measured with two seed derivations (training order and noise
    draws; the second is genprobe.seeds'): μ = 1.6e3 / 1.5e6 / 1.4e6 and 6.3e2 / 1.5e5 / 1.8e6 at
    p = 0 / 0.2 / 0.5. The rise from clean labels holds in both (over 200×); the order between
    0.2 and 0.5 does not (the p = 0.2 network moved 10×), so it is not asserted: one seed cannot
    settle it."""
    rows = _corruption_family()
    gaps = [r[3] for r in rows]
    mus = [r[4] for r in rows]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]
    assert min(mus[1:]) > 10 * mus[0]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="measured network criticality: ResNet 289 < FCN 3,983 < "
                   "VGG 54,082 (the paper has ResNet < VGG < FCN); 300-example subset, 4 draws")
def test_architecture_ordering_is_reported():
    """fcn, vgg and resnet on the same data: network criticality is ordered as in the paper
    (ResNets below VGG below FCNs); every module's criticality is finite."""
    found = {}
    for arch, options in [("fcn", {"width": 256, "depth": 3}), ("vgg", {}), ("resnet", {})]:
        path = trained_run(arch, "digits", epochs=15, n_train=600, arch_options=options)
        subject, crit = _probe(path, n=300)
        train_err, test_err, gap = _gap(subject)
        found[arch] = (crit.summary["network_criticality"], crit.summary["bound"], gap,
                       len(crit.modules))
        assert np.isfinite(crit.modules["criticality"]).all()
    order = sorted(found, key=lambda a: found[a][0])
    log.info("architectures (network μ, bound, gap, modules): %s; ascending μ: %s", found,
             " < ".join(order))
    assert order == ["resnet", "vgg", "fcn"]
