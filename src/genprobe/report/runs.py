"""The report of one run: training curves, then every probe result saved under ``RUN/probes/``.

The probe sections follow the probe registry (:func:`genprobe.probes.registry.list_probes`): a
probe registered later appears here with no change, with its own figure (``plot()``) and reading
(``reading()``). A registered probe without a result is listed with the command that makes one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .. import outputs, store
from ..errors import RunError, one_line
from ..figures import new_figure, styled, to_svg
from ..outputs import jsonable
from ..results import Result, names, percent, points, result_file, self_check_failure
from . import html as H

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ("epoch", "train_loss", "train_error", "test_loss", "test_error")


@dataclass
class RunContent:
    """A run's report content: ``doc`` (JSON-able: numbers, readings, provenance) and the SVG
    text of its figures by key (``"training"``, ``"probe:NAME"``)."""

    run: Path
    doc: dict[str, Any]
    figures: dict[str, str] = field(default_factory=dict)


def probe_dirs(run: Path) -> list[tuple[str, Path]]:
    """(probe name, result directory) of every saved result under ``RUN/probes/``: registered
    probes first, in the registry's order, then any other result directory, by name."""
    from ..probes.registry import list_probes

    folder = Path(run) / store.PROBES_DIR
    found = {p.name: p for p in sorted(folder.iterdir())} if folder.is_dir() else {}
    found = {n: p for n, p in found.items() if p.is_dir() and outputs.is_owned(p, "result", result_file)}
    registered = [n for n in list_probes() if n in found]
    return [(n, found[n]) for n in registered] + [(n, p) for n, p in found.items() if n not in registered]


def missing_probes(run: Path) -> list[str]:
    """Registered probes with no result under ``RUN/probes/``."""
    from ..probes.registry import list_probes

    have = {n for n, _ in probe_dirs(run)}
    return [n for n in list_probes() if n not in have]


def check_has_results(run: Path) -> None:
    """RunError (one line) unless the run holds at least one probe result."""
    if not probe_dirs(run):
        raise RunError(f"run {run} has no probe results yet: write them with `genprobe probe NAME "
                       f"{run}` (NAME from `genprobe probes`), then run `genprobe report {run}` again")


def training_reading(config: dict, metrics: pd.DataFrame) -> str:
    """One paragraph on the training run: final errors, the gap, whether it reached its stop
    target (``stop_loss`` / ``stop_error``), label corruption."""
    import dataclasses

    from ..zoo.train import TrainConfig, training_outcome

    last = metrics.iloc[-1]
    text = (f"{config.get('arch')} trained on {config.get('dataset')} for {int(last['epoch'])} epochs "
            f"reaches a train error of {percent(last['train_error'])} and a test error of "
            f"{percent(last['test_error'])}: a generalization gap of "
            f"{points(last['test_error'] - last['train_error'])}.")
    train = TrainConfig(**{f.name: config[f.name] for f in dataclasses.fields(TrainConfig) if f.name in config})
    outcome = training_outcome(train, metrics)
    if outcome["converged"] is not None:
        targets = {c.replace("_", " "): (float(last[c]), t) for c, t in train.stop_targets().items()}
        n, most = outcome["epochs_run"], train.epochs
        if outcome["converged"]:
            met = " and ".join(f"{name} {value:.3g} ≤ {t:g}" for name, (value, t) in targets.items())
            text += f" It stopped at epoch {n} of at most {most}: {met}."
        else:
            values = ", ".join(f"{name} {value:.3g}" if len(targets) > 1 else f"{value:.3g}"
                               for name, (value, _) in targets.items())
            text += (f" It did not reach {outcome['criterion']} in "
                     f"{f'{n} of at most {most}' if n < most else most} epochs (last {values}).")
    best = metrics.loc[metrics["test_error"].idxmin()]
    if int(best["epoch"]) != int(last["epoch"]):
        text += (f" The test error was lowest at epoch {int(best['epoch'])} "
                 f"({percent(best['test_error'])}).")
    noise = float(config.get("label_noise") or 0.0)
    if noise > 0:
        relabeled = config.get("data", {}).get("n_relabeled")
        how_many = f" ({relabeled} examples)" if relabeled is not None else ""
        text += (f" {percent(noise, 0)} of the training labels{how_many} were replaced by random ones; "
                 "the train error is measured against these corrupted labels.")
    return text


