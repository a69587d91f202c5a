"""The JSON export of a report: the same content as the page (numbers, readings, provenance),
figures left out, for pipelines.

Its first key is ``"generator": "genprobe"``, genprobe's proof that it wrote the file
(:func:`written_by_genprobe`). Numbers that JSON cannot hold are written as ``null`` (NaN) or
as the strings ``"inf"`` / ``"-inf"``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

_PROOF = b'{\n  "generator": "genprobe"'


def clean(value: Any) -> Any:
    """`value` with every number a JSON number (NaN -> None, ±∞ -> "inf"/"-inf"), numpy and
    torch scalars as Python ones, paths and other objects as strings."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            value = value.item()  # numpy / torch scalars, pandas' NA-free scalars
        except (ValueError, TypeError):
            return str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if value.__class__.__name__ in ("NAType", "NaTType"):  # pandas' missing values
        return None
    return str(value)


def dumps(doc: dict[str, Any]) -> str:
    """The JSON text of a report document, ``generator`` first."""
    ordered = {"generator": "genprobe", **{k: v for k, v in doc.items() if k != "generator"}}
    return json.dumps(clean(ordered), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def written_by_genprobe(path: Path) -> bool:
    """Whether the JSON file `path` starts as :func:`dumps` writes it."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_PROOF)) == _PROOF
    except OSError:
        return False


__all__ = ["clean", "dumps", "written_by_genprobe"]
