"""The report of a sweep: how well each measure ranks the runs by generalization gap, the
measures against the gap, the table of runs, and a section per run.

The ranking is :func:`genprobe.measures.rank_correlation` over the finished runs of the sweep's
``table.parquet``, drawn by :func:`genprobe.measures.plot_rank_correlation`. Each finished run gets
its training reading and every probe's reading; with at most :data:`RUN_FIGURES` finished runs,
also the figures (folded), so a small sweep's report is one page holding everything.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .. import progress
from ..errors import GenprobeError, RunError, one_line
from ..figures import to_svg
from ..results import names
from . import html as H
from .document import clean
from .runs import RunContent, anchor, build_run, count_figures, probe_dirs, probe_section

logger = logging.getLogger(__name__)

RUN_FIGURES = 12
"""Sweeps with at most this many finished runs show every run's figures in their report; larger
ones show the readings (each run's own report, ``genprobe report SWEEP/runs/ID``, has its figures)."""
PLOTTED_MEASURES = 12
"""The ranking figure draws the measures most correlated with the gap, at most this many (the
table lists them all): beyond a dozen scatter panels the figure is unreadable, and slow to draw."""
RUNS_DIR = "runs"
SWEEP_FILE = "sweep.yaml"
RESULT_COLUMNS = ("train_error", "test_error", "gap", "train_loss", "test_loss", "loss_gap")


@dataclass
class SweepContent:
    """A sweep's report content: ``doc`` (JSON-able), the figures' SVG text by key, and the
    finished runs' contents."""

    sweep: Path
    doc: dict[str, Any]
    subtitle: str
    figures: dict[str, str] = field(default_factory=dict)
    runs: list[RunContent] = field(default_factory=list)


def _read_config(sweep: Path) -> dict[str, Any]:
    path = sweep / SWEEP_FILE
    try:
        config = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        logger.warning("report: %s is unreadable (%s)", path, exc)
        return {}
    return config if isinstance(config, dict) else {}


def ranking_reading(ranking: pd.DataFrame, n_models: int) -> str:
    """One paragraph on the ranking: the measures most and least correlated with the gap."""
    target = ranking.attrs.get("target", "gap")
    hp = ranking.attrs.get("hyperparameters", [])
    scored = ranking.dropna(subset=["kendall_tau"])
    varied = f"varying {names(list(hp), 6)}" if hp else "with no varied hyper-parameter"
    if scored.empty:
        return (f"Over {n_models} finished runs ({varied}), no measure has a rank correlation with "
                f"the {target}: each is constant over the runs, or the {target} is.")
    scored = scored[scored["n_models"] == scored["n_models"].max()]  # τ over the most runs
    order = scored.reindex(scored["kendall_tau"].abs().sort_values(ascending=False, kind="stable").index)
    best, worst = order.iloc[0], order.iloc[-1]
    direction = "grows" if best["kendall_tau"] > 0 else "falls"
    granulated = ("" if not math.isfinite(best["granulated_tau"]) else
                  f", granulated τ {best['granulated_tau']:.2f}")
    cmi = "" if not math.isfinite(best["cmi"]) else f", CMI {best['cmi']:.2f}"
    over = "" if int(best["n_models"]) == n_models else f" (over the {int(best['n_models'])} runs where it is defined)"
    text = (f"Over {n_models} finished runs ({varied}), the measure most correlated with the "
            f"{target} is {best['measure']}{over}: Kendall's τ = {best['kendall_tau']:.2f}"
            f"{granulated}{cmi} (it {direction} as the {target} grows). The least correlated is "
            f"{worst['measure']} (τ = {worst['kendall_tau']:.2f}).")
    positive = int((scored["kendall_tau"] > 0).sum())
    text += (f" {positive} of {len(scored)} measures grow with the {target}, "
             f"{len(scored) - positive} fall or do not move.")
    if n_models < 10:
        pairs = n_models * (n_models - 1) // 2
        text += (f" With only {n_models} models ({pairs} pairs) these correlations are coarse; a "
                 "larger sweep ranks the measures reliably.")
    return text


def strongest(ranking: pd.DataFrame, limit: int = PLOTTED_MEASURES) -> pd.DataFrame:
    """The `limit` rows of `ranking` with the largest |Kendall τ| (undefined τ last)."""
    order = ranking["kendall_tau"].abs().sort_values(ascending=False, na_position="last", kind="stable")
    top = ranking.loc[order.index[:limit]]
    top.attrs = dict(ranking.attrs)
    return top


def _runs_table(table: pd.DataFrame, hyper: list[str]) -> pd.DataFrame:
    columns = ["run", *hyper, *[c for c in RESULT_COLUMNS if c in table.columns], "status", "error"]
    return table[[c for c in columns if c in table.columns]]


def _measures_table(table: pd.DataFrame, measures: list[str]) -> pd.DataFrame:
    """Measures (rows) × runs (columns)."""
    done = table[table["status"] == "done"]
    frame = done.set_index("run")[measures].T
    frame.insert(0, "measure", frame.index)
    return frame.reset_index(drop=True)


def build_sweep(sweep: Path) -> SweepContent:
    """Read a sweep directory into a :class:`SweepContent` (RunError, one line, when it has no
    finished run)."""
    from .. import measures as M

    sweep = Path(sweep)
    table = M.read_sweep_table(sweep)
    config = _read_config(sweep)
    info = table.attrs.get("genprobe", {})
    hyper = [h for h in info.get("hyperparameters", []) if h in table.columns]
    measures = [m for m in info.get("measures", [c for c in table.columns if "." in str(c)])
                if m in table.columns]
    if "status" not in table.columns or not (table["status"] == "done").any():
        raise RunError(f"sweep {sweep} has no finished runs yet: run `genprobe sweep CONFIG --out "
                       f"{sweep}` (it resumes where it stopped), then `genprobe report {sweep}`")
    done = table[table["status"] == "done"].reset_index(drop=True)
    done.attrs = table.attrs
    doc: dict[str, Any] = {"name": sweep.name, "path": str(sweep), "config": config,
                           "hyperparameters": hyper, "measures": measures,
                           "runs_total": len(table), "runs_done": len(done),
                           "runs_failed": int((table["status"] == "failed").sum())}
    content = SweepContent(sweep, doc, "")
    ranking = None
    if measures:
        try:
            ranking = M.rank_correlation(done, target="gap", measures=measures)
        except GenprobeError as exc:
            doc["ranking_note"] = f"no ranking: {one_line(exc)}"
    else:
        doc["ranking_note"] = ("no ranking: the sweep computed no measures (give it probes, or "
                               "baselines: true)")
    if ranking is not None:
        doc["ranking"] = ranking.to_dict(orient="records")
        doc["ranking_attrs"] = dict(ranking.attrs)
        doc["ranking_reading"] = ranking_reading(ranking, len(done))
    doc["table"] = table.to_dict(orient="records")
    run_dirs = [sweep / RUNS_DIR / str(r) for r in done["run"]]
    with_results = [d for d in run_dirs if d.is_dir() and probe_dirs(d)]
    draw = len(done) <= RUN_FIGURES
    total = (1 if ranking is not None else 0) + (sum(count_figures(d) for d in with_results) if draw else 0)
    with progress.task(f"report of {sweep}", total=total) as bar:
        if ranking is not None:
            content.figures["ranking"] = to_svg(M.plot_rank_correlation(done, strongest(ranking)))
            bar.advance()
        doc["runs"] = []
        for run_dir in run_dirs:
            try:
                run = build_run(run_dir, figures=draw, on_figure=bar.advance,
                                require_results=False)
            except RunError as exc:
                doc["runs"].append({"name": run_dir.name, "error": str(exc)})
                continue
            content.runs.append(run)
            doc["runs"].append(run.doc)
    content.doc = clean(doc)
    content.subtitle = (f"{len(done)} of {len(table)} runs finished"
                        + (f" ({doc['runs_failed']} failed)" if doc["runs_failed"] else "")
                        + (f" · varying {names(hyper, 6)}" if hyper else "")
                        + f" · {len(measures)} measures")
    return content


def sweep_body(content: SweepContent) -> list[str]:
    """The HTML sections of a sweep's report."""
    doc = content.doc
    table = pd.DataFrame(doc["table"])
    body = ['<nav><ul><li><a href="#ranking">ranking of the measures</a></li>'
            '<li><a href="#runs">runs</a></li>'
            + "".join(f'<li><a href="#{anchor("run-" + r.run.name)}">{H.escape(r.run.name)}</a></li>'
                      for r in content.runs)
            + '<li><a href="#provenance">provenance</a></li></ul></nav>']
    body.append('<section id="ranking"><h2>How well each measure ranks the runs by generalization gap</h2>')
    if "ranking" in doc:
        body.append(f'<p class="reading">{H.escape(doc["ranking_reading"])}</p>')
        ranking = pd.DataFrame(doc["ranking"])
        undefined = list(ranking.loc[ranking["kendall_tau"].isna(), "measure"])
        ranking = ranking.dropna(subset=["kendall_tau"])
        ranking = ranking.reindex(ranking["kendall_tau"].abs().sort_values(
            ascending=False, kind="stable").index)
        body.append("<p>Kendall's τ-b of each measure with the gap (test − train error) over the "
                    "finished runs; granulated τ: the mean over hyper-parameters of τ among runs "
                    "that differ in that one (Jiang et al. 2020); CMI: the conditional mutual "
                    "information score of the PGDL competition (0 to 1, blind to the sign).</p>")
        body.append(H.table(ranking, max_rows=len(ranking)))
        if undefined:
            body.append(f'<p class="sub">No rank correlation (constant over the runs, or defined '
                        f'in fewer than two): {H.escape(", ".join(undefined))}.</p>')
        if "ranking" in content.figures:
            shown = min(len(ranking), PLOTTED_MEASURES)
            body.append(H.figure(content.figures["ranking"], "rank correlations and measures "
                                 "against the gap", f"Top: the rank correlations of the {shown} "
                                 "measures most correlated with the gap. Below: the gap against "
                                 "each of them, one point per run."))
    else:
        body.append(f'<p class="note">{H.escape(doc.get("ranking_note", "no ranking"))}</p>')
    body.append("</section>")
    body.append('<section id="runs"><h2>Runs</h2>')
    body.append(H.table(_runs_table(table, doc["hyperparameters"]), max_rows=200))
    if doc["measures"] and doc["runs_done"] <= RUN_FIGURES:
        body.append("<h3>Measures of each run</h3>"
                    + H.table(_measures_table(table, doc["measures"]), max_rows=len(doc["measures"])))
    body.append("</section>")
    for run, entry in zip(content.runs, [d for d in doc["runs"] if "error" not in d], strict=True):
        body.append(_run_section(run, entry))
    for entry in doc["runs"]:
        if "error" in entry:
            body.append(f'<section><h2>{H.escape(entry["name"])}</h2><p class="failed">'
                        f'{H.escape(entry["error"])}</p></section>')
    return body


def _run_section(run: RunContent, doc: dict[str, Any]) -> str:
    prefix = f"run-{run.run.name}-"
    parts = [f'<section id="{anchor("run-" + run.run.name)}"><h2>Run {H.escape(run.run.name)}</h2>',
             f'<p class="reading">{H.escape(doc["training_reading"])}</p>']
    if "training" in run.figures:
        parts.append("<details><summary>training curves</summary>"
                     + H.figure(run.figures["training"], f"training curves of {run.run.name}")
                     + "</details>")
    for entry in doc["probes"]:
        parts.append(probe_section(entry, run.figures.get(f"probe:{entry['probe']}"), level=3,
                                   prefix=prefix, fold=True))
    if not doc["probes"]:
        parts.append('<p class="note">no probe results in this run</p>')
    parts.append("</section>")
    return "\n".join(parts)


__all__ = ["RUN_FIGURES", "SweepContent", "build_sweep", "ranking_reading", "sweep_body"]
