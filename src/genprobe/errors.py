"""Typed exceptions. Every user-facing error says what is wrong, which name or file, and what to do.

The CLI turns any :class:`GenprobeError` into one line on stderr and exit code 2.
"""

from __future__ import annotations


class GenprobeError(ValueError):
    """Base class of every error caused by the user's input (not by a bug in genprobe)."""


class DataError(GenprobeError):
    """A dataset is unknown, not installed, unreadable, or has the wrong shape."""


class StateError(GenprobeError):
    """A state dict does not match the model (missing/unexpected key, wrong shape), or is unreadable."""


class ModuleSelectionError(GenprobeError):
    """A module pattern or group selects nothing, or selects overlapping modules."""


class ConfigError(GenprobeError):
    """An option has a bad value (the message names the option and the allowed values)."""


class RunError(GenprobeError):
    """A run directory is missing, incomplete or corrupt."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's whole message folded onto one line (at most `limit` characters), or its
    type's name."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def did_you_mean(name: object, choices) -> str:
    """``did you mean 'x'? `` for the choice closest to `name` (difflib), or an empty string."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def unknown(name: str, value: object, allowed, error: type[GenprobeError] | None = None) -> GenprobeError:
    """The error for `value` of `name` not among `allowed`: ``unknown NAME='x'; did you mean
    'y'? choose one of 'a', 'b'`` (a ConfigError unless `error` says otherwise)."""
    return (error or ConfigError)(f"unknown {name}={value!r}; {did_you_mean(value, allowed)}"
                                  f"choose one of {', '.join(map(repr, allowed))}")


def check_choice(name: str, value: object, allowed: tuple | list) -> None:
    """Raise ConfigError naming `name`, the bad `value`, the closest allowed one and all of them."""
    if value not in allowed:
        raise unknown(name, value, allowed)


class OutputError(GenprobeError):
    """An output path cannot be written, or holds something genprobe did not write (genprobe
    replaces only directories it can prove it wrote)."""
