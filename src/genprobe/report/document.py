"""The JSON export of a report: the same content as the page (numbers, readings, provenance),
figures left out, for pipelines.

Its first key is ``"generator": "genprobe"``, genprobe's proof that it wrote the file
(:func:`written_by_genprobe`). Numbers that JSON cannot hold are written as ``null`` (NaN) or
as the strings ``"inf"`` / ``"-inf"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..outputs import jsonable

_PROOF = b'{\n  "generator": "genprobe"'


def dumps(doc: dict[str, Any]) -> str:
    """The JSON text of a report document, ``generator`` first."""
    ordered = {"generator": "genprobe", **{k: v for k, v in doc.items() if k != "generator"}}
    return json.dumps(jsonable(ordered), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def written_by_genprobe(path: Path) -> bool:
    """Whether the JSON file `path` starts as :func:`dumps` writes it."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_PROOF)) == _PROOF
    except OSError:
        return False


__all__ = ["dumps", "written_by_genprobe"]
