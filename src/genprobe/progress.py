"""Progress bars for long work: rich, on stderr, and silent when stderr is not a terminal or
when the command line was given ``--quiet`` (:func:`set_quiet`).

Probes report their work with one context manager; the library never prints::

    with progress.task("robustness", total=len(units)) as bar:
        for unit in units:
            ...
            bar.advance()
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or allow) every progress bar of this process."""
    global _quiet
    _quiet = bool(quiet)


def enabled() -> bool:
    """Bars are drawn only on a terminal, and not under ``--quiet``."""
    return not _quiet and sys.stderr.isatty()


class Task:
    """A running bar; ``advance`` works (and costs nothing) when bars are disabled."""

    def __init__(self, bar, task_id) -> None:
        self._bar, self._id = bar, task_id

    def advance(self, amount: float = 1, description: str | None = None) -> None:
        if self._bar is not None:
            extra = {} if description is None else {"description": description}
            self._bar.update(self._id, advance=amount, **extra)

    def total(self, total: float) -> None:
        if self._bar is not None:
            self._bar.update(self._id, total=total)


@contextmanager
def task(description: str, total: float | None = None) -> Iterator[Task]:
    """A progress bar for `total` steps (None: indeterminate), removed when the work ends."""
    if not enabled():
        yield Task(None, None)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                   transient=True)
    with bar:
        yield Task(bar, bar.add_task(description, total=total))


__all__ = ["Task", "enabled", "set_quiet", "task"]
