"""genprobe: which parts of a trained PyTorch network matter, and what that says about generalization."""

from ._version import __version__
from .errors import (
    ConfigError,
    DataError,
    GenprobeError,
    ModuleSelectionError,
    RunError,
    StateError,
)
from .evaluate import Metrics, evaluate
from .params import Unit
from .probes.criticality import CriticalityResult, criticality
from .probes.robustness import RobustnessResult, robustness
from .probes.stiffness import StiffnessResult, stiffness
from .results import Result, load
from .subject import Data, Subject

__all__ = [
    "CriticalityResult", "criticality",
    "StiffnessResult", "stiffness",
    "ConfigError", "Data", "DataError", "GenprobeError", "Metrics", "ModuleSelectionError",
    "Result", "RobustnessResult", "RunError", "StateError", "Subject", "Unit", "evaluate", "load", "robustness", "__version__",
]
