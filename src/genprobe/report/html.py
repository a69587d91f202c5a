"""The HTML of a report: one self-contained page, nothing fetched.

Figures are ``<img>`` elements whose source is a ``data:image/svg+xml`` URI (each SVG its own
document, so element ids of different figures never clash); styles are inline; there are no
scripts, fonts or links to load. The page's Content-Security-Policy (:data:`CSP`) forbids every
fetch but those data URIs, so a viewer never reaches the network even if a figure held a URL.

The ``<meta name="generator" content="genprobe ...">`` element near the top of the page is
genprobe's proof that it wrote the file: ``genprobe report --out FILE`` replaces an existing
FILE only when it carries it (:func:`written_by_genprobe`).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .._version import __version__

GENERATOR = "genprobe"
"""The generator named in every page (and in the JSON export's ``generator`` key)."""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
"""Content-Security-Policy of the page: no fetch at all, but the inline figures and styles."""
MAX_ROWS = 40
"""Rows of a table shown in the page (the JSON export and the result directory hold them all)."""
_PROOF = re.compile(rb'<meta name="generator" content="genprobe[ "]')

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
       max-width: 72rem; padding: 1rem 2rem 4rem; color: #1a1a1a; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.3rem; border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2.2rem; }
h3 { font-size: 1.1rem; margin-top: 1.6rem; }
p, li, figcaption { overflow-wrap: anywhere; }  /* run ids and paths are long unbroken words */
p.sub { color: #555; margin-top: 0; }
p.reading { font-size: 1.02rem; background: #f4f7fb; border-left: 4px solid #0072B2;
            padding: 0.6rem 0.9rem; }
figure { margin: 0.8rem 0; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #555; font-size: 0.9rem; }
table { border-collapse: collapse; font-size: 0.86rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #d0d0d0; padding: 0.2rem 0.5rem; text-align: right; }
th { background: #f0f0f0; }
td.text, th.text { text-align: left; }
code { background: #f0f0f0; padding: 0 0.2rem; }
details { margin: 0.5rem 0; }
summary { cursor: pointer; color: #0072B2; }
nav ul { columns: 2; }
.scroll { overflow-x: auto; max-width: 100%; }
.note { color: #8a4b00; }
.failed { color: #b00020; font-weight: bold; }
"""


def escape(text: Any) -> str:
    """`text` as HTML-escaped text."""
    return html.escape(str(text), quote=True)


def format_value(value: Any) -> str:
    """A cell as the page prints it: numbers to 4 significant digits, NaN as an empty cell."""
    if isinstance(value, bool):
        return str(value)
    if value is None or (not isinstance(value, (list, tuple, dict)) and pd.isna(value)):
        return ""  # None, NaN, pandas' NA
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.4g}"
    return str(value)


def table(frame: pd.DataFrame, *, max_rows: int = MAX_ROWS) -> str:
    """An HTML table of `frame` (its first `max_rows` rows, and a note saying how many more), in a
    box that scrolls sideways when the table is wider than the page."""
    shown = frame.head(max_rows)
    text_columns = {c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])
                    or pd.api.types.is_bool_dtype(frame[c])}
    head = "".join(f'<th class="{"text" if c in text_columns else "num"}">{escape(c)}</th>'
                   for c in frame.columns)
    rows = []
    for record in shown.itertuples(index=False):
        cells = "".join(
            f'<td class="{"text" if c in text_columns else "num"}">{escape(format_value(v))}</td>'
            for c, v in zip(frame.columns, record, strict=True))
        rows.append(f"<tr>{cells}</tr>")
    more = (f'<p class="sub">… and {len(frame) - max_rows} more rows (all of them are in the '
            "JSON export).</p>" if len(frame) > max_rows else "")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}'
            f"</tbody></table></div>{more}")


def key_values(pairs: Mapping[str, Any]) -> str:
    """A two-column table of name → value."""
    rows = "".join(f'<tr><th class="text">{escape(k)}</th><td class="text">{escape(format_value(v))}</td></tr>'
                   for k, v in pairs.items())
    return f'<div class="scroll"><table><tbody>{rows}</tbody></table></div>'


def figure(svg: str, alt: str, caption: str = "") -> str:
    """An ``<img>`` of an SVG document, as a data URI."""
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return (f'<figure><img class="figure" src="data:image/svg+xml;base64,{data}" '
            f'alt="{escape(alt)}">{cap}</figure>')


def page(title: str, subtitle: str, body: Iterable[str]) -> str:
    """The whole document."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta name="generator" content="{GENERATOR} {escape(__version__)}">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{escape(title)}</h1>\n<p class=\"sub\">{escape(subtitle)}</p>\n"
        + "\n".join(body) + "\n</body>\n</html>\n")


def written_by_genprobe(path: Path) -> bool:
    """Whether the HTML file `path` carries genprobe's generator proof in its head."""
    try:
        with open(path, "rb") as f:
            return bool(_PROOF.search(f.read(4096)))
    except OSError:
        return False


__all__ = ["CSP", "GENERATOR", "MAX_ROWS", "escape", "figure", "format_value", "key_values",
           "page", "table", "written_by_genprobe"]
