"""Progress for long work, wherever it runs, on stderr; nothing under ``--quiet`` (:func:`set_quiet`).

- On a terminal: rich progress bars, removed when the work ends.
- In a Jupyter notebook: the same bars, which rich draws as a notebook widget.
- Anywhere else (a log file, CI, a pipe): one line (``[genprobe] ...``, apart from the
  ``genprobe: ...`` lines of errors) every :data:`LINE_EVERY` seconds at most, with the count,
  the share done, the time spent and an estimate of the time left, and a last line when a task
  that reported ends — so a job that runs ten minutes in a log is never silent.

Probes report their work with one context manager; the library never prints otherwise::

    with progress.task("robustness", total=len(units)) as bar:
        for unit in units:
            ...
            bar.advance()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

LINE_EVERY = 30.0
"""Seconds between two progress lines on a stream that is not a terminal (the first comes after
this long too: short work prints nothing)."""

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or allow) every progress report of this process."""
    global _quiet
    _quiet = bool(quiet)


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (an IPython shell with a kernel attached)."""
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell is not None else None
    except Exception:  # noqa: BLE001 - any failure means: not a notebook we can draw in
        return False
    return ip is not None and getattr(ip, "kernel", None) is not None


def mode() -> str | None:
    """``"bar"`` (a terminal or a notebook), ``"lines"`` (any other stream), or None (quiet)."""
    if _quiet:
        return None
    return "bar" if sys.stderr.isatty() or in_notebook() else "lines"


def enabled() -> bool:
    """Whether progress is reported at all (not under ``--quiet``)."""
    return mode() is not None


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Task:
    """A running task; ``advance`` works (and costs nothing) when progress is off."""

    def __init__(self, bar, task_id) -> None:
        self._bar, self._id = bar, task_id

    def advance(self, amount: float = 1, description: str | None = None) -> None:
        if self._bar is not None:
            extra = {} if description is None else {"description": description}
            self._bar.update(self._id, advance=amount, **extra)

    def total(self, total: float) -> None:
        if self._bar is not None:
            self._bar.update(self._id, total=total)


class _Lines:
    """The ``update`` of a rich Progress, written as occasional lines to a plain stream."""

    def __init__(self, description: str, total: float | None) -> None:
        self.description, self.total, self.done = description, total, 0.0
        self.clock = time.monotonic
        self.began = self.last = self.clock()
        self.reported = False

    def update(self, _task_id, *, advance: float = 0, total: float | None = None,
               description: str | None = None) -> None:
        self.done += advance
        if total is not None:
            self.total = total
        if description is not None:
            self.description = description
        now = self.clock()
        if now - self.last >= LINE_EVERY:
            self.last = now
            self.reported = True
            self._write(now)

    def _write(self, now: float, end: bool = False) -> None:
        spent = now - self.began
        if end:
            text = f"{self.description}: done in {_duration(spent)}"
        elif self.total:
            share = self.done / self.total
            left = (f", about {_duration(spent * (1 - share) / share)} left" if share > 0
                    else "")
            text = (f"{self.description}: {self.done:g}/{self.total:g} ({share:.0%}), "
                    f"{_duration(spent)} spent{left}")
        else:
            text = f"{self.description}: {self.done:g} done, {_duration(spent)} spent"
        print(f"[genprobe] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.reported:
            self._write(self.clock(), end=True)


@contextmanager
def task(description: str, total: float | None = None) -> Iterator[Task]:
    """Progress of `total` steps (None: indeterminate) while the block runs (see the module
    docstring for where and how it shows)."""
    how = mode()
    if how is None:
        yield Task(None, None)
        return
    if how == "lines":
        lines = _Lines(description, total)
        yield Task(lines, None)
        lines.close()  # not on an exception: an interrupted task is not done
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


__all__ = ["LINE_EVERY", "Task", "enabled", "in_notebook", "mode", "set_quiet", "task"]
