"""Reports: one self-contained HTML page (and its JSON export) for a run or a sweep.

``gp.report(path)`` / ``genprobe report RUN|SWEEP`` writes ``PATH/report.html`` and
``PATH/report.json`` (or ``--out FILE.html`` and ``FILE.json`` beside it):

- a run (written by ``genprobe train``, with results from ``genprobe probe``): its training
  curves, then, for every registered probe with a result under ``RUN/probes/``, a plain-language
  reading generated from the numbers, the figure, the summary measures, the table, and the
  provenance of the numbers (genprobe version, options, seed, machine, self-check);
- a sweep (written by ``genprobe sweep``): how well each measure ranks the runs by their
  generalization gap (Kendall's τ, granulated τ), the measures against the gap, the table of
  runs, and each run's readings.

The page needs nothing but itself: figures are SVG data URIs, styles are inline, there are no
scripts, fonts or remote resources, and its Content-Security-Policy forbids any fetch.
The JSON export holds the same content (numbers, readings, provenance), figures left out.

Ownership: genprobe replaces an existing output file only when it wrote it: an HTML page whose
head carries ``<meta name="generator" content="genprobe ...">``, a JSON file whose first key is
``"generator": "genprobe"``. Anything else is refused before any work (OutputError); both files
are written atomically.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from .. import outputs, progress, store
from .._version import __version__
from ..errors import ConfigError, OutputError, RunError
from ..results import Result, machine
from . import document, html
from .runs import build_run, count_figures, run_body, summary_line

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
SWEEP_MARK = outputs.MARKS["sweep"]
"""The marker file of a sweep directory (written by ``genprobe sweep``)."""


def kind_of(path: Path) -> str:
    """``"run"`` or ``"sweep"``; RunError (one line) when `path` is neither."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path} does not exist; pass a run directory (written by `genprobe train`) "
                       "or a sweep directory (written by `genprobe sweep`)")
    if not path.is_dir():
        raise RunError(f"{path} is a file; pass a run directory (written by `genprobe train`) or "
                       "a sweep directory (written by `genprobe sweep`)")
    if (path / SWEEP_MARK).is_file():
        return "sweep"
    if (path / store.CONFIG).is_file():
        store.read_config(path)  # a corrupt config is its own one-line error
        return "run"
    raise RunError(f"{path} is neither a run directory (it has no {store.CONFIG}: write one with "
                   f"`genprobe train`) nor a sweep directory (no {SWEEP_MARK}: `genprobe sweep`)")


def output_paths(path: Path, out: str | Path | None) -> tuple[Path, Path]:
    """(HTML, JSON) paths of the report of `path` (default inside it), checked: each is absent
    or a file genprobe wrote; OutputError (one line) otherwise."""
    if out is None:
        page = Path(path) / REPORT_HTML
    else:
        page = Path(out)
        if page.suffix.lower() not in (".html", ".htm"):
            raise ConfigError(f"--out {page}: name an .html file (the JSON export is written beside "
                              "it, with .json)")
    data = page.with_suffix(".json")
    for file, owned, proof in ((page, html.written_by_genprobe,
                                '<meta name="generator" content="genprobe"> in its head'),
                               (data, document.written_by_genprobe,
                                '"generator": "genprobe" as its first key')):
        outputs.check_creatable(file.parent, "report folder")
        if not file.parent.is_dir():
            raise OutputError(f"report folder {file.parent} does not exist; create it, or choose "
                              "another --out")
        if not os.access(file.parent, os.W_OK | os.X_OK):
            raise OutputError(f"report folder {file.parent} is not writable; choose another --out")
        if file.is_dir():
            raise OutputError(f"report {file} is a directory; name a file for --out")
        if file.exists() and not owned(file):
            raise OutputError(f"report {file} already exists and was not written by genprobe (no "
                              f"{proof}); genprobe replaces only what it wrote: choose another "
                              "--out, or move that file away")
    return page, data