@styled
def training_figure(metrics: pd.DataFrame):
    """Train and test error (%) and loss against the epoch."""
    fig = new_figure(10.0, 3.6)
    ax, bx = fig.subplots(1, 2)
    for split in ("train", "test"):
        ax.plot(metrics["epoch"], 100.0 * metrics[f"{split}_error"], marker="o", label=split)
        bx.plot(metrics["epoch"], metrics[f"{split}_loss"], marker="o", label=split)
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_title("error")
    ax.set_ylim(bottom=0)
    ax.legend(loc="best")
    bx.set_xlabel("epoch")
    bx.set_ylabel("cross-entropy loss (nats)")
    bx.set_title("loss")
    bx.set_ylim(bottom=0)
    bx.legend(loc="best")
    return fig


def provenance(result: Result) -> dict[str, Any]:
    """Where a result's numbers come from: version, options, seed, machine, engine, self-check."""
    meta = result.meta
    return {"genprobe_version": meta.get("genprobe_version"), "options": meta.get("options", {}),
            "seed": meta.get("seed", (meta.get("options") or {}).get("seed")),
            "machine": meta.get("machine", "not recorded"),
            "engine": meta.get("engine"), "self_check": meta.get("self_check", {})}


def _reading(result: Result) -> str:
    try:
        return result.reading()
    except Exception as exc:  # a result saved by another version may lack what reading() needs
        logger.warning("report: the %s reading failed (%s); showing its summary", result.probe, exc)
        return Result.reading(result)


def _figure(result: Result, path: Path) -> tuple[str | None, str | None]:
    """(SVG text, None) of the result's figure: the ``figure.svg`` saved with it (written by the
    same ``plot()`` when the result was saved), else re-drawn; (None, why not) when neither."""
    saved = path / "figure.svg"
    if saved.is_file():
        try:
            return saved.read_text(encoding="utf-8"), None
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("report: %s is unreadable (%s); re-drawing it", saved, exc)
    return _drawn(result)


def _drawn(result: Result) -> tuple[str | None, str | None]:
    """(SVG text, None) of ``result.plot()``, or (None, why not)."""
    try:
        return to_svg(result.plot()), None
    except NotImplementedError:
        return None, "this result has no figure"
    except Exception as exc:  # never lose the whole report to one figure
        logger.warning("report: the %s figure failed: %s", result.probe, exc)
        return None, f"the figure could not be drawn: {one_line(exc)}"


def build_run(run: Path, *, figures: bool = True, on_figure=None,
              require_results: bool = True) -> RunContent:
    """Read a run and its probe results into a :class:`RunContent` (`figures`: include them;
    `on_figure()` is called after each one, for progress; `require_results`: RunError when the
    run has no probe result)."""
    run = Path(run)
    config = store.read_config(run)
    metrics = store.read_metrics(run)
    if require_results:
        check_has_results(run)
    columns = [c for c in METRIC_COLUMNS if c in metrics.columns]
    last = metrics.iloc[-1]
    doc: dict[str, Any] = {
        "name": run.name, "path": str(run), "config": config,
        "final": {"epoch": int(last["epoch"]), "train_error": last.get("train_error"),
                  "test_error": last.get("test_error"), "train_loss": last.get("train_loss"),
                  "test_loss": last.get("test_loss"),
                  "gap": last.get("test_error") - last.get("train_error")},
        "metrics": metrics[columns].to_dict(orient="records"),
        "training_reading": training_reading(config, metrics),
        "probes": [], "missing": [],
    }
    content = RunContent(run, doc)
    if figures:
        content.figures["training"] = to_svg(training_figure(metrics))
        if on_figure:
            on_figure()
    for name, path in probe_dirs(run):
        entry: dict[str, Any] = {"probe": name, "path": str(path.relative_to(run))}
        try:
            result = Result.load(path)
        except RunError as exc:
            entry.update(_registration(name), error=str(exc))
            doc["probes"].append(entry)
            continue
        entry = result_entry(result) | entry  # named by its folder, as the run lists it
        if figures:
            svg, why = _figure(result, path)
            if svg is not None:
                content.figures[f"probe:{name}"] = svg
            else:
                entry["figure_note"] = why
            if on_figure:
                on_figure()
        doc["probes"].append(entry)
    doc["missing"] = [{"probe": n, "command": f"genprobe probe {n} {run}"} for n in missing_probes(run)]
    content.doc = jsonable(doc)
    return content


