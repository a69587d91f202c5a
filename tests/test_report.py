"""Reports: the page renders in headless Chromium with every figure loaded, nothing fetched and no
console error; the JSON export holds the same content; each probe's reading states the result's
own numbers; and every kind of bad input is one typed line."""

from __future__ import annotations

import copy
import json
import math
import os
import re

import numpy as np
import pandas as pd
import pytest

import genprobe as gp
from browser import chromium, render
from genprobe.errors import ConfigError, OutputError, RunError
from genprobe.probes.registry import get_probe, list_probes
from genprobe.report import html as H
from genprobe.results import names, number, percent, points
from invoke import call

pytestmark = pytest.mark.usefixtures("one_thread")


def _need_chromium() -> None:
    """Skip without Chromium, except in CI, which installs it (scripts/install.sh --dev)."""
    if chromium() is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed, but CI installs it: check scripts/install.sh --dev")
        pytest.skip("chromium is not installed (bash scripts/install.sh --dev installs it, as root)")


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    """A tiny fcn trained 2 epochs on 120 digits, with every registered probe's result (tiny
    options) and figure saved under RUN/probes/."""
    from genprobe.zoo.train import TrainConfig, train_run

    run = train_run(TrainConfig(arch="fcn", dataset="digits", epochs=2, n_train=120, n_test=60,
                                arch_options={"width": 16, "depth": 2}, device="cpu"),
                    tmp_path_factory.mktemp("report") / "run")
    subject = gp.Subject.load(run)
    for name in list_probes():
        spec = get_probe(name)
        spec.function(subject, **spec.tiny).save(run / "probes" / name, figure=True)
    return run


