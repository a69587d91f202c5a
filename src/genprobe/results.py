"""Result objects: what every probe returns.

A result has a tidy ``table`` (one row per measurement), a ``summary`` of scalar measures,
named extra ``tables`` and ``tensors`` (matrices), and ``meta`` (provenance: probe, genprobe
version, options, seed). ``save(path)`` writes a directory — ``table.parquet``, one Parquet file
per extra table, ``tensors.safetensors`` and ``meta.json`` — and ``load(path)`` reads it back
exactly, as the probe's own result class.

Probes subclass :class:`Result`, set ``probe`` and implement ``plot()``; extra tables and
tensors are exposed as properties (``.cosine``, ``.modules`` ...).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from ._version import __version__
from .errors import RunError

_REGISTRY: dict[str, type[Result]] = {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


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
        _REGISTRY[cls.probe] = cls

    def __post_init__(self) -> None:
        self.summary = {k: float(v) for k, v in self.summary.items()}
        self.meta = {"probe": self.probe, "genprobe_version": __version__, **self.meta}

    def plot(self):
        """A matplotlib Figure like the paper's figure for this probe."""
        raise NotImplementedError(f"{type(self).__name__} has no plot")

    def __repr__(self) -> str:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in self.summary.items())
        return f"{type(self).__name__}({len(self.table)} rows; {summary})"

    # -- persistence -------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the result to directory `path` (replaced atomically if it exists)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.table.to_parquet(tmp / "table.parquet", index=False)
            for name, df in self.tables.items():
                df.to_parquet(tmp / f"table-{name}.parquet", index=False)
            if self.tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.tensors.items()},
                          str(tmp / "tensors.safetensors"))
            meta = {"summary": {k: (v if math.isfinite(v) else None) for k, v in self.summary.items()},
                    "nan_keys": [k for k, v in self.summary.items() if math.isnan(v)],
                    "inf_keys": {k: math.copysign(1.0, v) for k, v in self.summary.items() if math.isinf(v)},
                    "meta": _jsonable(self.meta), "tables": sorted(self.tables)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, allow_nan=False))
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
        except (OSError, KeyError, ValueError) as exc:
            raise RunError(f"{path} is not a readable genprobe result ({exc}); "
                           "write one with result.save(path)") from exc
        infs = meta.get("inf_keys", {})
        summary = {k: (math.nan if k in meta["nan_keys"] else math.copysign(math.inf, infs[k]) if k in infs
                       else v) for k, v in meta["summary"].items()}
        kind = _REGISTRY.get(meta["meta"].get("probe"), Result)
        if cls is not Result and not issubclass(kind, cls):
            raise RunError(f"{path} holds a {meta['meta'].get('probe')!r} result, not {cls.probe!r}")
        return kind(table=table, summary=summary, meta=meta["meta"], tables=tables, tensors=tensors)


def load(path: str | Path) -> Result:
    """Load any saved result (``gp.load``)."""
    return Result.load(path)
