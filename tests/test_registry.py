"""One registry shape for architectures, datasets and probes (genprobe.registry)."""

import pytest

from genprobe.data.core import DATASETS
from genprobe.errors import ConfigError, DataError
from genprobe.probes.registry import _PROBES
from genprobe.registry import Registry
from genprobe.zoo.models import MODELS


def test_register_once_list_with_patterns_get_with_a_suggestion():
    reg = Registry("widget")
    reg.register("alpha", 1)
    reg.register("beta", 2)
    reg.register("alphabet", 3)
    with pytest.raises(TypeError, match="widget 'alpha' is registered twice"):
        reg.register("alpha", 4)
    assert reg.names() == ["alpha", "beta", "alphabet"] and reg.names("alpha*") == ["alpha", "alphabet"]
    assert reg.entry("beta") == 2
    with pytest.raises(ConfigError, match=r"unknown widget='betta'; did you mean 'beta'\? choose one "
                                          r"of 'alpha', 'beta', 'alphabet'"):
        reg.entry("betta")


def test_the_three_registries_share_the_shape():
    for reg, error, wrong, right in ((MODELS, ConfigError, "fnc", "fcn"),
                                     (DATASETS, DataError, "mnsit", "mnist"),
                                     (_PROBES, ConfigError, "robustnes", "robustness")):
        assert isinstance(reg, Registry) and right in reg.names()
        with pytest.raises(error, match=f"did you mean '{right}'"):
            reg.entry(wrong)