def _registration(name: str) -> dict[str, str]:
    from ..probes.registry import get_probe, list_probes

    if name not in list_probes():
        return {}
    spec = get_probe(name)
    return {"title": spec.summary, "paper": spec.paper}


def result_entry(result: Result) -> dict[str, Any]:
    """A result's section of a report (JSON-able): its probe and paper, reading, summary,
    provenance and table."""
    brief = result.brief()
    return {"probe": result.probe, **_registration(result.probe), "reading": _reading(result),
            "summary": result.summary, "provenance": provenance(result),
            "table": brief.to_dict(orient="records"), "table_columns": [str(c) for c in brief.columns]}


def build_results(results: Sequence[Result], *, on_figure=None) -> tuple[dict[str, Any], dict[str, str]]:
    """The report content of results computed in Python (no run directory): ``(doc, figures)``,
    one entry per result, each figure drawn by its ``plot()``."""
    doc: dict[str, Any] = {"probes": []}
    figures: dict[str, str] = {}
    for result in results:
        entry = result_entry(result)
        taken = {e["probe"] for e in doc["probes"]}
        if entry["probe"] in taken:  # the same probe twice (two options): name them apart
            entry["probe"] = next(f"{result.probe}-{k}" for k in range(2, len(taken) + 3)
                                  if f"{result.probe}-{k}" not in taken)
        svg, why = _drawn(result)
        if svg is not None:
            figures[f"probe:{entry['probe']}"] = svg
        else:
            entry["figure_note"] = why
        if on_figure:
            on_figure()
        doc["probes"].append(entry)
    return jsonable(doc), figures


def results_body(doc: dict[str, Any], figures: dict[str, str]) -> list[str]:
    """The HTML sections of a report of results computed in Python."""
    body = ['<nav><ul>' + "".join(f'<li><a href="#{anchor("probe-" + e["probe"])}">'
                                  f'{H.escape(e["probe"])}</a></li>' for e in doc["probes"])
            + '<li><a href="#provenance">provenance</a></li></ul></nav>']
    for entry in doc["probes"]:
        body.append(probe_section(entry, figures.get(f"probe:{entry['probe']}")))
    return body


def count_figures(run: Path) -> int:
    """Figures :func:`build_run` draws for `run` (the training curves and one per result)."""
    return 1 + len(probe_dirs(run))


