"""Zhang, Bengio & Singer (2019) findings on built-in data (slow: trains small runs once, cached).

Settings are fixed a priori to fit the time budget (each test < 3 min on 2 CPU cores, training
included) and were not tuned to make a finding hold. Where a finding does not hold on our data the
test is a strict xfail whose reason gives the numbers we measured (see the closing note of issue 3
and benchmarks/RESULTS.md for the full tables).
"""

from __future__ import annotations

import logging

import pytest

import genprobe as gp
from runs import trained_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("paper_threads")]
log = logging.getLogger(__name__)

FCN = dict(dataset="mnist", epochs=5, n_train=10000, n_test=2000,
           arch_options={"width": 256, "depth": 3})            # 3 hidden layers, as in the paper
VGG = dict(dataset="mnist", epochs=4, n_train=5000, n_test=2000,
           arch_options={"config": "16,M,32,M,64,64,M", "hidden": 128})
RESNET = dict(dataset="digits", epochs=8, arch_options={"depth": 14, "width": 16})
BLOCKS = {f"stage{i}.block{j}": f"stages.{i}.{j}" for i in range(3) for j in range(2)}


def _probe(arch, options, modules=None):
    subject = gp.Subject.load(trained_run(arch, **options))
    r = gp.robustness(subject, modules=modules, draws=2)
    log.warning("%s robustness map (test error):\n%s\n%s\n%s", arch, r.map.round(4).to_string(),
                r.modules.round(4).to_string(), r.summary)
    return r


@pytest.fixture(scope="module")
def fcn():
    return _probe("fcn", FCN)


@pytest.fixture(scope="module")
def vgg():
    return _probe("vgg", VGG)


@pytest.fixture(scope="module")
def resnet():
    return _probe("resnet", RESNET, {"stem": "stem", **BLOCKS, "head": "head"})


def _delta(r, target="0"):
    t = r.table[r.table["target"] == target]
    return t.groupby("module", sort=False)["delta_error"].mean()


def test_fcn_first_layer_critical(fcn):
    d = _delta(fcn)
    assert fcn.summary["base_error"] < 0.06
    assert not fcn.modules["robust"].iloc[0]
    assert d.iloc[0] > 0.10                         # measured: +24 pp
    assert (d.iloc[0] > 5 * d.iloc[1:]).all()       # far more than any later layer


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="on mnist-10k/5 epochs re-initializing hidden layers 2-3 "
                   "and the readout to θ⁰ costs +1.6 to +1.9 pp test error: above the paper's "
                   "1 pp robustness threshold (though 13x less than the first layer's +24 pp)")
def test_fcn_later_layers_robust(fcn):
    assert fcn.modules["robust"].iloc[1:].all()


def test_fcn_rerandomization_hurts_most_layers(fcn):
    rr = _delta(fcn, "rerandomize")
    assert (rr > 0.3).mean() >= 0.75                # measured: +82 to +88 pp on every layer
    assert (rr > _delta(fcn)).all()


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="on mnist-5k/4 epochs the VGG's first conv is robust "
                   "(re-init to θ⁰: -0.15 pp) and the upper convs and classifier are critical "
                   "(+3 to +42 pp): the reverse of the paper's CIFAR-10 finding")
def test_vgg_lower_layers_critical(vgg):
    d = _delta(vgg)
    assert not vgg.modules["robust"].iloc[0]
    assert d.iloc[:2].mean() > d.iloc[2:].mean()


def test_vgg_rerandomization_hurts_more_than_reinit(vgg):
    assert vgg.summary["base_error"] < 0.1
    assert (_delta(vgg, "rerandomize") > _delta(vgg)).all()
    assert vgg.summary["mean_delta_error_rerandomize"] > 2 * vgg.summary["mean_delta_error_reinit"]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="on digits (360 test images, 1 image = 0.28 pp) a "
                   "ResNet-14 has 2 of 6 blocks robust at 1 pp: the second blocks of stages 0 "
                   "and 1 (-0.3, +0.8 pp); the first block of each stage costs +3.1, +7.2, "
                   "+4.7 pp and stage 2's second block +3.3 pp")
def test_resnet_most_blocks_robust(resnet):
    blocks = resnet.modules[resnet.modules["module"].isin(list(BLOCKS))]
    assert blocks["robust"].mean() > 0.5


def test_resnet_later_blocks_of_a_stage_more_robust_than_stage_transitions(resnet):
    d = _delta(resnet)
    first = d[[f"stage{i}.block0" for i in (1, 2)]]    # resolution changes here
    second = d[[f"stage{i}.block1" for i in range(3)]]
    assert resnet.summary["base_error"] < 0.05
    assert second.mean() < first.mean()
    assert d["stem"] > d[list(BLOCKS)].max()


def test_resnet_rerandomization_hurts_more_than_reinit(resnet):
    assert resnet.summary["mean_delta_error_rerandomize"] > 3 * resnet.summary["mean_delta_error_reinit"]
