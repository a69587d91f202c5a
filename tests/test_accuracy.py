"""Accuracy of the zoo with the default training settings on real built-in data (slow).

Targets from the foundation issue: an fcn with 3 hidden layers under 3% test error on MNIST,
a cnn under 12% on Fashion-MNIST, a resnet under 5% on the digits. README states the times.
"""

import pytest

from genprobe.zoo.train import read_metrics
from runs import trained_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("paper_threads")]


@pytest.mark.parametrize("arch, dataset, target", [
    ("resnet", "digits", 0.05),
    ("fcn", "mnist", 0.03),
    ("cnn", "fashion-mnist", 0.12),
])
def test_default_training_reaches_target(arch, dataset, target):
    final = read_metrics(trained_run(arch, dataset)).iloc[-1]
    assert final.test_error < target, f"{arch} on {dataset}: test error {final.test_error:.4f}"
