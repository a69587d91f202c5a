"""One style for every figure genprobe draws: sizes, colours, and how figures are written.

Figures are :class:`matplotlib.figure.Figure` objects built without pyplot (no global figure
manager, nothing to close, safe in threads and on a headless machine). A probe's ``plot()`` is
decorated with :func:`styled`, so everything it draws follows :data:`STYLE`::

    @styled
    def plot(self):
        fig = new_figure(6.0, 4.2)
        ax = fig.add_subplot()
        ...
        return fig

Colours are chosen for readers with colour-vision deficiencies: lines cycle through the
Okabe–Ito palette (:data:`PALETTE`); ordered quantities use viridis (:data:`SEQUENTIAL`) or
cividis (:data:`SEQUENTIAL_ALT`); signed quantities around 0 use ColorBrewer's red–blue
(:data:`DIVERGING`), whose two ends stay distinct under every common deficiency.

:func:`save_figure` writes ``STEM.png`` and ``STEM.svg`` atomically; :func:`to_svg` gives the SVG
text (text drawn as paths: it renders the same everywhere, with no font to fetch).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .outputs import write_atomic

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not with genprobe
    from matplotlib.figure import Figure

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000",
           "#F0E442")
"""Okabe & Ito's colour-blind-safe palette (blue, orange, bluish green, vermillion, reddish
purple, sky blue, black, yellow), in the order lines take them: the first four stay distinct
under protanopia, deuteranopia and tritanopia; yellow, faint on white, comes last."""
BLUE, ORANGE, GREEN, VERMILLION, PURPLE, SKY, BLACK, YELLOW = PALETTE
GREY = "#7F7F7F"
"""Neutral marks (reference lines, bars with no category)."""
SEQUENTIAL = "viridis"
"""Colour map of ordered quantities (error, loss): perceptually uniform, colour-blind safe."""
SEQUENTIAL_ALT = "cividis"
"""A second sequential map, optimized for deuteranopia, for a figure holding two unrelated maps."""
DIVERGING = "RdBu_r"
"""Colour map of signed quantities centred on 0 (stiffness): blue negative, red positive."""

DPI = 120
"""Resolution of saved PNGs (dots per inch of the figure size)."""

STYLE: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 8,
    "figure.titlesize": 11,
    "image.cmap": SEQUENTIAL,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "legend.frameon": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    "svg.fonttype": "path",  # text as outlines: no font file needed to view the SVG
    "svg.hashsalt": "genprobe",  # stable element ids: the same figure gives the same file
}
"""The rcParams every genprobe figure is drawn under (:func:`style`), besides the line colours:
``axes.prop_cycle`` cycles through :data:`PALETTE`."""

F = TypeVar("F", bound=Callable[..., "Figure"])


@contextmanager
def style() -> Iterator[None]:
    """Draw under :data:`STYLE` (matplotlib reads rcParams when an artist is created, so the
    whole drawing, not only the Figure's creation, must run inside)."""
    from cycler import cycler
    from matplotlib import rc_context

    with rc_context(STYLE | {"axes.prop_cycle": cycler(color=PALETTE)}):
        yield


def styled(plot: F) -> F:
    """Decorator: run a function that returns a Figure under :func:`style`."""

    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with style():
            return plot(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def new_figure(width: float, height: float, *, layout: str = "constrained") -> Figure:
    """An empty Figure of `width` × `height` inches, built without pyplot, under :data:`STYLE`'s
    face colour and layout (call it inside :func:`style` or a :func:`styled` function)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout=layout, facecolor="white")


def to_svg(fig: Figure) -> str:
    """The figure as SVG text (self-contained: text as paths, images inlined)."""
    buffer = io.StringIO()
    with style():
        fig.savefig(buffer, format="svg", metadata={"Date": None})  # the same figure, the same file
    return buffer.getvalue()


def to_png(fig: Figure) -> bytes:
    """The figure as PNG bytes, at :data:`DPI`."""
    buffer = io.BytesIO()
    with style():
        fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_figure(fig: Figure, stem: str | Path) -> tuple[Path, Path]:
    """Write `fig` to ``STEM.png`` and ``STEM.svg`` (each atomically); return both paths."""
    stem = Path(stem)
    png, svg = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")
    svg_text, png_bytes = to_svg(fig), to_png(fig)  # SVG first: as to_svg(fig) would draw it
    write_atomic(png, lambda tmp: tmp.write_bytes(png_bytes))
    write_atomic(svg, lambda tmp: tmp.write_text(svg_text))
    return png, svg


__all__ = ["BLACK", "BLUE", "DIVERGING", "DPI", "GREEN", "GREY", "ORANGE", "PALETTE", "PURPLE",
           "SEQUENTIAL", "SEQUENTIAL_ALT", "SKY", "STYLE", "VERMILLION", "YELLOW", "new_figure",
           "save_figure", "style", "styled", "to_png", "to_svg"]
