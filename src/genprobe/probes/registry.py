"""The probe registry: one entry per probe drives the command line, the demo, ``gp.`` and the tests.

A probe module defines its function and result class and registers them once::

    @register_probe("robustness", RobustnessResult, summary="...", paper="Zhang et al. 2019",
                    options=(Option("threshold", float, "Robust when ..."),),
                    demo={}, tiny={"draws": 1})
    def robustness(subject, *, modules=None, checkpoints="all", seed=0, ...):
        ...  # check every option against the subject (cheap: no pass over the data)
        options_checked()  # a sweep's check before training stops here
        ...  # the work

The command line (:mod:`genprobe.cli`) builds ``genprobe probe NAME`` from the entry: the
shared options of :mod:`genprobe.options` that the function accepts (``--modules``,
``--checkpoints``, ``--seed``, ``--n``, ``--per-class``, ``--split``, ``--device``,
``--memory-budget-mb``, ``--batch-size``), then the probe's own ``options``. Adding a probe is one
file in ``genprobe/probes/`` (found by :func:`probe_modules`) plus its tests; the shared probe tester
(``tests/test_probe_contract.py``) runs every registered probe with its ``tiny`` options, and checks
that its bad inputs are caught before :func:`~genprobe.options.options_checked` and that nothing before it runs the
model on more than two examples.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..options import check_only
from ..registry import Registry
from ..results import Result

NOT_PROBES = frozenset({"registry", "single_directions"})
"""Modules of :mod:`genprobe.probes` that hold shared machinery, not a probe."""


def probe_modules() -> list[str]:
    """Every module of :mod:`genprobe.probes` but :data:`NOT_PROBES`, sorted: a new probe is
    one new file there, found and registered without touching anything else."""
    import pkgutil

    from .. import probes

    return sorted(f"{probes.__name__}.{m.name}" for m in pkgutil.iter_modules(probes.__path__)
                  if m.name not in NOT_PROBES and not m.name.startswith("_"))


@dataclass(frozen=True)
class Option:
    """A probe-specific command-line option ``--name`` for the keyword argument ``name``.

    ``type``: int, float, str, Path or bool (a bool becomes ``--name/--no-name``). ``default``:
    the function's own default when omitted. ``multiple``: a repeatable option giving a list.
    ``flag``: the command-line flag when it is not ``--name`` (e.g. a keyword ``out``, which would
    clash with the command's own ``--out``).
    """

    name: str
    type: type
    help: str
    multiple: bool = False
    flag: str | None = None

    @property
    def cli_name(self) -> str:
        """The command's parameter name: the flag's, or the keyword's."""
        return (self.flag or self.name).replace("-", "_")


@dataclass(frozen=True)
class ProbeSpec:
    """A registered probe.

    ``function(subject, **options) -> result``; ``summary``: one line for ``genprobe probes``;
    ``paper``: the citation; ``options``: its own command-line options; ``demo``: the options
    the demo runs it with; ``tiny``: options for a few-second run on a tiny model (the shared
    probe tester); ``needs_init``: whether it needs θ⁰.

    ``measures``: which keys of the result's ``summary`` are measures of generalization (fnmatch
    patterns like ``"auc:*"``), each with its expected direction: +1 when a larger value is
    expected to go with a larger generalization gap, −1 the reverse, 0 when the paper states no
    expectation. Other summary keys (the trained network's own error or loss, counts, sizes,
    self-check quantities, values that are a fixed transform of another key) are reported but
    never ranked. ``data(options)``: which data the measures are computed from under the given
    options, ``"train"`` or ``"test"`` (default: the probe's ``split`` option); a measure
    computed from the test split contains the target of a ranking and is not ranked.
    """

    name: str
    function: Callable[..., Result]
    result: type[Result]
    summary: str
    paper: str
    options: tuple[Option, ...] = ()
    demo: dict[str, Any] = field(default_factory=dict)
    tiny: dict[str, Any] = field(default_factory=dict)
    needs_init: bool = False
    measures: dict[str, int] = field(default_factory=dict)
    data: Callable[[dict[str, Any]], str] | None = None

    def measure_direction(self, key: str) -> int | None:
        """The expected direction of summary key `key` (see above), None when it is not a
        measure."""
        for pattern, direction in self.measures.items():
            if fnmatch.fnmatchcase(key, pattern):
                return direction
        return None

    def data_split(self, options: dict[str, Any] | None = None) -> str:
        """``"train"`` or ``"test"``: the data the probe's measures come from under `options`."""
        options = dict(options or {})
        if self.data is not None:
            return self.data(options)
        split = self.parameters().get("split")
        if split is None:
            return "train"
        return str(options.get("split", split.default))

    def check(self, subject, options: dict[str, Any]) -> None:
        """Check `options` against `subject` (its model, data and recorded checkpoints) the way
        the probe itself does, and stop where its work would begin: the probe's own checks,
        run up to its :func:`~genprobe.options.options_checked`. Raises what the probe would (ConfigError,
        DataError, StateError, ModuleSelectionError). Cheap: a forward pass or two, never the
        probe's work, so a sweep checks every run's options before the first run trains."""
        check_only(self.function, subject, options, f"probe {self.name!r}")

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The function's keyword-only options, by name."""
        return {n: p for n, p in inspect.signature(self.function).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _load() -> None:
    for module in probe_modules():
        importlib.import_module(module)


_PROBES: Registry[ProbeSpec] = Registry("probe", load=_load)

def register_probe(name: str, result: type[Result], *, summary: str, paper: str,
                   options: tuple[Option, ...] = (), demo: dict | None = None,
                   tiny: dict | None = None, needs_init: bool = False,
                   measures: dict[str, int] | None = None,
                   data: Callable[[dict[str, Any]], str] | None = None):
    """Decorator registering a probe function under `name` (see the module docstring)."""

    def decorate(function: Callable[..., Result]) -> Callable[..., Result]:
        spec = ProbeSpec(name, function, result, summary, paper, tuple(options), dict(demo or {}),
                         dict(tiny or {}), needs_init, dict(measures or {}), data)
        bad = [d for d in spec.measures.values() if d not in (-1, 0, 1)]
        if bad:
            raise TypeError(f"probe {name!r}: a measure's direction must be -1, 0 or +1, got {bad[0]!r}")
        accepted = spec.parameters()
        for opt in spec.options:
            if opt.name not in accepted:
                raise TypeError(f"probe {name!r}: option {opt.name!r} is not a keyword of {function.__name__}")
        if result.probe != name:
            raise TypeError(f"probe {name!r}: its result class says probe={result.probe!r}")
        _PROBES.register(name, spec)
        return function

    return decorate


def list_probes(pattern: str = "*") -> list[str]:
    """Names of the registered probes matching an fnmatch `pattern`, sorted."""
    return sorted(_PROBES.names(pattern))


def get_probe(name: str) -> ProbeSpec:
    """The registry entry of probe `name` (ConfigError naming the closest and every registered
    one otherwise)."""
    return _PROBES.entry(name)


__all__ = ["NOT_PROBES", "Option", "ProbeSpec", "get_probe", "list_probes", "probe_modules",
           "register_probe"]
