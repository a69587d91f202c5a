"""The report of a sweep: how well each measure ranks the runs by generalization gap, the
measures against the gap, the table of runs, where the study's time went (:func:`cost_table`),
and a section per run.

The ranking is :func:`genprobe.measures.rank_sweep` of the sweep's ``table.parquet`` (the runs and
measures :func:`genprobe.measures.rank_correlation` chooses, with the sweep's ``ranking`` options),
drawn by :func:`genprobe.measures.plot_rank_correlation`. Each finished run gets
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

from .. import progress
from ..errors import GenprobeError, RunError, one_line
from ..figures import to_svg
from ..outputs import jsonable
from ..results import names
from . import html as H
from .runs import RunContent, anchor, build_run, count_figures, probe_dirs, probe_section

logger = logging.getLogger(__name__)

RUN_FIGURES = 12
"""Sweeps with at most this many finished runs show every run's figures in their report; larger
ones show the readings (each run's own report, ``genprobe report SWEEP/runs/ID``, has its figures).
Such a small family's report opens with each network's readings, then the ranking (which a few
models can rarely separate); a larger one opens with the ranking."""
PLOTTED_MEASURES = 12
"""The ranking figure draws the measures most correlated with the gap, at most this many (the
table lists them all): beyond a dozen scatter panels the figure is unreadable, and slow to draw."""
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


def ranking_reading(ranking: pd.DataFrame, n_models: int | None = None) -> str:
    """One paragraph on the ranking (:func:`genprobe.measures.headline`): the best measure only
    when its interval separates it from the next."""
    from ..measures import headline

    return headline(ranking)


def strongest(ranking: pd.DataFrame, limit: int = PLOTTED_MEASURES) -> pd.DataFrame:
    """The `limit` scored rows of `ranking` (sorted strongest first)."""
    top = ranking.dropna(subset=["kendall_tau"]).iloc[:limit]
    top.attrs = dict(ranking.attrs)
    return top


RANKING_SHOWN = ("measure", "direction", "kendall_tau", "kendall_tau_low", "kendall_tau_high",
                 "granulated_tau", "granulated_tau_low", "granulated_tau_high", "cmi", "cmi_low",
                 "cmi_high", "vs_reference", "vs_reference_low", "vs_reference_high", "p_holm",
                 "n_models", "aliases")


def _ranking_table(ranking: pd.DataFrame) -> pd.DataFrame:
    """The scored measures with each score as "value [low, high]", strongest first."""
    from ..measures import format_score as cell

    scored = ranking.dropna(subset=["kendall_tau"])
    return pd.DataFrame({
        "measure": [r["measure"] + (f" (= {r['aliases']})" if r["aliases"] else "")
                    for _, r in scored.iterrows()],
        "expected": [{1: "+", -1: "−"}.get(int(r["direction"]), "·") for _, r in scored.iterrows()],
        "Kendall τ-b": [cell(r, "kendall_tau") for _, r in scored.iterrows()],
        "granulated τ": [cell(r, "granulated_tau") for _, r in scored.iterrows()],
        "CMI": [cell(r, "cmi") for _, r in scored.iterrows()],
        "vs reference": ["reference" if r["measure"] == ranking.attrs.get("options", {}).get(
            "reference") else cell(r, "vs_reference") for _, r in scored.iterrows()],
        "p (Holm)": [f"{r['p_holm']:.3f}" if r["p_holm"] is not None and math.isfinite(r["p_holm"])
                     else "–"
                     for _, r in scored.iterrows()],
        "models": [int(r["n_models"]) for _, r in scored.iterrows()],
    })


def _not_ranked_text(not_ranked: dict[str, str]) -> str:
    """The columns that are not ranked, in two groups: values that are not measures (named), and
    measures computed from the test split (counted per probe: a probe's per-layer keys are many)."""
    test = [c for c, why in not_ranked.items() if "test split" in why]
    other = sorted(c for c in not_ranked if c not in test)
    parts = []
    if other:
        parts.append("Not measures (the run's own error or loss, counts, sizes, transforms of "
                     "another value), so not ranked: " + ", ".join(other) + ".")
    if test:
        probes: dict[str, int] = {}
        for column in test:
            probes[column.split(".", 1)[0]] = probes.get(column.split(".", 1)[0], 0) + 1
        parts.append("Computed from the test split, which holds the target, so not ranked: "
                     + ", ".join(f"{p} ({k} value{'s' if k != 1 else ''})"
                                 for p, k in sorted(probes.items()))
                     + " (run those probes with split: train to rank them).")
    return " ".join(parts)


def _runs_table(table: pd.DataFrame, hyper: list[str]) -> pd.DataFrame:
    columns = ["run", *hyper, *[c for c in RESULT_COLUMNS if c in table.columns], "status", "error"]
    return table[[c for c in columns if c in table.columns]]


def _measures_table(table: pd.DataFrame, measures: list[str]) -> pd.DataFrame:
    """Measures (rows) × runs (columns)."""
    done = table[table["status"] == "done"]
    frame = done.set_index("run")[measures].T
    frame.insert(0, "measure", frame.index)
    return frame.reset_index(drop=True)


def cost_table(table: pd.DataFrame) -> pd.DataFrame:
    """Where a study's time went, from a sweep table's ``seconds_PHASE`` columns (found by their
    prefix, so a table read without its attrs works too): one row per phase (``training``, each
    probe, ``baselines``, ``user_measures``) with its ``seconds`` summed over the runs, its
    ``share`` of all phases' seconds, and its ``median_per_run`` (over the runs that have it);
    every run of the table counts, failed ones included (their time was spent too); and
    ``peak_mib``, the largest peak resident memory of a worker in the phase over the runs (its
    ``peak_mib_PHASE`` column; NaN where not measured)."""
    from ..sweep.layout import COST_PREFIX, PEAK_PREFIX

    columns = [c for c in table.columns if str(c).startswith(COST_PREFIX)]
    totals = {c: float(table[c].sum(skipna=True)) for c in columns}
    whole = sum(totals.values())
    phases = [c[len(COST_PREFIX):] for c in columns]
    return pd.DataFrame({
        "phase": phases,
        "seconds": [totals[c] for c in columns],
        "share": [totals[c] / whole if whole > 0 else math.nan for c in columns],
        "median_per_run": [float(table[c].median(skipna=True)) for c in columns],
        "peak_mib": [float(table[PEAK_PREFIX + p].max(skipna=True)) if PEAK_PREFIX + p in table
                     else math.nan for p in phases]})


def build_sweep(sweep: Path) -> SweepContent:
    """Read a sweep directory into a :class:`SweepContent` (RunError, one line, when it has no
    finished run)."""
    from .. import measures as R
    from ..sweep import read_config, read_table, run_dir

    sweep = Path(sweep)
    table = read_table(sweep)
    config = read_config(sweep) or {}
    hyper = [h for h in table.attrs.get("hyperparameters", []) if h in table.columns]
    if "status" not in table.columns or not (table["status"] == "done").any():
        raise RunError(f"sweep {sweep} has no finished runs yet: run `genprobe sweep CONFIG --out "
                       f"{sweep}` (it resumes where it stopped), then `genprobe report {sweep}`")
    done = table[table["status"] == "done"].reset_index(drop=True)
    done.attrs = table.attrs
    doc: dict[str, Any] = {"name": sweep.name, "path": str(sweep), "config": config,
                           "hyperparameters": hyper, "measures": [], "not_measures": {},
                           "runs_total": len(table), "runs_done": len(done),
                           "runs_failed": int((table["status"] == "failed").sum())}
    content = SweepContent(sweep, doc, "")
    ranking = None
    if any("." in str(c) for c in table.columns):
        try:  # the ranking decides which columns are measures (genprobe.measures.classify)
            ranking = R.rank_sweep(table, target="gap")
        except GenprobeError as exc:
            doc["ranking_note"] = f"no ranking: {one_line(exc)}"
    else:
        doc["ranking_note"] = ("no ranking: the sweep computed no measures (give it probes, or "
                               "baselines: true)")
    if ranking is not None:
        doc["measures"] = list(ranking["measure"])
        doc["not_measures"] = dict(ranking.attrs["not_ranked"])
        doc["ranking"] = ranking.to_dict(orient="records")
        doc["ranking_attrs"] = dict(ranking.attrs)
        doc["ranking_reading"] = ranking_reading(ranking)
    doc["table"] = table.to_dict(orient="records")
    doc["costs"] = cost_table(table).to_dict(orient="records")
    doc["seconds_total"] = float(table["seconds"].sum(skipna=True)) if "seconds" in table else math.nan
    run_dirs = [run_dir(sweep, r) for r in done["run"]]
    with_results = [d for d in run_dirs if d.is_dir() and probe_dirs(d)]
    draw = len(done) <= RUN_FIGURES
    total = (1 if ranking is not None else 0) + (sum(count_figures(d) for d in with_results) if draw else 0)
    with progress.task(f"report of {sweep}", total=total) as bar:
        if ranking is not None:
            content.figures["ranking"] = to_svg(R.plot_rank_correlation(
                table, ranking, limit=PLOTTED_MEASURES))
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
    content.doc = jsonable(doc)
    content.subtitle = (f"{len(done)} of {len(table)} runs finished"
                        + (f" ({doc['runs_failed']} failed)" if doc["runs_failed"] else "")
                        + (f" · varying {names(hyper, 6)}" if hyper else "")
                        + f" · {len(doc['measures'])} measures")
    return content


def sweep_body(content: SweepContent) -> list[str]:
    """The HTML sections of a sweep's report."""
    doc = content.doc
    table = pd.DataFrame(doc["table"])
    networks_first = doc["runs_done"] <= RUN_FIGURES  # a small family: each network is the news
    runs_nav = "".join(f'<li><a href="#{anchor("run-" + r.run.name)}">{H.escape(r.run.name)}</a></li>'
                       for r in content.runs)
    ranking_nav = '<li><a href="#ranking">ranking of the measures</a></li>'
    body = ['<nav><ul>' + (runs_nav + ranking_nav if networks_first else ranking_nav)
            + '<li><a href="#runs">runs</a></li>' + ('<li><a href="#costs">where the time went'
            '</a></li>' if doc.get("costs") else "") + ("" if networks_first else runs_nav)
            + '<li><a href="#provenance">provenance</a></li></ul></nav>']
    run_sections = [_run_section(run, entry) for run, entry in
                    zip(content.runs, [d for d in doc["runs"] if "error" not in d], strict=True)]
    if networks_first:
        body += run_sections
    body.append('<section id="ranking"><h2>How well each measure ranks the runs by generalization gap</h2>')
    if "ranking" in doc:
        body.append(f'<p class="reading">{H.escape(doc["ranking_reading"])}</p>')
        ranking = pd.DataFrame(doc["ranking"])
        attrs = doc.get("ranking_attrs", {})
        options = attrs.get("options", {})
        unscored = ranking[ranking["kendall_tau"].isna()]
        cmi = ("the paper's definition (Jiang et al.)" if options.get("cmi", "paper") == "paper"
               else "the competition's scoring program")
        body.append(f"<p>Kendall's τ-b of each measure with the gap (test − train error) over "
                    f"{attrs.get('n_models', '?')} models; granulated τ: the mean over "
                    f"hyper-parameters of τ among runs that differ in that one (Jiang et al. "
                    f"2020); CMI: the conditional mutual information score of the PGDL "
                    f"competition (0 to 1, blind to the sign), as {cmi}. In brackets: "
                    f"{options.get('level', 0.95):.0%} bootstrap intervals "
                    f"({options.get('bootstrap', '?')} resamples of "
                    f"{H.escape(attrs.get('resampling', 'models'))}). Expected: the sign a larger "
                    f"value should have (· none stated). vs reference: the oriented τ minus "
                    f"{H.escape(str(options.get('reference')))}'s on the same resamples, with "
                    f"its p-value adjusted by {H.escape(attrs.get('correction', 'Holm'))}. "
                    f"Sorted by |τ|.</p>")
        ranking.attrs = attrs
        body.append(H.table(_ranking_table(ranking), max_rows=len(ranking)))
        if len(unscored):
            body.append("<p class=\"sub\">Not scored: " + H.escape("; ".join(
                f"{r['measure']} ({r['note']})" for _, r in unscored.iterrows())) + ".</p>")
        if attrs.get("excluded"):
            body.append("<p class=\"sub\">Runs left out of the ranking: " + H.escape("; ".join(
                f"{run} ({why})" for run, why in attrs["excluded"].items())) + ".</p>")
        if doc.get("not_measures"):
            body.append(f'<p class="sub">{H.escape(_not_ranked_text(doc["not_measures"]))}</p>')
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
    if doc.get("costs"):
        body.append(_cost_section(doc))
    if not networks_first:
        body += run_sections
    for entry in doc["runs"]:
        if "error" in entry:
            body.append(f'<section><h2>{H.escape(entry["name"])}</h2><p class="failed">'
                        f'{H.escape(entry["error"])}</p></section>')
    return body


def _cost_section(doc: dict[str, Any]) -> str:
    costs = pd.DataFrame(doc["costs"])
    top = costs.sort_values("seconds", ascending=False).iloc[0]
    most = (f"; {H.escape(top['phase'])} took the most, {top['share']:.0%} of the phases' seconds"
            if pd.notna(top["share"]) else "")
    shown = pd.DataFrame({"phase": costs["phase"], "seconds": costs["seconds"],
                          "share": [f"{v:.0%}" if pd.notna(v) else "" for v in costs["share"]],
                          "median per run (s)": costs["median_per_run"]})
    peak = costs["peak_mib"] if "peak_mib" in costs else pd.Series(dtype="float64")
    if peak.notna().any():
        shown["peak memory (MiB)"] = [f"{v:,.0f}" if pd.notna(v) else "" for v in peak]
    return ('<section id="costs"><h2>Where the time went</h2>'
            f"<p>The {doc['runs_total']} runs took {doc['seconds_total']:.4g} s in all (each run's "
            "wall seconds in its last attempt, summed: with several jobs the study took less "
            f"wall-clock time){most}. A phase that reused saved work (a finished training, a probe "
            "result from an earlier invocation) counts the loading only; the first probe of a "
            "run includes loading the run. Peak memory is the largest over the runs of a worker "
            "process's peak resident memory during the phase (the libraries and data it already "
            "held count too).</p>"
            + H.table(shown, max_rows=len(shown)) + "</section>")


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


__all__ = ["RUN_FIGURES", "SweepContent", "build_sweep", "cost_table", "ranking_reading",
           "sweep_body"]
