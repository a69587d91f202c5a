"""One shape for every registry of named things: architectures (:mod:`genprobe.zoo`), datasets
(:mod:`genprobe.data`) and probes (:mod:`genprobe.probes.registry`).

A :class:`Registry` is registered into once per name (a second registration of a name is a bug,
a TypeError), lists its names with an fnmatch pattern, in registration order, and gives an entry
by name, or the kind's error naming the closest name and every registered one::

    MODELS = Registry("arch")
    MODELS.register("fcn", make_fcn)
    MODELS.names("*cnn*"), MODELS.entry("fcn")
    MODELS.entry("fnc")  # ConfigError: unknown arch='fnc'; did you mean 'fcn'? choose one of ...
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ConfigError, GenprobeError, unknown

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Entries of one `kind` by name (a dict: ``name in registry``, ``registry[name]``).

    `error`: the error type of an unknown name (ConfigError; DataError for datasets).
    `load`: called before any lookup (e.g. importing the modules that register the entries)."""

    def __init__(self, kind: str, *, error: type[GenprobeError] = ConfigError,
                 load: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.kind, self.error, self._load = kind, error, load

    def register(self, name: str, entry: T) -> T:
        """Add `entry` under `name`; TypeError when `name` is registered already."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind}'s name must be a non-empty string, got {name!r}")
        if name in self:
            raise TypeError(f"{self.kind} {name!r} is registered twice")
        self[name] = entry
        return entry

    def names(self, pattern: str = "*") -> list[str]:
        """The registered names matching an fnmatch `pattern` (case-sensitive), in
        registration order."""
        self.load()
        return [n for n in self if fnmatch.fnmatchcase(n, pattern)]

    def entry(self, name: str) -> T:
        """The entry registered as `name`; the kind's error (one line: the closest name and all
        of them) when there is none."""
        self.load()
        if name not in self:
            raise unknown(self.kind, name, list(self), self.error)
        return self[name]

    def load(self) -> None:
        if self._load is not None:
            self._load()


__all__ = ["Registry"]