def report(path, out: str | Path | None = None) -> Path:
    """Write the report of a run or sweep directory `path`, or of results computed in Python (a
    :class:`~genprobe.Result`, or a list of them, on any Subject); return the HTML file's path.

    `out`: the HTML file (default ``PATH/report.html``; required for results); the JSON export
    goes beside it, with ``.json``. Errors (one line each, before any work): `path` is neither a
    run nor a sweep nor results, a run has no probe results yet, a sweep has no finished runs,
    `out` is missing for results, its folder does not exist, or it exists and genprobe did not
    write it."""
    results = _as_results(path)
    if results is not None:
        return _report_results(results, out)
    path = Path(path)
    kind = kind_of(path)
    page, data = output_paths(path, out)
    about = _about(kind, str(path))
    if kind == "run":
        from .runs import check_has_results

        check_has_results(path)
        with progress.task(f"report of {path}", total=count_figures(path)) as bar:
            content = build_run(path, on_figure=bar.advance)
        doc = {**about, "run": content.doc}
        title = f"genprobe report: {path.name}"
        body = run_body(content) + [_provenance_section(about, content.doc["config"])]
        subtitle = summary_line(content.doc)
    else:
        from .sweeps import build_sweep, sweep_body

        content = build_sweep(path)
        doc = {**about, "sweep": content.doc}
        title = f"genprobe sweep report: {path.name}"
        body = sweep_body(content) + [_provenance_section(about, content.doc.get("config", {}))]
        subtitle = content.subtitle
    text = html.page(title, subtitle, body)
    outputs.write_text_atomic(data, document.dumps(doc))
    outputs.write_text_atomic(page, text)
    return page


def _about(kind: str, path: str | None) -> dict:
    """The report's own provenance, first in its JSON export."""
    return {"generator": "genprobe", "genprobe_version": __version__, "kind": kind, "path": path,
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine()}


def _as_results(value) -> list[Result] | None:
    """`value` as a list of results, or None when it is a path."""
    if isinstance(value, Result):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Result) for v in value):
        return list(value)
    if isinstance(value, (str, Path)):
        return None
    raise ConfigError(f"report takes a run or sweep directory, a Result or a list of Results, got "
                      f"{type(value).__name__}")


def _report_results(results: list[Result], out: str | Path | None) -> Path:
    from .runs import build_results, results_body

    if out is None:
        raise ConfigError("a report of results computed in Python needs out=FILE.html (there is "
                          "no run directory to write it into)")
    page, data = output_paths(Path("."), out)
    about = _about("results", None)
    with progress.task("report of results", total=len(results)) as bar:
        content, figures = build_results(results, on_figure=bar.advance)
    doc = {**about, "results": content}
    probes = [e["probe"] for e in content["probes"]]
    body = results_body(content, figures) + [_provenance_section(about, None)]
    text = html.page("genprobe report", f"{len(probes)} result{'s' if len(probes) != 1 else ''}: "
                     f"{', '.join(probes)}", body)
    outputs.write_text_atomic(data, document.dumps(doc))
    outputs.write_text_atomic(page, text)
    return page


def _provenance_section(about: dict, config: dict | None) -> str:
    from .runs import flatten

    report_rows = {"written by": f"genprobe {about['genprobe_version']}", "written at": about["written"],
                   **{f"machine {k}": v for k, v in about["machine"].items()}}
    source = ("Every number above comes from the files of this directory" if config is not None
              else "Every number above comes from the results passed to genprobe.report")
    return ('<section id="provenance"><h2>Provenance</h2>'
            f"<p>{source}; each probe section lists the genprobe version, options, seed and "
            "machine of its result.</p>"
            "<h3>This report</h3>" + html.key_values(report_rows)
            + ("" if config is None else "<h3>Configuration</h3>" + html.key_values(flatten(config)))
            + "</section>")


__all__ = ["REPORT_HTML", "REPORT_JSON", "SWEEP_MARK", "kind_of", "output_paths", "report"]
