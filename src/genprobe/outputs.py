"""Safe outputs: genprobe replaces only what it can prove it wrote, and every write is atomic.

A directory genprobe writes (a probe result, a run) carries a marker file naming its kind. An
existing output path is replaced only when it is an empty directory, or a directory of that kind
carrying the marker and holding nothing but the names genprobe writes there; anything else is
refused with :class:`~genprobe.errors.OutputError`, before any work is done. A directory is
written under a temporary name beside its target and renamed into place when complete, so an
interrupted write never leaves a half-written result, and the previous one survives until then.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import OutputError

MARKS = {"result": ".genprobe-result", "run": ".genprobe-run", "kernels": ".genprobe-kernels",
         "sweep": ".genprobe-sweep"}
"""Marker file of each kind of directory genprobe writes."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_creatable(path: Path, what: str = "output") -> None:
    """OutputError unless `path` could be created: no file in the way, a writable parent."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == path else f"lies under {parent}, which is a file"
                raise OutputError(f"{what} {path} {where}; choose a directory path for --out")
            if not os.access(parent, os.W_OK | os.X_OK) and parent != path:
                raise OutputError(f"{what} {path} cannot be written: no write permission in {parent}")
            break


def is_owned(path: Path, kind: str, allowed: Callable[[str], bool]) -> bool:
    """Whether directory `path` is a genprobe `kind` directory holding only names it writes."""
    path = Path(path)
    if not (path / MARKS[kind]).is_file():
        return False
    return all(allowed(p.name) or p.name == MARKS[kind] for p in path.iterdir())


def check_replaceable(path: Path, kind: str, allowed: Callable[[str], bool], what: str = "output") -> None:
    """OutputError unless `path` is absent, an empty directory, or genprobe's own `kind`."""
    path = Path(path)
    check_creatable(path, what)
    if not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    if path.is_dir() and is_owned(path, kind, allowed):
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise OutputError(f"{what} {path} cannot be replaced: no write permission in {path.parent}")
        return
    inside = sorted(p.name for p in path.iterdir())[:3] if path.is_dir() else []
    held = f" (it holds {', '.join(inside)}{' ...' if len(inside) == 3 else ''})" if inside else ""
    raise OutputError(f"{what} {path} already exists and is not a genprobe {kind} directory{held}; "
                      "genprobe replaces only what it wrote: choose another path")


@contextmanager
def staged_directory(path: Path, kind: str, allowed: Callable[[str], bool],
                     what: str = "output") -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; when the block ends without an error,
    mark it as genprobe's `kind` and move it to `path` (replacing a directory genprobe wrote)."""
    path = Path(path)
    check_replaceable(path, kind, allowed, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise OutputError(f"{what} {path} cannot be written: {exc.strerror or exc}") from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); results are for sharing
    try:
        yield tmp
        (tmp / MARKS[kind]).write_text(f"written by genprobe: a {kind} directory\n")
        _swap_in(tmp, path, kind, allowed, what)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, path: Path, kind: str, allowed, what: str) -> None:
    check_replaceable(path, kind, allowed, what)  # again: it may have changed meanwhile
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
            old = None
        else:
            path.rename(old)
    try:
        tmp.rename(path)
    except OSError:
        if old is not None:
            old.rename(path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def tmp_name(path: Path) -> Path:
    """The temporary name an atomic write to `path` goes through: ``.NAME.PID.tmp`` beside it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


_TMP_FILE = re.compile(r"^\.(?P<name>.+)\.\d+\.tmp$")
_TMP_DIR = re.compile(r"^\.(?P<name>[^/]+?)\.(?:[A-Za-z0-9_]+\.tmp|old-\d+)$")


def temporary_file_of(name: str) -> str | None:
    """The name that `name` is a temporary file of (:func:`tmp_name`), None when it is not one."""
    match = _TMP_FILE.match(name)
    return match.group("name") if match else None


def temporary_directory_of(name: str) -> str | None:
    """The name that `name` is a temporary or replaced directory of (:func:`staged_directory`:
    ``.NAME.XXXX.tmp`` or ``.NAME.old-PID``), None when it is not one."""
    match = _TMP_DIR.match(name)
    return match.group("name") if match else None


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary name beside `path`, then rename it to `path`; the
    temporary file is removed whatever happens (a crash, Ctrl-C), so `path` is either the old
    file or the complete new one. The file gets the umask's permissions (safetensors creates
    files private, 0600)."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def jsonable(value: Any, *, strict: bool = True) -> Any:
    """`value` as plain JSON data, genprobe's one converter: dicts (keys as strings), lists,
    numpy / torch scalars as Python ones, paths and any other object as strings, pandas' missing
    values as None. `strict`: every number a JSON number (NaN -> None, ±∞ -> "inf" / "-inf"), for
    files other programs read (a report's export, a result's meta.json); otherwise floats stay as
    they are (Python's json writes NaN / Infinity, which it reads back), for the sweep files only
    genprobe reads, where a NaN measure must come back as NaN."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, strict=strict) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, strict=strict) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            value = value.item()  # numpy / torch scalars, pandas' NA-free scalars
        except (ValueError, TypeError):
            return str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if strict and math.isnan(value):
            return None
        if strict and math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if value.__class__.__name__ in ("NAType", "NaTType"):  # pandas' missing values
        return None
    return str(value)


__all__ = ["MARKS", "check_creatable", "check_replaceable", "is_owned", "jsonable", "staged_directory",
           "tmp_name", "write_atomic", "write_text_atomic"]
