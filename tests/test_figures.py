"""One figure style: every registered probe's figure uses colour-blind-safe colours and readable
text; figures are written as PNG and SVG, atomically, and the SVG needs nothing outside itself."""

from __future__ import annotations

import re

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import to_rgba
from matplotlib.image import AxesImage
from matplotlib.text import Text

from foreign import make_subject
from genprobe import figures as F
from genprobe.probes.registry import get_probe, list_probes
from genprobe.results import FILES, result_file

pytestmark = pytest.mark.usefixtures("one_thread")

ALLOWED_MAPS = {F.SEQUENTIAL, F.SEQUENTIAL_ALT, F.DIVERGING}
_VIRIDIS = colormaps["viridis"](np.linspace(0, 1, 256))


def _allowed_colour(colour) -> bool:
    """An Okabe–Ito colour, grey, black or white, or a sample of viridis (ordered series)."""
    rgba = np.array(to_rgba(colour))
    if rgba[3] == 0:
        return True
    fixed = [to_rgba(c) for c in (*F.PALETTE, F.GREY, "black", "white", "none")]
    if any(np.allclose(rgba[:3], f[:3], atol=1e-3) for f in fixed):
        return True
    return bool(np.abs(_VIRIDIS[:, :3] - rgba[:3]).max(axis=1).min() < 2e-3)


@pytest.fixture(scope="module")
def subject():
    return make_subject("nested", n_train=24, n_test=18, checkpoints=2)


@pytest.mark.parametrize("probe", list_probes())
def test_every_probe_figure_is_colour_blind_safe_and_readable(probe, subject):
    spec = get_probe(probe)
    fig = spec.function(subject, **spec.tiny).plot()
    for ax in fig.axes:
        for line in ax.get_lines():
            assert _allowed_colour(line.get_color()), (probe, line.get_label(), line.get_color())
        for image in ax.get_images():
            assert isinstance(image, AxesImage) and image.get_cmap().name in ALLOWED_MAPS, \
                (probe, image.get_cmap().name)
        for collection in ax.collections:  # colour-mapped, or drawn in allowed colours
            if collection.get_array() is not None and collection.get_cmap().name in ALLOWED_MAPS:
                continue
            colours = [*collection.get_facecolor(), *collection.get_edgecolor()]
            assert all(_allowed_colour(c) for c in colours), (probe, type(collection).__name__)
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_text().strip()]
    assert sizes and min(sizes) >= 7, (probe, min(sizes))


@F.styled
def _figure():
    fig = F.new_figure(4, 3)
    ax = fig.add_subplot()
    ax.plot([0, 1, 2], [1, 0, 2], label="a line")
    ax.imshow(np.arange(12.0).reshape(3, 4))
    ax.set_title("title with θ⁰ and σ")
    ax.legend()
    return fig


def test_save_figure_writes_png_and_svg_that_need_nothing_else(tmp_path):
    png, svg = F.save_figure(_figure(), tmp_path / "figure")
    assert png == tmp_path / "figure.png" and svg == tmp_path / "figure.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = svg.read_text()
    assert "<svg" in text and "<text" not in text  # text drawn as paths: no font needed
    refs = re.findall(r'(?:xlink:)?href="([^"]*)"', text)
    assert refs and all(r.startswith(("#", "data:")) for r in refs), set(refs) - {"#"}
    assert F.to_svg(_figure()) == text  # the same figure gives the same file (no date, fixed ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png", "figure.svg"]


def test_line_colours_follow_the_okabe_ito_palette():
    with F.style():
        fig = F.new_figure(4, 3)
        ax = fig.add_subplot()
        lines = [ax.plot([0, 1], [i, i])[0] for i in range(4)]
    assert [to_rgba(line.get_color()) for line in lines] == [to_rgba(c) for c in F.PALETTE[:4]]


def test_result_save_writes_both_figure_files(subject, tmp_path):
    spec = get_probe("robustness")
    out = spec.function(subject, **spec.tiny).save(tmp_path / "r", figure=True)
    assert (out / "figure.png").is_file() and (out / "figure.svg").is_file()
    assert {"figure.png", "figure.svg"} <= set(FILES) and result_file("figure.svg")
