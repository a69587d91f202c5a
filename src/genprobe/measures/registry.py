"""The measure registry: which columns of a table are measures and their expected direction
(:func:`classify`), and user-defined measures (:func:`register_measure`); a probe's registration
names its own (:class:`genprobe.probes.registry.ProbeSpec`).
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, first_line
from ..subject import check_subject
from .baseline import BASELINES, PREFIX
from .baseline import baselines as baselines_of

logger = logging.getLogger(__name__)


DATA_BASELINES = ("pacbayes_sharpness", "pacbayes_flatness", "inverse_margin")
"""Baselines computed from data (the ``split`` option of :func:`baselines`); the others read the
weights alone."""
USER_PREFIX = "user."
"""Column prefix of user-defined measures: ``gp.register_measure("NAME", f)`` is ``user.NAME``."""
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class MeasureSpec:
    """A registered measure: its table column, the expected direction (+1 when a larger value is
    expected to go with a larger generalization gap, −1 the reverse, 0 no stated expectation),
    what it is computed from, and for a user-defined measure its function (a Subject -> float)
    and where the function lives (``"package.module:function"``, when importable)."""

    column: str
    direction: int
    source: str
    function: Callable[[Any], float] | None = None
    path: str | None = None


_USER: dict[str, MeasureSpec] = {}


def register_measure(name: str, function: Callable[[Any], float], *, direction: int = 0,
                     source: str | None = None) -> MeasureSpec:
    """Register a user-defined measure ``user.<name>``: `function(subject) -> float`, computed
    by :func:`compute` on every subject and ranked by :func:`genprobe.measures.rank_correlation`
    with the built-in ones. `direction`: +1 when a larger value is expected to go with a larger
    generalization gap, −1 the reverse, 0 (default) no stated expectation. Registering a name
    again replaces it. In a sweep, name the function by its import path instead (the sweep
    config's ``measures: {name: "package.module:function"}``): workers are other processes."""
    _check_measure(name, direction)
    if not callable(function):
        raise ConfigError(f"measure {name!r}: the function must be callable (a Subject -> float), "
                          f"got {type(function).__name__}")
    module, qualname = getattr(function, "__module__", None), getattr(function, "__qualname__", "")
    path = f"{module}:{qualname}" if module and "<" not in qualname else None
    spec = MeasureSpec(USER_PREFIX + name, int(direction),
                       source or f"user function {path or repr(function)}", function, path)
    _USER[name] = spec
    return spec


def _check_measure(name, direction) -> None:
    """ConfigError unless `name` is an identifier and `direction` is -1, 0 or +1."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"a measure's name must be a simple identifier (letters, digits, _), "
                          f"got {name!r}")
    if direction not in (-1, 0, 1) or isinstance(direction, bool):
        raise ConfigError(f"measure {name!r}: direction must be -1, 0 or +1, got {direction!r}")


def unregister_measure(name: str) -> None:
    """Forget the user-defined measure `name` (no error when it is not registered)."""
    _USER.pop(name, None)


def user_measures() -> dict[str, MeasureSpec]:
    """The user-defined measures registered in this process, by name."""
    return dict(_USER)


def import_measure(name: str, path: str, *, direction: int = 0) -> MeasureSpec:
    """The measure ``user.<name>`` whose function is at import path ``"package.module:function"``
    (ConfigError, one line, when the name is not an identifier, the direction not -1, 0 or +1, or
    the path does not resolve to a callable): how a sweep config names its measures."""
    import importlib

    _check_measure(name, direction)
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ConfigError(f"measure {name!r}: {path!r} is not an import path; write "
                          "'package.module:function'")
    module_name, attribute = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's path or module
        raise ConfigError(f"measure {name!r}: cannot import module {module_name!r} "
                          f"({first_line(exc, 120)}); is it on PYTHONPATH?") from None
    function: Any = module
    for part in attribute.split("."):
        function = getattr(function, part, None)
        if function is None:
            raise ConfigError(f"measure {name!r}: module {module_name!r} has no {attribute!r}")
    if not callable(function):
        raise ConfigError(f"measure {name!r}: {path} is a {type(function).__name__}, not a "
                          "function of a Subject")
    return MeasureSpec(USER_PREFIX + name, direction, f"user function {path}", function, path)


def evaluate_measure(spec: MeasureSpec, subject) -> tuple[float, str | None]:
    """(value, None), or (NaN, one line saying why) when the function raises or returns
    anything but a finite real number (a NaN, a tensor, a string ...)."""
    name = spec.column
    try:
        value = spec.function(subject)
    except Exception as exc:  # noqa: BLE001 - a user's function may raise anything
        return math.nan, f"{name}: the function raised {type(exc).__name__}: {first_line(exc, 160)}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return math.nan, (f"{name}: the function returned a {type(value).__name__}, not a number "
                          "(return a Python float)")
    if not math.isfinite(float(value)):
        return math.nan, f"{name}: the function returned {float(value)!r}, not a finite number"
    return float(value), None


def classify(columns: Sequence[str], *, probes: Mapping[str, Mapping[str, Any] | None] | None = None,
             baselines: Mapping[str, Any] | None = None,
             user: Mapping[str, Mapping[str, Any]] | None = None,
             ) -> tuple[dict[str, int], dict[str, str]]:
    """Which of `columns` are registered measures that may be ranked: ``({column: expected
    direction}, {column: why it is not ranked})``, for the columns whose name has a ``"."``.

    `probes`: the options each probe ran with (a sweep's ``probes``; default: each probe's own
    defaults) — a probe's measures computed from the test split are not ranked (they contain the
    target). `baselines`: the options of :func:`baselines` (its ``split``). `user`: user measures
    named by a table (``{name: {"direction": d}}``), besides those registered in this process.
    """
    from ..probes.registry import get_probe, list_probes

    ranked: dict[str, int] = {}
    skipped: dict[str, str] = {}
    known_probes = set(list_probes())
    user_directions = {n: int(dict(v or {}).get("direction", 0)) for n, v in (user or {}).items()}
    user_directions |= {n: s.direction for n, s in _USER.items()}
    for column in map(str, columns):
        if "." not in column:
            continue
        group, key = column.split(".", 1)
        if column.startswith(PREFIX):
            if key not in BASELINES:
                skipped[column] = "not one of the registered baselines"
            elif key in DATA_BASELINES and dict(baselines or {}).get("split", "train") == "test":
                skipped[column] = "computed from the test split (the target's data)"
            else:
                ranked[column] = 1
        elif column.startswith(USER_PREFIX):
            if key in user_directions:
                ranked[column] = user_directions[key]
            else:
                skipped[column] = "a user measure that is not registered (gp.register_measure)"
        elif group in known_probes:
            spec = get_probe(group)
            direction = spec.measure_direction(key)
            options = dict((probes or {}).get(group) or {})
            if direction is None:
                skipped[column] = ("not a measure: the probe reports it about the run (its own "
                                   "error or loss, a count, a size, or a transform of another key)")
            elif spec.data_split(options) == "test":
                skipped[column] = ("computed from the test split (the target's data); run the "
                                   "probe with split: train to rank it")
            else:
                ranked[column] = direction
        else:
            skipped[column] = "not a registered measure (pass measures=[...] to rank it anyway)"
    return ranked, skipped


def compute(subject, *, probes: Mapping[str, Mapping[str, Any] | None] | None = None,
            baselines: bool | Mapping[str, Any] = True, seed: int = 0,
            device: str | torch.device = "auto", user: bool = True) -> dict[str, float]:
    """Every scalar measure of `subject`: the :func:`baselines` (``baseline.*``; a mapping of
    options for them, or False for none), for each named registered probe its result's
    ``summary`` keyed ``"<probe>.<key>"``, run with the given options (``seed`` and ``device``
    filled in where the probe takes them and they are not given), and with `user` every
    user-defined measure (:func:`register_measure`, ``user.<name>``; NaN with a logged warning
    naming it when its function fails). The summaries hold more than measures: which keys are
    ranked is :func:`classify`'s decision. Every name and option is
    checked before any work starts (ConfigError naming the registered probes / accepted options).
    """
    from ..probes.registry import get_probe

    check_subject(subject, "compute")
    if probes is not None and not isinstance(probes, Mapping):
        raise ConfigError(f"probes must map probe names to their options, got "
                          f"{type(probes).__name__}")
    runs = []
    for name, options in (probes or {}).items():
        spec = get_probe(name)
        options = _options(f"probe {name!r}", options, spec.parameters())
        for shared, value in (("seed", seed), ("device", device)):
            if shared in spec.parameters():
                options.setdefault(shared, value)
        runs.append((name, spec, options))
    if not isinstance(baselines, (bool, Mapping)):
        raise ConfigError(f"baselines must be True, False or a mapping of options for "
                          f"measures.baselines, got {baselines!r}")
    out: dict[str, float] = {}
    if baselines is not False:
        accepted = {k: p for k, p in inspect.signature(baselines_of).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}
        options = _options("baselines", {} if baselines is True else baselines, accepted)
        out |= baselines_of(subject, **({"seed": seed, "device": device} | options))
    for name, spec, options in runs:
        result = spec.function(subject, **options)
        out |= {f"{name}.{key}": float(value) for key, value in result.summary.items()}
    for spec in (_USER.values() if user else ()):
        out[spec.column], why = evaluate_measure(spec, subject)
        if why is not None:
            logger.warning("%s is NaN: %s", spec.column, why)
    return out


def _options(what: str, options, accepted: Mapping[str, Any]) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"{what}: options must be a mapping of option names to values, got "
                          f"{type(options).__name__}")
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ConfigError(f"{what} has no option {unknown[0]!r}; its options: "
                          f"{', '.join(accepted)}")
    return dict(options)


__all__ = ["DATA_BASELINES", "MeasureSpec", "USER_PREFIX", "classify", "compute", "evaluate_measure",
           "import_measure", "register_measure", "unregister_measure", "user_measures"]
