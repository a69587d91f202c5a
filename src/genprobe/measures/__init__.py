"""Generalization measures, and how well each ranks a family of models by generalization gap.

- :mod:`~genprobe.measures.baseline`: Jiang et al.'s baseline measures of one trained network.
- :mod:`~genprobe.measures.registry`: which columns of a table are measures, with their expected
  direction (:func:`classify`); user-defined measures (:func:`register_measure`); and
  :func:`compute`, every measure of one network (the baselines, the registered probes'
  ``summary`` keyed ``"<probe>.<key>"``, the user's).
- :mod:`~genprobe.measures.ranking`: how well each measure ranks a family of models
  (:func:`rank_correlation`), with :mod:`~genprobe.measures.scores` (the weighted τ, granulated
  τ and CMI, the bootstrap's statistics) and :mod:`~genprobe.measures.figure`.

A new baseline is a function in ``baseline``; a new probe declares its measures in its
registration (:class:`genprobe.probes.registry.ProbeSpec`); a user's measure is one
:func:`register_measure` call. The names below load their submodule on first use, so that reading
a ranking does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "baseline": ("BASELINES", "LAYERS", "Layer", "PREFIX", "SigmaSearch", "baselines", "layers",
                  "log_path_norm", "parameter_scales", "sigma_search"),
    "registry": ("DATA_BASELINES", "MeasureSpec", "USER_PREFIX", "classify", "compute",
                 "evaluate_measure", "import_measure", "register_measure", "unregister_measure",
                 "user_measures"),
    "ranking": ("CMI_CONVENTIONS", "NOT_HYPERPARAMETERS", "RANKING_COLUMNS", "RankingOptions",
                "SCORES", "eligible_models", "format_score", "headline", "rank_correlation",
                "rank_sweep"),
    "figure": ("plot_rank_correlation",),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


__all__ = sorted(_HOME)