def _assert_clean(page, images: int):
    shown = render(page)
    assert shown.fetched == [], f"the page fetched {shown.fetched}"
    assert shown.errors == [], f"console errors: {shown.errors}"
    assert len(shown.images) == images
    bad = [i["alt"] for i in shown.images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert bad == [], f"figures that did not load: {bad}"
    return shown


def test_run_report_renders_every_figure_offline(probed_run):
    _need_chromium()
    page = gp.report(probed_run)
    assert page == probed_run / "report.html"
    shown = _assert_clean(page, images=1 + len(list_probes()))  # training curves + one per probe
    assert shown.title == f"genprobe report: {probed_run.name}"
    text = page.read_text()
    assert H.CSP in text and '<meta name="generator" content="genprobe' in text[:400]
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", text), "a reference to another resource"
    assert "<script" not in text


def test_a_report_of_results_computed_in_python_on_any_subject(tmp_path):
    """A researcher's own model, probed from Python: the same self-contained page, from the
    results themselves (no run directory)."""
    from foreign import make_subject

    subject = make_subject("nested", n_train=40, n_test=20, checkpoints=2)
    results = [gp.robustness(subject, **get_probe("robustness").tiny),
               gp.selectivity(subject, **get_probe("selectivity").tiny),
               gp.robustness(subject, checkpoints=None, draws=1)]
    page = gp.report(results, out=tmp_path / "mine.html")
    doc = json.loads((tmp_path / "mine.json").read_text())
    assert doc["generator"] == "genprobe" and doc["kind"] == "results"
    assert [e["probe"] for e in doc["results"]["probes"]] == ["robustness", "selectivity",
                                                              "robustness-2"]
    assert doc["results"]["probes"][0]["reading"] == results[0].reading()
    text = page.read_text()
    assert text.count('<img class="figure"') == 3 and "Configuration" not in text
    assert "comes from the results passed to genprobe.report" in text
    if chromium() is not None:
        _assert_clean(page, images=3)
    assert gp.report(results[1], out=tmp_path / "one.html").is_file()  # one result, and again:
    assert gp.report(results[1], out=tmp_path / "one.html").is_file()  # its own file is replaced
    with pytest.raises(ConfigError, match="needs out=FILE.html"):
        gp.report(results)
    with pytest.raises(ConfigError, match="a Result or a list of Results, got int"):
        gp.report(3, out=tmp_path / "x.html")
    (tmp_path / "theirs.html").write_text("a page of the user's own")
    with pytest.raises(OutputError, match="not written by genprobe"):
        gp.report(results, out=tmp_path / "theirs.html")


def test_a_failed_self_check_is_said_beside_the_reading(probed_run, tmp_path):
    from genprobe.report.runs import probe_section

    entry = {"probe": "ntk", "reading": "The empirical NTK ...", "summary": {"lambda_max": 1.0},
             "provenance": {"self_check": {"what": "Θ against a loop", "value": 0.5,
                                           "tolerance": 1e-4, "passed": False}}}
    html = probe_section(entry, None, fold=True)
    failed = html.index("Self-check FAILED: Θ against a loop: 0.5 against a tolerance of 0.0001")
    assert failed < html.index("<details>")  # not folded away
    entry["provenance"]["self_check"]["passed"] = True
    assert "Self-check FAILED" not in probe_section(entry, None, fold=True)


def test_report_json_holds_the_same_content(probed_run):
    page = gp.report(probed_run)
    doc = json.loads(page.with_suffix(".json").read_text())
    assert doc["generator"] == "genprobe" and doc["kind"] == "run"
    assert doc["genprobe_version"] == gp.__version__ and doc["machine"]["torch"]
    entries = {e["probe"]: e for e in doc["run"]["probes"]}
    assert list(entries) == list_probes()  # registry order, every registered probe
    text = page.read_text()
    for name, entry in entries.items():
        result = gp.load(probed_run / "probes" / name)
        assert entry["reading"] == result.reading()
        assert H.escape(result.reading()) in text
        for key, value in result.summary.items():  # every number, NaN as null
            assert (entry["summary"][key] is None) if math.isnan(value) else \
                entry["summary"][key] == (value if math.isfinite(value) else ("inf" if value > 0 else "-inf"))
        prov = entry["provenance"]
        assert prov["genprobe_version"] == gp.__version__ and prov["seed"] == result.meta.get("seed", result.meta["options"].get("seed"))
        assert prov["options"] == result.meta["options"] and prov["machine"] == result.meta["machine"]
    final = doc["run"]["final"]
    metrics = pd.read_parquet(probed_run / "metrics.parquet").iloc[-1]
    assert final["test_error"] == metrics["test_error"]
    assert final["gap"] == pytest.approx(metrics["test_error"] - metrics["train_error"], abs=0)
    assert percent(metrics["test_error"]) in doc["run"]["training_reading"]


def test_a_probe_registered_later_appears_without_changes(probed_run, tmp_path):
    """The report iterates the registry: a result of an unregistered kind still gets its section
    (generic reading, its summary), and a registered probe with no result is listed with the
    command that makes one."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(probed_run, run)
    shutil.rmtree(run / "probes" / "stiffness")
    (run / "probes" / "robustness" / "figure.svg").unlink()  # saved before figures had SVG: re-drawn
    gp.Result(table=pd.DataFrame({"x": [1.0]}), summary={"novel_measure": 0.123456},
              meta={"seed": 3}).save(run / "probes" / "novel")
    page = gp.report(run, tmp_path / "r.html")
    doc = json.loads((tmp_path / "r.json").read_text())["run"]
    novel = [e for e in doc["probes"] if e["probe"] == "novel"][0]
    assert "novel_measure = 0.123" in novel["reading"] and novel["figure_note"] == "this result has no figure"
    # the training curves and one figure per result but the novel one (robustness re-drawn)
    assert page.read_text().count('<img class="figure"') == 1 + len(list_probes()) - 1
    assert doc["missing"] == [{"probe": "stiffness", "command": f"genprobe probe stiffness {run}"}]
    assert f"genprobe probe stiffness {run}" in page.read_text()


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_typed_line(probed_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    cases = [(tmp_path / "nowhere", [], RunError, "does not exist"),
             (tmp_path / "empty", [], RunError, "neither a run directory"),
             (tmp_path / "file.txt", [], RunError, "is a file"),
             (probed_run, ["--out", tmp_path / "r.txt"], ConfigError, "name an .html file"),
             (probed_run, ["--out", tmp_path / "missing" / "r.html"], OutputError,
              "does not exist; create it, or choose another --out")]
    for path, extra, error, message in cases:
        with pytest.raises(error, match=message):
            gp.report(path, *(extra[1:] if extra else []))
        code, _, err = call(["report", path, *extra], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_run_without_probe_results_says_which_command_makes_them(tmp_path, capsys):
    from genprobe.zoo.train import TrainConfig, train_run

    run = train_run(TrainConfig(arch="fcn", dataset="digits", epochs=1, n_train=40, n_test=20,
                                arch_options={"width": 8, "depth": 1}, device="cpu"), tmp_path / "bare")
    with pytest.raises(RunError, match=r"no probe results yet.*genprobe probe NAME"):
        gp.report(run)
    code, _, err = call(["report", run], capsys)
    assert code == 2 and "genprobe probe NAME" in err
    assert not (run / "report.html").exists() and not (run / "report.json").exists()


def test_out_is_replaced_only_when_genprobe_wrote_it(probed_run, tmp_path, capsys):
    mine = tmp_path / "mine.html"
    mine.write_text("<html>my notes</html>")
    with pytest.raises(OutputError, match="not written by genprobe"):
        gp.report(probed_run, mine)
    assert mine.read_text() == "<html>my notes</html>" and not (tmp_path / "mine.json").exists()
    code, _, err = call(["report", probed_run, "--out", mine], capsys)
    assert code == 2 and "not written by genprobe" in err and err.count("\n") == 1
    theirs = tmp_path / "theirs.html"  # the page would be ours, but the JSON beside it is not
    (tmp_path / "theirs.json").write_text('{"mine": 1}')
    with pytest.raises(OutputError, match="theirs.json"):
        gp.report(probed_run, theirs)
    assert not theirs.exists() and (tmp_path / "theirs.json").read_text() == '{"mine": 1}'
    (tmp_path / "folder.html").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        gp.report(probed_run, tmp_path / "folder.html")
    ours = tmp_path / "ours.html"
    gp.report(probed_run, ours)
    first = ours.stat().st_mtime_ns
    gp.report(probed_run, ours)  # genprobe's own page: replaced
    assert ours.stat().st_mtime_ns >= first and H.written_by_genprobe(ours)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ours")) == \
        ["ours.html", "ours.json"]  # no temporary file left


def test_a_reported_run_is_still_a_run_genprobe_may_replace(probed_run, tmp_path):
    """report.html and report.json are files a run may hold (store.REPORT_FILES): `genprobe
    train --overwrite` still recognises the run as its own."""
    import shutil

    from genprobe import store

    run = tmp_path / "run"
    shutil.copytree(probed_run, run)
    gp.report(run)
    assert {"report.html", "report.json"} <= set(store.REPORT_FILES)
    store.check_run_replaceable(run)  # raises OutputError if the report made it foreign


# ----------------------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    from genprobe.sweep import SweepConfig, run_sweep

    config = SweepConfig.from_dict({
        "name": "report-test",
        "train": {"arch": "fcn", "dataset": "gaussian", "dataset_options": {"dim": 8, "num_classes": 3},
                  "n_train": 96, "n_test": 48, "epochs": 2, "batch_size": 32, "depth": 1},
        "grid": {"width": [8, 16], "label_noise": [0.0, 0.5]},
        "probes": {"robustness": {"draws": 1, "split": "train"},
                   "ablation": {"orders": 1, "steps": 3, "split": "train"}},
        "baselines": False, "figures": True, "ranking": {"min_models": 4, "bootstrap": 200}})
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    run_sweep(config, out, jobs=1, threads=1, device="cpu", progress=False)
    return out


def test_sweep_report_ranks_the_measures_and_renders_offline(tiny_sweep):
    _need_chromium()
    page = gp.report(tiny_sweep)
    assert page == tiny_sweep / "report.html"
    doc = json.loads(page.with_suffix(".json").read_text())["sweep"]
    table = pd.read_parquet(tiny_sweep / "table.parquet")
    expected = gp.rank_correlation(table, min_models=4, bootstrap=200)
    got = pd.DataFrame(doc["ranking"])
    assert list(got["measure"]) == list(expected["measure"])
    np.testing.assert_array_equal(got["kendall_tau"].astype(float), expected["kendall_tau"])
    np.testing.assert_array_equal(got["kendall_tau_low"].astype(float), expected["kendall_tau_low"])
    assert set(got["measure"]) == {"robustness.critical_fraction",
                                   "robustness.mean_delta_error_reinit",
                                   "robustness.mean_delta_error_rerandomize", "ablation.auc_all",
                                   *[m for m in got["measure"] if m.startswith("ablation.auc:")]}
    assert "robustness.base_error" in doc["not_measures"]
    assert doc["runs_done"] == 4 and len(doc["runs"]) == 4
    assert doc["ranking_reading"] == gp.measures.headline(expected)
    # the hyper-parameters that vary are columns of the runs' table in the page
    assert sorted(doc["hyperparameters"]) == ["label_noise", "width"]
    html = page.read_text()
    runs = html[html.index('<section id="runs">'):]
    head = runs[:runs.index("</thead>")]
    assert ">width</th>" in head and ">label_noise</th>" in head
    # one ranking figure, then per run its training curves and one figure per probe
    _assert_clean(page, images=1 + 4 * (1 + 2))
    # at a desktop's width and a phone's: nothing runs off the page sideways, every figure loads
    for width in (1400, 390):
        shown = render(page, width=width)
        assert shown.overflow <= 0, f"the page is {shown.overflow} px wider than {width} px"
        assert all(i["complete"] and i["width"] > 0 for i in shown.images)
        assert shown.screenshot.startswith(b"\x89PNG") and len(shown.screenshot) > 10_000


def test_sweep_report_shows_where_the_time_went(tiny_sweep, tmp_path):
    """The cost section: per phase its seconds summed over the runs, its share, its median per
    run — the table's seconds_* columns, also when the table is read without its attrs."""
    from genprobe.report.sweeps import cost_table

    table = pd.read_parquet(tiny_sweep / "table.parquet")
    page = gp.report(tiny_sweep, out=tmp_path / "r.html")
    doc = json.loads(page.with_suffix(".json").read_text())["sweep"]
    costs = pd.DataFrame(doc["costs"])
    assert list(costs["phase"]) == ["training", "robustness", "ablation"]
    for row in costs.itertuples():
        column = table[f"seconds_{row.phase}"]
        assert row.seconds == pytest.approx(column.sum()) and row.seconds > 0
        assert row.median_per_run == pytest.approx(column.median())
    assert costs["share"].sum() == pytest.approx(1.0)
    assert doc["seconds_total"] == pytest.approx(table["seconds"].sum())
    bare = table.copy()
    bare.attrs = {}
    pd.testing.assert_frame_equal(cost_table(bare), costs)
    html = page.read_text()
    section = html[html.index('<section id="costs">'):]
    section = section[:section.index("</section>")]
    assert "<h2>Where the time went</h2>" in section and '<a href="#costs">' in html
    for row in costs.itertuples():
        assert f">{row.phase}</td>" in section and f">{row.share:.0%}</td>" in section
    assert f"{doc['seconds_total']:.4g} s in all" in section
    from genprobe.memory import reset_peak_resident

    measured = reset_peak_resident()  # Linux: every phase's peak memory is in the table
    assert measured == all(f"peak_mib_{p}" in table for p in costs["phase"])
    for row in costs.itertuples():
        column = table.get(f"peak_mib_{row.phase}")
        if column is not None:
            assert row.peak_mib == column.max() and f">{row.peak_mib:,.0f}</td>" in section


def test_a_sweep_with_no_finished_run_is_refused(tmp_path):
    from genprobe.outputs import MARKS

    sweep = tmp_path / "s"
    sweep.mkdir()
    (sweep / MARKS["sweep"]).write_text("written by genprobe: a sweep directory\n")
    with pytest.raises(RunError, match="genprobe sweep"):
        gp.report(sweep)


# ----------------------------------------------------------------------------- readings


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_formatting_of_the_numbers():
    assert percent(0.0194) == "1.9%" and percent(0.88) == "88.0%" and percent(1 / 3, 0) == "33%"
    assert points(0.123) == "12.3 pp" and number(21432.1) == "2.14e+04" and number(0.4231) == "0.423"
    assert names(["a"]) == "a" and names(["a", "b"]) == "a and b" and names(["a", "b", "c"]) == "a, b and c"
    assert names(list("abcdef"), 4) == "a, b, c, d and 2 more"


def test_robustness_reading_states_its_numbers():
    rng = _rng(1)
    base = 0.0137
    error = np.array([0.61, base + 0.004, 0.27, base + 0.002])
    mods = pd.DataFrame({"module": ["fc1", "fc2", "fc3", "fc4"], "moved": rng.uniform(0.1, 2, 4),
                         "robust": error - base < 0.01, "delta_error": error - base, "error": error})
    summary = {"critical_modules": 2, "critical_fraction": 0.5, "mean_delta_error_reinit": float((error - base).mean()),
               "mean_delta_error_rerandomize": 0.712, "base_error": base, "base_loss": 0.05}
    r = gp.RobustnessResult(table=pd.DataFrame(), summary=summary,
                            meta={"options": {"split": "test", "threshold": 0.01}}, tables={"modules": mods})
    text = r.reading()
    worst = mods.loc[mods["error"].idxmax()]
    robust = mods[mods["robust"]]
    for piece in ["fc1 and fc3 are critical", f"re-initializing {worst['module']}",
                  f"from {percent(base)} to {percent(worst['error'])}", "fc3 to 27.0%",
                  "fc2 and fc4 are robust", "raises the test error by less than 1.0 pp",
                  f"to between {percent(robust['error'].min())} and {percent(robust['error'].max())}",
                  points(0.712), points(summary["mean_delta_error_reinit"]),
                  f"{mods.loc[mods['moved'].idxmax(), 'module']} moved furthest",
                  number(mods["moved"].max()),
                  f"critical modules moved {number(mods[~mods['robust']]['moved'].mean())}"]:
        assert piece in text, (piece, text)


def _robustness_result(errors: dict[tuple[str, str], float], base: float) -> gp.RobustnessResult:
    """A robustness result from {(module, target): error}; a module is robust when its re-init
    to θ⁰ stays within 1 pp of `base`."""
    table = pd.DataFrame([{"module": m, "target": t, "error": e, "kind": "reinit"}
                          for (m, t), e in errors.items()])
    modules = sorted({m for m, _ in errors}, key=list(dict.fromkeys(m for m, _ in errors)).index)
    reinit = {m: errors[(m, "0")] for m in modules}
    mods = pd.DataFrame({"module": modules, "moved": np.linspace(0.2, 1.0, len(modules)),
                         "robust": [reinit[m] - base < 0.01 for m in modules],
                         "delta_error": [reinit[m] - base for m in modules],
                         "error": [reinit[m] for m in modules]})
    summary = {"critical_modules": int((~mods["robust"]).sum()), "base_error": base,
               "critical_fraction": float((~mods["robust"]).mean()), "base_loss": 0.5,
               "mean_delta_error_reinit": float(mods["delta_error"].mean()),
               "mean_delta_error_rerandomize": math.nan}
    return gp.RobustnessResult(table=table, summary=summary, tables={"modules": mods},
                               meta={"options": {"split": "test", "threshold": 0.01}})


def test_robustness_reading_says_when_a_rewind_lowers_the_error():
    """The demo's noisy-label network: rewinding layers.3 to epoch 2 lowers the test error from
    40.6% to 8.1% — the memorization signature, said as a finding, not as 'robust'."""
    r = _robustness_result({("layers.1", "0"): 0.85, ("layers.1", "2"): 0.30,
                            ("layers.3", "0"): 0.401, ("layers.3", "2"): 0.081,
                            ("layers.5", "0"): 0.409, ("layers.5", "2"): 0.40}, base=0.406)
    text = r.reading()
    assert "Finding: rewinding layers.3 to its state at epoch 2 lowers the test error from " \
        "40.6% to 8.1%" in text, text
    assert "(2 modules lower it by more than 1.0 pp at some checkpoint)" in text
    assert "memorization" in text
    # layers.3 re-initialized to θ⁰ sits below the trained error: "raises" alone would be false
    assert ("raises the test error by less than 1.0 pp, or lowers it (to between 40.1% and 40.9%, "
            "from 40.6%)") in text


def test_robustness_reading_when_re_initializing_lowers_the_error():
    """The demo's noisy-label fcn: re-initializing any layer to θ⁰ lowers the test error a lot;
    'robust' must not read as 'within 1 pp'."""
    r = _robustness_result({("l1", "0"): 0.183, ("l2", "0"): 0.353}, base=0.406)
    r.summary["mean_delta_error_rerandomize"] = 0.50
    text = r.reading()
    assert "re-initializing any one of them lowers the test error (to between 18.3% and 35.3%, " \
        "from 40.6%)" in text, text
    assert "raises the test error by 50.0 pp on average; re-initializing it lowers it by 13.8 pp" \
        in text, text


def test_robustness_reading_has_no_finding_when_every_rewind_hurts():
    r = _robustness_result({("a", "0"): 0.5, ("a", "3"): 0.2, ("b", "0"): 0.105,
                            ("b", "3"): 0.101}, base=0.1)
    text = r.reading()
    assert "Finding" not in text and "a is critical" in text
    assert "b is robust: re-initializing it raises the test error by less than 1.0 pp (to 10.5%)" in text


@pytest.mark.parametrize("rho, words", [
    (0.33, "More selective units are moderately more important: Spearman ρ = +0.330"),
    (-0.35, "More selective units are moderately less important: Spearman ρ = -0.350"),
    (0.05, "Selectivity and importance are hardly related: Spearman ρ = +0.050"),
    (-0.8, "More selective units are strongly less important"),
    (0.2, "More selective units are weakly more important"),
])
def test_selectivity_reading_follows_the_sign_and_size_of_rho(rho, words):
    table = pd.DataFrame({"layer": ["l1"] * 4, "unit": range(4), "selectivity": [0.1, 0.2, 0.5, 0.9],
                          "importance": [0.01, 0.0, 0.02, 0.005]})
    r = gp.SelectivityResult(table=table, summary={"mean_selectivity": 0.425,
                                                   "selectivity_importance_spearman": rho,
                                                   "base_accuracy": 0.9},
                             meta={"options": {"split": "test"}})
    assert words in r.reading(), r.reading()


def test_selectivity_reading_without_a_correlation_says_nothing_of_it():
    table = pd.DataFrame({"layer": ["l1"] * 2, "unit": range(2), "selectivity": [0.1, 0.2],
                          "importance": [0.01, 0.0]})
    r = gp.SelectivityResult(table=table, summary={"mean_selectivity": 0.15, "base_accuracy": 0.9,
                                                   "selectivity_importance_spearman": math.nan},
                             meta={"options": {"split": "test"}})
    assert "Spearman" not in r.reading()


def test_criticality_reading_states_its_numbers():
    mu = np.array([1234.5, 0.0, 98.7, math.inf])
    mods = pd.DataFrame({"module": ["a", "b", "c", "d"], "criticality": mu})
    total = float(mu[np.isfinite(mu)].sum())
    summary = {"network_criticality": total, "bound": math.sqrt(total / 500), "n_examples": 500,
               "epsilon": 0.0231, "max_module_criticality": 1234.5}
    r = gp.CriticalityResult(table=pd.DataFrame(), summary=summary,
                             meta={"options": {"split": "train", "loss": "error"}},
                             tables={"modules": mods, "alphas": pd.DataFrame()})
    text = r.reading()
    for piece in [f"μ = Σ μ_i = {number(total)}", "over 4 modules", number(math.sqrt(total / 500)),
                  "m = 500 train examples", f"ε = {percent(0.0231)}",
                  f"most critical module is a (μ_i = {number(1234.5)}, {percent(1234.5 / total, 0)}",
                  "least critical is b (μ_i = 0)", "b has μ_i = 0", "d has μ_i = ∞"]:
        assert piece in text, (piece, text)


def _curve_table(layers, x_name, xs, draws, rng):
    rows = []
    for layer in layers:
        for d in range(draws):
            acc = np.sort(rng.uniform(0.1, 0.95, len(xs)))[::-1]
            acc[0] = 0.95
            for x, a in zip(xs, acc, strict=True):
                rows.append({"layer": layer, x_name: x, "draw": d, "order_id": d, "accuracy": a, "loss": 1.0})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("probe", ["ablation", "activation_noise"])
def test_curve_readings_state_their_numbers(probe):
    rng = _rng(2)
    x_name, xs = ("fraction", [0.0, 0.25, 0.5, 0.75, 1.0]) if probe == "ablation" else \
        ("scale", [0.0, 0.5, 1.0, 2.0, 4.0])
    table = _curve_table(["l1", "l2"], x_name, xs, 3, rng)
    summary = {"base_accuracy": 0.95}
    curves = {}
    for layer, part in table.groupby("layer"):
        curve = part.groupby(x_name)["accuracy"].mean()
        curves[layer] = curve
        x = curve.index.to_numpy()
        summary[f"auc:{layer}"] = float(np.trapezoid(curve.to_numpy(), x) / (x[-1] - x[0]))
    cls = gp.AblationResult if probe == "ablation" else gp.NoiseResult
    r = cls(table=table, summary=summary, meta={"options": {"split": "test", "mode": "zero", "order": "random"}},
            tables={"layers": pd.DataFrame({"layer": ["l1", "l2"], "units": [5, 5], "dim": [1, 1]})})
    text = r.reading()
    assert "accuracy, 95.0% with" in text
    for layer, curve in curves.items():
        assert f"{percent(curve.iloc[-1])} ({layer})" in text, text
        assert f"{summary[f'auc:{layer}']:.2f}" in text
    if probe == "ablation":
        for layer, curve in curves.items():
            assert f"{percent(curve.loc[0.5])} in {layer}" in text
    else:
        assert "at scale 4" in text


def test_curve_reading_with_every_layer_ending_alike():
    table = pd.DataFrame({"layer": ["a", "a", "b", "b"], "fraction": [0.0, 1.0, 0.0, 1.0],
                          "order_id": 0, "accuracy": [0.9, 0.1, 0.9, 0.1], "loss": 1.0})
    r = gp.AblationResult(table=table, summary={"auc:a": 0.5, "auc:b": 0.5, "base_accuracy": 0.9},
                          meta={"options": {"mode": "zero", "order": "random"}},
                          tables={"layers": pd.DataFrame({"layer": ["a", "b"], "units": [2, 2], "dim": 1})})
    assert "is 10.0% in every layer with all ablated" in r.reading()
    # the same area everywhere: no layer is called both the most and the least fragile
    assert "The area under the curve (1 = no loss at all) is 0.50 in every layer." in r.reading()


def test_selectivity_reading_states_its_numbers():
    rng = _rng(3)
    table = pd.DataFrame({"layer": ["a"] * 6 + ["b"] * 4, "unit": list(range(6)) + list(range(4)),
                          "selectivity": rng.uniform(0, 1, 10), "preferred_class": 0,
                          "mean_activation": 1.0, "importance": rng.uniform(-0.01, 0.05, 10)})
    summary = {"mean_selectivity": float(table["selectivity"].mean()),
               "selectivity_importance_spearman": -0.1234, "base_accuracy": 0.9}
    r = gp.SelectivityResult(table=table, summary=summary, meta={"options": {"split": "test"}})
    text = r.reading()
    means = table.groupby("layer")["selectivity"].mean()
    top = table.loc[table["importance"].idxmax()]
    high = int((table["selectivity"] > 0.8).sum())
    for piece in [f"over 10 units in 2 layers is {number(summary['mean_selectivity'])}",
                  f"{number(means.min())} in {means.idxmin()}", f"{number(means.max())} in {means.idxmax()}",
                  f"{high} unit", f"at most {points(top['importance'])} (unit {int(top['unit'])} of {top['layer']})",
                  f"mean drop over units is {points(table['importance'].mean(), 2)}",
                  "More selective units are weakly less important: Spearman ρ = -0.123"]:
        assert piece in text, (piece, text)


def test_stiffness_reading_states_its_numbers():
    states = pd.DataFrame({"checkpoint": ["0", "3", "final"], "epoch": [0.0, 3.0, math.nan],
                           "within_class": [0.81, 0.52, 0.52], "between_class": [0.33, 0.012, 0.012]})
    summary = {"within_class": 0.52, "between_class": 0.012, "critical_length": 0.3051,
               "n_rows": 40, "n_cols": 40}
    r = gp.StiffnessResult(table=pd.DataFrame(), summary=summary,
                           meta={"options": {"pairs": "train-train", "distance": "cosine"}},
                           tables={"states": states, "distance": pd.DataFrame()})
    text = r.reading()
    for piece in ["Within-class cosine stiffness is 0.52 and between-class 0.012", "40 × 40",
                  "about unchanged", "ξ = 0.305 (cosine distance)", "from 0.81 at epoch 0 to 0.52 at epoch 3",
                  "between-class from 0.33 to 0.012"]:
        assert piece in text, (piece, text)
    r.summary["critical_length"] = math.nan
    assert "no critical length" in r.reading()


@pytest.mark.parametrize("within, between, own, other", [
    (0.4, 0.2, "lowers the loss of others of its class", "lowers the loss of other classes"),
    (-0.3, -0.2, "raises the loss of others of its class", "but raises the loss of other classes"),
    (0.01, 0.0, "barely changes the loss of others of its class", "about unchanged"),
])
def test_stiffness_reading_follows_the_signs(within, between, own, other):
    curve = pd.DataFrame({"checkpoint": "final", "bin_low": [0.0, 0.5], "bin_high": [0.5, 1.0],
                          "cosine": [0.2, 0.6], "sign": [0.1, 0.5], "pairs": [10, 10]})
    summary = {"within_class": within, "between_class": between, "critical_length": math.nan,
               "n_rows": 10, "n_cols": 10}
    r = gp.StiffnessResult(table=pd.DataFrame(), summary=summary, meta={"options": {}},
                           tables={"states": pd.DataFrame(columns=["checkpoint", "epoch", "within_class",
                                                                    "between_class"]),
                                   "distance": curve})
    text = r.reading()
    assert own in text and other in text, text
    # a stiffness that grows with distance is not said to fall
    assert "Mean stiffness rises with the input distance of the pair (0.2 for the closest, 0.6 " \
        "for the farthest); it does not cross zero" in text, text


@pytest.mark.parametrize("lam_min, ratios, pieces", [
    (0.5, (91.3, 0.127), ["slowest mode needs about κ times", "λ_max grew 91.3-fold",
                          "κ shrank to 0.127 times its value"]),
    (-1e-9, (0.5, 4.0), ["singular at this precision (λ_min ≤ 0)", "λ_max shrank to 0.5 times",
                         "κ grew 4-fold"]),
])
def test_ntk_reading_follows_its_numbers(lam_min, ratios, pieces):
    kappa = 40.0 / lam_min if lam_min > 0 else math.inf
    summary = {"lambda_max": 40.0, "lambda_min": lam_min, "condition_number": kappa,
               "max_learning_rate": 0.05, "mean_prediction_accuracy": math.nan,
               "lambda_max_ratio": ratios[0], "condition_number_ratio": ratios[1]}
    r = gp.NTKResult(table=pd.DataFrame({"state": ["0", "final"]}), summary=summary,
                     meta={"n": 20, "options": {}})
    text = r.reading()
    for piece in pieces:
        assert piece in text, (piece, text)


NOT_A_NUMBER = re.compile(r"\bnan\b|\binf\b|nan%|inf%|nan pp")
"""A NaN or an infinity printed as if it were a number (the readings say "undefined", "∞")."""


def _readable(text: str) -> str:
    assert isinstance(text, str) and "\n" not in text and len(text) > 40, text
    assert not NOT_A_NUMBER.search(text), text
    return text


def _with_nan_column(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    frame = frame.copy()
    frame[column] = math.nan
    return frame


@pytest.mark.parametrize("probe", list_probes())
def test_readings_of_empty_and_nan_results(probe, probed_run):
    """Every probe's reading, driven with its real result made empty, all-NaN, and NaN in one
    summary value or one table column at a time: one paragraph, never raising, never printing
    NaN as a number, and never drawing a conclusion from an undefined value."""
    result = gp.load(probed_run / "probes" / probe)
    empty = copy.deepcopy(result)
    empty.table = empty.table.iloc[:0]
    empty.tables = {k: v.iloc[:0] for k, v in empty.tables.items()}
    assert _readable(empty.reading()).endswith("holds no measurements (its table is empty): there "
                                               "is nothing to read.")
    blank = copy.deepcopy(result)
    blank.summary = dict.fromkeys(blank.summary, math.nan)
    assert "every one is NaN" in _readable(blank.reading())
    for key in result.summary:
        one = copy.deepcopy(result)
        one.summary[key] = math.nan
        _readable(one.reading())
    for name in [None, *result.tables]:
        frame = result.table if name is None else result.tables[name]
        for column in [c for c in frame.columns if pd.api.types.is_float_dtype(frame[c])]:
            one = copy.deepcopy(result)
            if name is None:
                one.table = _with_nan_column(frame, column)
            else:
                one.tables[name] = _with_nan_column(frame, column)
            _readable(one.reading())


def test_undefined_values_draw_no_conclusion(probed_run):
    ntk = gp.load(probed_run / "probes" / "ntk")
    ntk.summary["lambda_min"] = math.nan
    assert "singular" not in ntk.reading() and "slowest mode" not in ntk.reading()
    ntk.summary["lambda_min"] = -1e-9
    assert "singular at this precision" in ntk.reading()
    stiff = gp.load(probed_run / "probes" / "stiffness")
    stiff.summary["within_class"] = math.nan
    text = stiff.reading()
    assert "Within-class cosine stiffness is undefined" in text
    assert "of others of its class" not in text
    abl = gp.load(probed_run / "probes" / "ablation")
    abl.table = _with_nan_column(abl.table, "accuracy")
    assert "no point of any curve is defined (every accuracy is NaN)" in abl.reading()


def test_every_registered_probe_reads_its_real_result(probed_run):
    """On real results every reading is one paragraph that quotes at least one of its summary
    numbers (or, for a probe with only the default reading, all of them)."""
    for name in list_probes():
        result = gp.load(probed_run / "probes" / name)
        text = result.reading()
        assert "\n" not in text and len(text) > 40
        quoted = [k for k, v in result.summary.items() if math.isfinite(v) and
                  any(f(v) in text for f in (number, percent, points, lambda x: f"{x:.2f}"))]
        assert quoted, (name, text)


# ----------------------------------------------------------------------------- the demo


def _genprobe(*args, cwd):
    import subprocess
    import sys

    env = os.environ | {"MPLBACKEND": "Agg", "COLUMNS": "200"}
    p = subprocess.run([sys.executable, "-m", "genprobe", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, env=env, timeout=900)
    return p.returncode, p.stdout, p.stderr


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code, _, err = call(["demo", "--quick", "--out", folder], capsys)
    assert code == 2 and err.count("\n") == 1 and "not a genprobe sweep directory" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_demo_quick_writes_a_report_that_renders_and_reruns_in_place(tmp_path):
    """`genprobe demo --quick` from an empty folder: every model done, the report's path last,
    the page clean in Chromium; a second run reuses everything and leaves a foreign file alone."""
    code, out, err = _genprobe("demo", "--quick", "--out", "demo", cwd=tmp_path)
    assert code == 0, err
    page = tmp_path / out.strip().splitlines()[-1].rpartition(" ")[2]
    assert page == tmp_path / "demo" / "report.html" and page.is_file()
    doc = json.loads(page.with_suffix(".json").read_text())["sweep"]
    assert doc["runs_done"] == 4 and doc["runs_failed"] == 0
    archs = {r["config"]["arch"] for r in doc["runs"]}
    assert archs == {"fcn", "cnn", "resnet"}
    assert any(r["config"]["label_noise"] > 0 for r in doc["runs"])
    assert any(r["config"]["arch_options"].get("readout") == "gap" for r in doc["runs"])
    for run in doc["runs"]:
        assert [p["probe"] for p in run["probes"]] == list_probes()
    # the tour opens with what each network shows, then the ranking, which names no best
    # measure over four models and ranks no test-split value
    html = page.read_text()
    assert html.index("<h2>Run ") < html.index('<section id="ranking">')
    assert "too small to call any measure the best" in doc["ranking_reading"]
    ranked = {r["measure"] for r in doc["ranking"]}
    assert ranked and not ranked & {"ablation.base_accuracy", "robustness.base_error",
                                    "criticality.trained_error", "ntk.mean_prediction_accuracy"}
    if chromium() is not None or os.environ.get("CI", "").lower() == "true":
        _assert_clean(page, images=1 + 4 * (1 + len(list_probes())))
    (tmp_path / "demo" / "notes.txt").write_text("mine")
    code, out, err = _genprobe("demo", "--quick", "--out", "demo", cwd=tmp_path)
    assert code == 0, err
    assert "4 models were already done" in out
    assert (tmp_path / "demo" / "notes.txt").read_text() == "mine"


def test_one_json_converter_two_policies(tmp_path):
    """outputs.jsonable: strict for files other programs read (NaN -> null, ±∞ -> strings), plain
    for the sweep files genprobe reads back (a NaN measure stays NaN); a result whose meta holds a
    NaN saves and loads (it raised at save when meta kept NaN and meta.json forbade it)."""
    import torch

    from genprobe.outputs import jsonable
    from genprobe.results import Result

    value = {1: (np.float32(0.5), torch.tensor(2)), "x": [math.nan, -math.inf, pd.NA], "p": tmp_path}
    assert jsonable(value) == {"1": [0.5, 2], "x": [None, "-inf", None], "p": str(tmp_path)}
    plain = jsonable(value, strict=False)
    assert math.isnan(plain["x"][0]) and plain["x"][1] == -math.inf
    json.dumps(jsonable(value), allow_nan=False)  # strict output is standard JSON
    result = Result(pd.DataFrame({"a": [1.0]}), {"s": math.nan}, meta={"undefined": math.nan})
    result.save(tmp_path / "r")
    loaded = gp.load(tmp_path / "r")
    assert loaded.meta["undefined"] is None and result.meta["undefined"] is None
    assert math.isnan(loaded.summary["s"])
