"""Result objects: what every probe returns.

A result has a tidy ``table`` (one row per measurement), a ``summary`` of scalar measures,
named extra ``tables`` and ``tensors`` (matrices), and ``meta`` (provenance: probe, genprobe
version, options, seed). ``save(path)`` writes a directory — ``table.parquet``, one Parquet file
per extra table, ``tensors.safetensors`` and ``meta.json`` — and ``load(path)`` reads it back
exactly, as the probe's own result class.

Probes subclass :class:`Result`, set ``probe`` and implement ``plot()`` (drawn in the one style
of :mod:`genprobe.figures`) and ``reading()`` (one plain-language paragraph generated from the
numbers, for the report); extra tables and tensors are exposed as properties (``.cosine``,
``.modules`` ...).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import outputs
from ._version import __version__
from .errors import RunError, one_line
from .figures import save_figure
from .outputs import jsonable

FILES = ("table.parquet", "tensors.safetensors", "meta.json", "figure.png", "figure.svg")
"""What :meth:`Result.save` writes in a result directory (plus ``table-NAME.parquet`` files)."""


def result_file(name: str) -> bool:
    """Whether `name` is a file that :meth:`Result.save` writes."""
    return name in FILES or (name.startswith("table-") and name.endswith(".parquet"))


_REGISTRY: dict[str, type[Result]] = {}


def machine() -> dict[str, Any]:
    """Where a result was computed (``meta["machine"]``): operating system, Python, torch, CPU
    cores and torch's thread count, and the CUDA device when there is one."""
    info: dict[str, Any] = {"system": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def self_check_failure(check: Mapping[str, Any] | None) -> str | None:
    """One sentence when a result's ``meta["self_check"]`` failed (None when it passed or there
    is none): said first wherever the result's numbers are shown."""
    if not check or check.get("passed") is not False:
        return None
    return (f"Self-check FAILED: {check.get('what')}: {check.get('value')} against a tolerance of "
            f"{check.get('tolerance')}")


UNDEFINED = "undefined"
"""How the readings print a NaN: never as a number."""


def _not_finite(value: float) -> str | None:
    if math.isnan(value):
        return UNDEFINED
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return None


def number(value: float, digits: int = 3) -> str:
    """A measure as the readings print it: `digits` significant digits (``0.123``, ``2.14e+04``);
    ``undefined`` for NaN, ``∞`` for infinity."""
    return _not_finite(value) or f"{value:.{digits}g}"


def percent(fraction: float, digits: int = 1) -> str:
    """A fraction (an error, an accuracy) as the readings print it: ``0.0194`` -> ``1.9%``."""
    return _not_finite(fraction) or f"{100.0 * fraction:.{digits}f}%"


def points(fraction: float, digits: int = 1) -> str:
    """A difference of two fractions in percentage points: ``0.123`` -> ``12.3 pp``."""
    return _not_finite(fraction) or f"{100.0 * fraction:.{digits}f} pp"


def names(items: list[str], limit: int = 4) -> str:
    """``a``, ``a and b``, ``a, b and c``; beyond `limit` names, ``a, b, c, d and 3 more``."""
    items = list(items)
    if len(items) > limit:
        return ", ".join(items[:limit]) + f" and {len(items) - limit} more"
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


@dataclass
class Result:
    """Base result: ``table``, ``summary``, ``tables``, ``tensors``, ``meta``."""

    table: pd.DataFrame
    summary: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    probe: ClassVar[str] = "result"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "probe" in cls.__dict__:  # a shared base (no probe of its own) loads nothing
            _REGISTRY[cls.probe] = cls

    def __post_init__(self) -> None:
        self.summary = {k: float(v) for k, v in self.summary.items()}
        meta = {"probe": self.probe, "genprobe_version": __version__, "machine": machine(),
                **self.meta}  # a loaded result keeps its own
        self.meta = jsonable(meta)  # exactly what save() writes

    def brief(self) -> pd.DataFrame:
        """The compact table the command line prints (the full ``table`` is in the saved result)."""
        return self.table

    @property
    def self_check(self) -> dict[str, Any]:
        """The result's own consistency check (``meta["self_check"]``): ``what`` it checks,
        ``value`` (the discrepancy found), ``tolerance`` and ``passed``."""
        return self.meta.get("self_check", {})

    def plot(self):
        """A matplotlib Figure like the paper's figure for this probe."""
        raise NotImplementedError(f"{type(self).__name__} has no plot")

    def reading(self) -> str:
        """One plain-language paragraph saying what the numbers show (the report prints it
        under the figure): :meth:`read`, unless the result holds nothing to read (no table
        with a row, or no summary number defined), which is said as such."""
        if self.table.empty and all(t.empty for t in self.tables.values()):
            return (f"This {self.probe} result holds no measurements (its table is empty): there "
                    "is nothing to read.")
        if self.summary and all(math.isnan(v) for v in self.summary.values()):
            return (f"No summary number of this {self.probe} result is defined (every one is "
                    "NaN): there is nothing to read.")
        return self.read()

    def read(self) -> str:
        """The reading of a result with numbers in it; probes override it, this default lists
        the summary."""
        shown = ", ".join(f"{k} = {number(v)}" for k, v in self.summary.items())
        return f"The {self.probe} result's summary measures: {shown}." if shown else \
            f"The {self.probe} result has no summary measures."

    def __repr__(self) -> str:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in self.summary.items())
        return f"{type(self).__name__}({len(self.table)} rows; {summary})"

    # -- persistence -------------------------------------------------------------

    def save(self, path: str | Path, *, figure: bool = False) -> Path:
        """Write the result to directory `path`, atomically; with `figure`, also its plot as
        ``figure.png`` and ``figure.svg``. An existing `path` is replaced only if it is an empty
        directory or a result genprobe wrote (:mod:`genprobe.outputs`); otherwise OutputError."""
        path = Path(path)
        with outputs.staged_directory(path, "result", result_file, "result directory") as tmp:
            self.table.to_parquet(tmp / "table.parquet", index=False)
            for name, df in self.tables.items():
                df.to_parquet(tmp / f"table-{name}.parquet", index=False)
            if self.tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.tensors.items()},
                          str(tmp / "tensors.safetensors"))
            meta = {"summary": {k: (v if math.isfinite(v) else None) for k, v in self.summary.items()},
                    "nan_keys": [k for k, v in self.summary.items() if math.isnan(v)],
                    "inf_keys": {k: math.copysign(1.0, v) for k, v in self.summary.items() if math.isinf(v)},
                    "meta": jsonable(self.meta), "tables": sorted(self.tables)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, allow_nan=False))
            if figure:  # plot() builds a matplotlib Figure without pyplot: nothing to close
                save_figure(self.plot(), tmp / "figure")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Result:
        """Read a result written by :meth:`save`, as its probe's result class."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            table = pd.read_parquet(path / "table.parquet")
            tables = {n: pd.read_parquet(path / f"table-{n}.parquet") for n in meta["tables"]}
            tensor_file = path / "tensors.safetensors"
            tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
            if not isinstance(meta, dict) or not isinstance(meta.get("meta"), dict):
                raise ValueError("meta.json is not a genprobe result's metadata")
        except (OSError, KeyError, ValueError, TypeError, SafetensorError) as exc:
            first = one_line(exc)
            raise RunError(f"{path} is not a readable genprobe result ({first}); "
                           "write one with result.save(path)") from None
        infs = meta.get("inf_keys", {})
        summary = {k: (math.nan if k in meta["nan_keys"] else math.copysign(math.inf, infs[k]) if k in infs
                       else v) for k, v in meta["summary"].items()}
        kind = result_class(meta["meta"].get("probe"))
        if cls is not Result and not issubclass(kind, cls):
            raise RunError(f"{path} holds a {meta['meta'].get('probe')!r} result, not {cls.probe!r}")
        return kind(table=table, summary=summary, meta=meta["meta"], tables=tables, tensors=tensors)


def result_class(probe: str | None) -> type[Result]:
    """The result class registered for `probe` (the base :class:`Result` for an unknown one).
    A class registers when its module is imported, which ``import genprobe`` no longer does: an
    unregistered name first imports every probe and the kernels (by name: they import this
    module, not the reverse)."""
    if probe not in _REGISTRY:
        importlib.import_module("genprobe.probes.registry").list_probes()
        importlib.import_module("genprobe.kernels")  # NTKPhaseResult
    return _REGISTRY.get(probe, Result)


def load(path: str | Path) -> Result:
    """Load any saved result (``gp.load``)."""
    return Result.load(path)
