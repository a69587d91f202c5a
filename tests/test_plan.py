"""``genprobe sweep --plan`` (genprobe.sweep.plan_sweep): the runs, the seconds of one run in each
phase and the total, before any work — from the finished runs of the sweep, else from a short
calibration; nothing written into the sweep directory; the sweep's own errors for bad input.

Measured here on test_sweep's tiny sweep (two 2-epoch networks, two probes, one thread), each
phase's estimate over the median the sweep then measured: from its finished runs 1.0× (the same
medians); from the calibration 0.6–1.2× (10 repetitions on the 2-core machine with another job
running beside them; the phases take 30–60 ms), and one run plus the start-up 0.9–1.1× of a
worker's first run. The assertions allow 3×.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from genprobe.sweep import SweepConfig, plan_sweep, read_table, run_sweep
from genprobe.sweep.plan import phases_of
from invoke import call
from test_sweep import BAD, NO_GRID, TINY, closed_port, tiny, write

pytestmark = pytest.mark.usefixtures("one_thread")

FACTOR = 3.0
"""How far an estimate may be from the measured median, either way."""


def measured(table: pd.DataFrame) -> dict[str, float]:
    """The median seconds of each phase over the runs of a sweep's table."""
    return {c.removeprefix("seconds_"): float(table[c].median())
            for c in table.columns if c.startswith("seconds_")}


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder`: (size, modification time in ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def within(plan, truth: dict[str, float]) -> dict[str, float]:
    ratios = {phase: plan.phases[phase] / truth[phase] for phase in plan.phases}
    assert set(ratios) == set(truth) == set(phases_of(SweepConfig.from_dict(tiny())))
    assert all(1 / FACTOR <= r <= FACTOR for r in ratios.values()), ratios
    return ratios


def test_from_finished_runs(tmp_path, capsys):
    """After the sweep, the plan reads its finished runs: each phase's median, nothing to do, and
    nothing in the sweep directory changes (not a file, not a modification time)."""
    config, out = write(tmp_path / "c.yaml", tiny()), tmp_path / "out"
    run_sweep(SweepConfig.from_dict(tiny()), out, progress=False)
    before = listing(out)
    plan = plan_sweep(config, out)
    assert (plan.runs, plan.done, plan.todo, plan.total_seconds) == (2, 2, 0, 0.0)
    assert plan.calibrated is None and plan.startup_seconds is None
    assert set(plan.sources.values()) == {"finished runs (2)"}
    ratios = within(plan, measured(read_table(out)))
    assert all(abs(r - 1) < 1e-9 for r in ratios.values()), ratios  # the same medians
    code, stdout, err = call(["sweep", config, "--out", out, "--plan", "--jobs", "2"], capsys)
    assert code == 0, err
    assert stdout.startswith(f"2 runs in {out}: 2 done, 0 to do; local, 2 job(s) × 1 thread(s)\n")
    assert "from the finished runs of this sweep" in stdout and "nothing to do" in stdout
    assert listing(out) == before


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """This process after one tiny sweep: what a worker loads on its first run (imports, lazy
    initialisation) is loaded, so that the sweeps measured here show a run's own cost."""
    run_sweep(SweepConfig.from_dict(tiny()), tmp_path_factory.mktemp("warm") / "sweep",
              progress=False)


def test_from_a_calibration(warm, tmp_path, capsys, monkeypatch):
    """Before the sweep, the plan calibrates on the first run in a temporary folder it removes,
    writes nothing at --out, and each phase's estimate is within the factor of what the sweep
    then measures; the total is the runs times one run over the jobs, plus a worker's start-up,
    which a worker's first run pays (within the factor too)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    config, out = write(tmp_path / "c.yaml", tiny()), tmp_path / "out"
    plan = plan_sweep(config, out, jobs=2, threads=1)
    assert not out.exists() and list(temp.iterdir()) == []
    assert (plan.runs, plan.done, plan.todo, plan.parallel) == (2, 0, 2, 2)
    assert plan.calibrated == SweepConfig.from_dict(tiny()).expand()[0].id
    assert set(plan.sources.values()) == {"calibration"}
    assert plan.total_seconds == pytest.approx(2 * plan.per_run)
    assert plan.startup_seconds is not None and plan.startup_seconds >= 0
    assert plan.wall_seconds == pytest.approx(plan.per_run + plan.startup_seconds)
    run_sweep(SweepConfig.from_dict(tiny()), out, progress=False)  # in this (warm) process
    within(plan, measured(read_table(out)))
    run_sweep(SweepConfig.from_dict(tiny()), tmp_path / "two", jobs=2, threads=1, progress=False)
    first = read_table(tmp_path / "two").seconds  # each run its worker's first
    ratios = first / (plan.per_run + plan.startup_seconds)
    assert ((1 / FACTOR <= ratios) & (ratios <= FACTOR)).all(), (first, plan)
    code, stdout, err = call(["sweep", config, "--out", tmp_path / "fresh", "--plan"], capsys)
    assert code == 0, err
    assert "2 runs in" in stdout and "0 done, 2 to do" in stdout
    assert "from a calibration of run" in stdout and "s/epoch × 2 epochs" in stdout
    assert not (tmp_path / "fresh").exists() and list(temp.iterdir()) == []


def test_a_failed_calibration_is_one_line(tmp_path, capsys):
    """A run that diverges cannot be estimated: one line, exit 2, nothing written."""
    config = write(tmp_path / "c.yaml", tiny(grid={"lr": [1e30]}))
    code, _, err = call(["sweep", config, "--out", tmp_path / "out", "--plan"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "the plan's calibration of run" in err and "training diverged" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, args, message", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_is_the_sweeps_own_error(change, args, message, tmp_path, capsys, monkeypatch):
    """--plan goes through the sweep's checks: the same one line, exit 2, nothing written."""
    if "NO-RAY" in args:
        monkeypatch.setitem(sys.modules, "ray", None)
    elif "ray" in args:
        pytest.importorskip("ray")
    args = [f"127.0.0.1:{closed_port()}" if a == "CLOSED" else a for a in args if a != "NO-RAY"]
    config = write(tmp_path / "c.yaml", {k: v for k, v in (TINY | change).items() if v is not NO_GRID})
    out = tmp_path / "out"
    code, _, sweep_err = call(["sweep", config, "--out", out, *args], capsys)
    began = time.monotonic()
    plan_code, stdout, plan_err = call(["sweep", config, "--out", out, *args, "--plan"], capsys)
    assert (code, plan_code) == (2, 2) and plan_err == sweep_err and stdout == ""
    assert message in plan_err and plan_err.count("\n") == 1
    assert time.monotonic() - began < 20
    assert not out.exists()


def test_the_slurm_time_limit_against_the_estimate(tmp_path, capsys, monkeypatch):
    """With --executor submitit the plan says whether the time limit holds one run; a finished
    run longer than the limit is the sweep's own error."""
    pytest.importorskip("submitit")
    from genprobe import executors

    monkeypatch.setenv(executors.CLUSTER_VARIABLE, "local")
    config = write(tmp_path / "c.yaml", tiny(slurm={"time": 30, "cpus": 1}))
    out = tmp_path / "out"
    plan = plan_sweep(config, out, executor="submitit")
    assert plan.time_limit_holds and plan.time_limit.startswith("slurm time 30 min holds one run")
    assert plan.parallel == 2  # no --jobs: every run at once
    monkeypatch.setattr(executors, "JOB_START_S", 30 * 60.0)  # now no run fits in 30 min
    plan = plan_sweep(config, out, executor="submitit")
    assert plan.time_limit_holds is False
    assert plan.time_limit.startswith("slurm time 30 min cannot hold one run: by this plan's "
                                      "estimate the longest run takes 0.0 min (and a job needs "
                                      "1800 s to start); give --slurm-time 31 or more")
    monkeypatch.setattr(executors, "JOB_START_S", 60.0)
    run_sweep(SweepConfig.from_dict(tiny()), out, progress=False)
    record = next((out / "runs").glob("*/record.json"))
    record.write_text(json.dumps(json.loads(record.read_text()) | {"seconds": 7200.0}))
    before = listing(out)
    args = ["sweep", config, "--out", out, "--executor", "submitit", "--slurm-time", "120"]
    code, _, sweep_err = call(args, capsys)
    plan_code, _, plan_err = call([*args, "--plan"], capsys)
    assert (code, plan_code) == (2, 2) and plan_err == sweep_err
    assert "slurm time 120 min cannot hold one run: the longest finished run" in plan_err
    assert listing(out) == before


def test_reused_phases_are_not_taken_for_their_cost(tmp_path):
    """A probe whose options changed re-runs on runs whose training and other probe are reused:
    the records say so, and the plan takes no reused phase for a measurement (those two are
    calibrated again: a record keeps the seconds of its last attempt only)."""
    out = tmp_path / "out"
    run_sweep(SweepConfig.from_dict(tiny()), out, progress=False)
    changed = tiny(probes={"robustness": {"draws": 1}, "selectivity": {"n": 6}})
    run_sweep(SweepConfig.from_dict(changed), out, progress=False)
    for path in (out / "runs").glob("*/record.json"):
        record = json.loads(path.read_text())
        assert record["reused"] == ["training", "robustness"] and record["epochs_trained"] == 0
    plan = plan_sweep(SweepConfig.from_dict(changed), out)
    assert plan.sources == {"training": "calibration", "robustness": "calibration",
                            "selectivity": "finished runs (2)"}
    assert plan.todo == 0


def test_medians_and_epochs_from_finished_runs(tmp_path):
    """Training scales with epochs: runs of 2 epochs estimate one of 4 at twice the seconds."""
    out = tmp_path / "out"
    run_sweep(SweepConfig.from_dict(tiny()), out, progress=False)
    table = read_table(out)
    per_epoch = statistics.median(table.seconds_training / 2)
    longer = tiny(runs=[{"width": 4, "epochs": 4}])
    plan = plan_sweep(SweepConfig.from_dict(longer), out)
    assert plan.todo == 1 and plan.sources["training"] == "finished runs (2)"
    (only,) = plan.run_seconds.values()
    probes = statistics.median(table.seconds_robustness) + statistics.median(table.seconds_selectivity)
    assert only == pytest.approx(4 * per_epoch + probes)
    assert plan.phases["training"] == pytest.approx(4 * per_epoch)
    shutil.rmtree(out)