def anchor(text: str) -> str:
    """An HTML id made of `text`."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


def probe_section(entry: dict[str, Any], svg: str | None, *, level: int = 2, prefix: str = "",
                  fold: bool = False) -> str:
    """The HTML section of one probe result: reading, figure, summary, table, provenance
    (`fold`: the tables and provenance folded away; the reading and figure stay in view)."""
    name = entry["probe"]
    h = f"h{level}"
    about = "; ".join(entry[k] for k in ("title", "paper") if entry.get(k))
    parts = [f'<section id="{anchor(prefix + "probe-" + name)}">', f"<{h}>{H.escape(name)}</{h}>"]
    if about:
        parts.append(f'<p class="sub">{H.escape(about)}</p>')
    if "error" in entry:
        parts.append(f'<p class="failed">{H.escape(entry["error"])}</p></section>')
        return "\n".join(parts)
    parts.append(f'<p class="reading">{H.escape(entry["reading"])}</p>')
    failure = self_check_failure((entry.get("provenance") or {}).get("self_check"))
    if failure:  # said beside the reading, never folded away
        parts.append(f'<p class="failed">{H.escape(failure)}. Do not trust the numbers above '
                     "until it passes.</p>")
    if svg is not None:
        where = f" in {entry['path']}/" if entry.get("path") else ""
        parts.append(H.figure(svg, f"{name} figure", f"The figure of the result{where}."))
    elif entry.get("figure_note"):
        parts.append(f'<p class="note">{H.escape(entry["figure_note"])}</p>')
    if fold:
        parts.append("<details><summary>tables and provenance</summary>")
    parts.append("<h4>Summary measures</h4>" + H.key_values(entry["summary"]))
    if entry.get("table"):
        frame = pd.DataFrame(entry["table"], columns=entry.get("table_columns"))
        parts.append("<h4>Table</h4>" + H.table(frame))
    prov = entry["provenance"]
    check = prov.get("self_check") or {}
    passed = check.get("passed")
    verdict = ("" if passed is None else " — passed" if passed else
               ' — <span class="failed">FAILED</span>')
    flat = {"genprobe version": prov.get("genprobe_version"), "seed": prov.get("seed"),
            "engine": prov.get("engine"),
            **{f"option {k}": v for k, v in (prov.get("options") or {}).items()},
            **({f"machine {k}": v for k, v in prov["machine"].items()}
               if isinstance(prov.get("machine"), dict) else {"machine": prov.get("machine")}),
            **{f"self-check {k}": v for k, v in check.items()}}
    parts.append(f"<details><summary>Provenance and self-check{verdict}</summary>"
                 f"{H.key_values(flat)}</details>")
    parts.append("</details></section>" if fold else "</section>")
    return "\n".join(parts)


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists printed as they are)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_body(content: RunContent) -> list[str]:
    """The HTML sections of a run's report."""
    doc, run = content.doc, content.run
    body = ['<nav><ul><li><a href="#training">training</a></li>'
            + "".join(f'<li><a href="#{anchor("probe-" + e["probe"])}">{H.escape(e["probe"])}</a></li>'
                      for e in doc["probes"])
            + '<li><a href="#provenance">provenance</a></li></ul></nav>']
    body.append('<section id="training"><h2>Training</h2>'
                f'<p class="reading">{H.escape(doc["training_reading"])}</p>')
    if "training" in content.figures:
        body.append(H.figure(content.figures["training"], "training curves",
                             f"Training curves of {run.name} (metrics.parquet)."))
    body.append(H.table(pd.DataFrame(doc["metrics"])) + "</section>")
    for entry in doc["probes"]:
        body.append(probe_section(entry, content.figures.get(f"probe:{entry['probe']}")))
    if doc["missing"]:
        items = "".join(f"<li>{H.escape(m['probe'])}: <code>{H.escape(m['command'])}</code></li>"
                        for m in doc["missing"])
        body.append(f'<section id="missing"><h2>Probes not run on this run</h2><ul>{items}</ul></section>')
    return body


def summary_line(doc: dict[str, Any]) -> str:
    """``fcn on digits · 6 epochs · seed 0 · test error 12.5%``."""
    config = doc["config"]
    return (f"{config.get('arch')} on {config.get('dataset')} · {doc['final']['epoch']} epochs · "
            f"seed {config.get('seed')} · test error {percent(doc['final']['test_error'])} · "
            f"probes: {names([e['probe'] for e in doc['probes']], 8)}")


__all__ = ["RunContent", "build_results", "build_run", "check_has_results", "count_figures",
           "flatten", "result_entry", "results_body",
           "missing_probes", "probe_dirs", "probe_section", "provenance", "run_body",
           "summary_line", "training_figure", "training_reading"]
