"""Progress everywhere: bars on a terminal or in a notebook, periodic lines with an estimate on
any other stream, nothing under --quiet."""

from __future__ import annotations

import sys
import types

import pytest

from genprobe import progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    monkeypatch.setattr(progress, "_quiet", False)
    return c


def test_a_plain_stream_gets_a_line_every_interval_with_an_estimate(clock, capsys):
    with progress.task("robustness", total=40) as bar:
        for _ in range(10):
            clock.now += 3.0  # 10 steps in 30 s
            bar.advance()
        for _ in range(10):
            clock.now += 3.0
            bar.advance()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["[genprobe] robustness: 10/40 (25%), 30 s spent, about 1 min 30 s left",
                     "[genprobe] robustness: 20/40 (50%), 1 min 00 s spent, about 1 min 00 s left",
                     "[genprobe] robustness: done in 1 min 00 s"]


def test_short_work_prints_nothing_and_an_interruption_is_not_done(clock, capsys):
    with progress.task("quick", total=3) as bar:
        clock.now += 5
        bar.advance(3)
    assert capsys.readouterr().err == ""
    with pytest.raises(KeyboardInterrupt), progress.task("long", total=None) as bar:
        clock.now += progress.LINE_EVERY
        bar.advance(7)
        raise KeyboardInterrupt
    assert capsys.readouterr().err.splitlines() == ["[genprobe] long: 7 done, 30 s spent"]


def test_quiet_silences_everything(clock, capsys):
    progress.set_quiet(True)
    try:
        assert progress.mode() is None
        with progress.task("silent", total=2) as bar:
            clock.now += 100
            bar.advance(2)
    finally:
        progress.set_quiet(False)
    assert capsys.readouterr().err == ""


def test_the_mode_follows_where_stderr_goes(monkeypatch):
    monkeypatch.setattr(progress, "_quiet", False)
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: False))
    assert progress.mode() == "lines" and not progress.in_notebook()
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: True))
    assert progress.mode() == "bar"
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: False))
    kernel = types.SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel))
    assert progress.in_notebook() and progress.mode() == "bar"
    terminal = types.SimpleNamespace(kernel=None)  # IPython in a terminal: not a notebook
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: terminal))
    assert not progress.in_notebook()
