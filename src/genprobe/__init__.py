"""genprobe: which parts of a trained PyTorch network matter, and what that says about generalization.

Every registered probe (:mod:`genprobe.probes.registry`) is exported here under its name, with its
result class: ``gp.robustness``, ``gp.RobustnessResult``, ... (``gp.list_probes()`` names them).
"""

from . import kernels, measures, ranking
from ._version import __version__
from .errors import (
    ConfigError,
    DataError,
    GenprobeError,
    ModuleSelectionError,
    OutputError,
    RunError,
    StateError,
)
from .evaluate import Metrics, evaluate
from .kernels import NTKPhaseResult, ntk_phase
from .measures import register_measure
from .params import Unit
from .probes.registry import get_probe, list_probes
from .ranking import rank_correlation
from .report import report
from .results import Result, load
from .subject import Subject
from .values import Data

__all__ = [
    "ConfigError", "Data", "DataError", "GenprobeError", "Metrics", "ModuleSelectionError",
    "OutputError", "Result", "RunError", "StateError", "Subject", "Unit", "__version__", "evaluate",
    "get_probe", "kernels", "list_probes", "load", "measures", "NTKPhaseResult", "ntk_phase",
    "rank_correlation", "ranking", "register_measure", "report",
]

for _name in list_probes():
    _spec = get_probe(_name)
    globals()[_name] = _spec.function
    globals()[_spec.result.__name__] = _spec.result
    __all__ += [_name, _spec.result.__name__]
del _name, _spec
