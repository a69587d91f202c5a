"""Reading a user's YAML config file: one clear line for every way it can be wrong.

YAML itself lets a key appear twice in a mapping and keeps the last value silently; a config
where ``lr`` is written twice is almost always a mistake, so a repeated key is an error naming
the key and both lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, first_line


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"key {key!r} appears twice, at lines {first} and {line}; keep one")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated within one mapping."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise _DuplicateKey(key, line, seen[key])
        except TypeError:  # an unhashable key: the SafeLoader's own error follows
            break
        seen[key] = line
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_mapping(path: str | Path, what: str, expected: str) -> dict[str, Any]:
    """The mapping in YAML file `path`, or ConfigError (one line: ``WHAT PATH ...``) when it is a
    folder, missing, unreadable, not YAML, repeats a key, or is not a mapping (`expected` says
    what it should hold). An empty file is an empty mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {first_line(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} cannot be read as YAML text: {first_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of {expected}")
    return data


__all__ = ["read_mapping"]
