"""genprobe: which parts of a trained PyTorch network matter, and what that says about generalization.

Every registered probe (:mod:`genprobe.probes.registry`) is exported here under its name, with its
result class: ``gp.robustness``, ``gp.RobustnessResult``, ... (``gp.list_probes()`` names them).

``import genprobe`` loads nothing but the error types: every other name is imported on first use
(PEP 562), so a command, a Ray worker or a notebook pays for torch, pandas, scipy or matplotlib
only when it uses what needs them.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from typing import TYPE_CHECKING

from ._version import __version__ as __version__
from .errors import ConfigError as ConfigError
from .errors import DataError as DataError
from .errors import GenprobeError as GenprobeError
from .errors import ModuleSelectionError as ModuleSelectionError
from .errors import OutputError as OutputError
from .errors import RunError as RunError
from .errors import StateError as StateError

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and editors
    from . import kernels as kernels
    from . import measures as measures
    from .evaluate import Metrics as Metrics
    from .evaluate import evaluate as evaluate
    from .kernels import NTKPhaseResult as NTKPhaseResult
    from .kernels import ntk_phase as ntk_phase
    from .measures import rank_correlation as rank_correlation
    from .measures import register_measure as register_measure
    from .params import Unit as Unit
    from .probes.registry import get_probe as get_probe
    from .probes.registry import list_probes as list_probes
    from .report import report as report
    from .results import Result as Result
    from .results import load as load
    from .subject import Subject as Subject
    from .subject import units as units
    from .values import Data as Data

_LAZY = {
    "Subject": ("genprobe.subject", "Subject"), "Data": ("genprobe.values", "Data"),
    "Unit": ("genprobe.params", "Unit"), "units": ("genprobe.subject", "units"), "Metrics": ("genprobe.evaluate", "Metrics"),
    "evaluate": ("genprobe.evaluate", "evaluate"),
    "get_probe": ("genprobe.probes.registry", "get_probe"),
    "list_probes": ("genprobe.probes.registry", "list_probes"),
    "Result": ("genprobe.results", "Result"), "load": ("genprobe.results", "load"),
    "report": ("genprobe.report", "report"),
    "kernels": ("genprobe.kernels", None), "NTKPhaseResult": ("genprobe.kernels", "NTKPhaseResult"),
    "ntk_phase": ("genprobe.kernels", "ntk_phase"),
    "measures": ("genprobe.measures", None),
    "register_measure": ("genprobe.measures", "register_measure"),
    "rank_correlation": ("genprobe.measures", "rank_correlation"),
}
"""name: (module, attribute, or None for the module itself), imported on first use."""

_EAGER = ["ConfigError", "DataError", "GenprobeError", "ModuleSelectionError", "OutputError",
          "RunError", "StateError", "__version__"]


@functools.cache
def _submodules() -> frozenset[str]:
    import pkgutil

    return frozenset(m.name for m in pkgutil.iter_modules(__path__))


def _probe_exports() -> dict[str, object]:
    """Each registered probe's function and result class, by name (imports every probe)."""
    from .probes.registry import get_probe, list_probes

    out: dict[str, object] = {}
    for name in list_probes():
        spec = get_probe(name)
        out[name] = spec.function
        out[spec.result.__name__] = spec.result
    return out


def __getattr__(name: str):
    if name == "__all__":
        value = [*_EAGER, *_LAZY, *_probe_exports()]
    elif name in _LAZY:
        module, attribute = _LAZY[name]
        value = importlib.import_module(module)
        value = value if attribute is None else getattr(value, attribute)
    elif name.startswith("_") or name in _submodules():  # `from . import params`: not ours
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    else:
        probes = _probe_exports()
        if name not in probes:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = probes[name]
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__getattr__("__all__")))


class _Package(types.ModuleType):
    """This package's module type: importing ``genprobe.report`` or ``genprobe.evaluate`` binds
    the submodule on its package, which would hide the function of the same name (``gp.report``,
    ``gp.evaluate``); those bindings are skipped (the submodules stay in ``sys.modules``)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name, (None, None))[1] is not None:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
