"""Sweeps (genprobe.sweep, genprobe.executors): the grid expands as written, run ids are stable,
the table is the same whichever executor runs it and however often the sweep is killed and
resumed, failed runs are recorded without stopping the sweep, and bad input is one line.

The sweeps here are tiny (two 2-epoch networks on a synthetic Gaussian mixture, two probes) and
run with one thread per job, so that every table can be compared exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import functools
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import genprobe.zoo.train as T
from genprobe import options
from genprobe.errors import ConfigError, OutputError
from genprobe.probes import registry
from genprobe.sweep import (
    SweepConfig,
    read_table,
    run_id,
    run_sweep,
)
from genprobe.zoo.train import TrainConfig
from invoke import call

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).parents[1] / "examples" / "sweeps"
TINY = {
    "name": "t",
    "train": {"arch": "fcn", "dataset": "gaussian", "dataset_options": {"dim": 6, "num_classes": 3},
              "n_train": 48, "n_test": 24, "epochs": 2, "batch_size": 16, "depth": 1},
    "grid": {"width": [4, 8]},
    "probes": {"robustness": {"draws": 1}, "selectivity": {"n": 9}},
    "baselines": False,
    "figures": False,
    "threads": 1,
}
"""Two runs, two probes: the sweep every executor and every kill is compared on."""


def tiny(**changes) -> dict:
    config = copy.deepcopy(TINY)
    config.update(changes)
    return config


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Equal tables, exactly (metrics and measures to the last bit), but for the wall times and
    peak memory (and whether the system could measure it)."""
    def costs(t):
        return [c for c in t.columns if c == "seconds" or c.startswith(("seconds_", "peak_mib_"))]
    times = costs(a)
    assert [c for c in times if not c.startswith("peak_mib_")] == \
        [c for c in costs(b) if not c.startswith("peak_mib_")]
    a, b = a.drop(columns=times), b.drop(columns=costs(b))
    a.attrs = {k: v for k, v in a.attrs.items() if k != "peaks"}
    b.attrs = {k: v for k, v in b.attrs.items() if k != "peaks"}
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert a.attrs == b.attrs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny sweep, uninterrupted, in this process (one job)."""
    out = tmp_path_factory.mktemp("reference") / "sweep"
    outcome = run_sweep(SweepConfig.from_dict(tiny()), out, progress=False)
    assert (outcome.runs, outcome.done, outcome.failed, outcome.reused) == (2, 2, 0, 0)
    return out


class Counter:
    """Wraps a function (keeping its signature) and counts the calls that do its work: not a
    sweep's check of a probe's options, which stops at its options_checked()."""

    def __init__(self, function):
        functools.update_wrapper(self, function)
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        try:
            return self.function(*args, **kwargs)
        except options.OptionsChecked:
            self.calls -= 1
            raise
        finally:
            self.calls += 1


@pytest.fixture
def counted(monkeypatch):
    """Counters on training and on both probes of the tiny sweep."""
    train = Counter(T.train_run)
    monkeypatch.setattr(T, "train_run", train)
    registry.list_probes()
    probes = {}
    for name in TINY["probes"]:
        spec = registry._PROBES[name]
        probes[name] = Counter(spec.function)
        monkeypatch.setitem(registry._PROBES, name, dataclasses.replace(spec, function=probes[name]))
    return train, probes


# ----------------------------------------------------------------------------- the grid


def test_grid_is_the_cartesian_product_in_order_then_the_runs():
    config = SweepConfig.from_dict(tiny(
        train=TINY["train"] | {"arch_options": {"activation": "tanh"}},
        grid={"lr": [0.1, 0.01], "width": [4, 8, 16], "label_noise": [0.0, 0.5]},
        runs=[{"lr": 0.3, "depth": 2, "seed": 3}, {"lr": 0.1, "width": 4, "label_noise": 0.0}]))
    runs = config.expand()
    expected = []
    for lr in (0.1, 0.01):  # the literal loop: the first key slowest
        for width in (4, 8, 16):
            for noise in (0.0, 0.5):
                expected.append((lr, width, noise, 1, 0))
    # then the explicit runs: the first with its own lr, depth and seed (the fcn's default width);
    # the second repeats the first grid point, and is kept once
    expected.append((0.3, 512, 0.0, 2, 3))
    got = [(r.config.lr, r.config.arch_options.get("width", 512), r.config.label_noise,
            r.config.arch_options["depth"], r.config.seed) for r in runs]
    assert got == expected
    assert all(r.config.arch_options["activation"] == "tanh" for r in runs)  # the base's options
    assert all(r.config.dataset_options == {"dim": 6, "num_classes": 3} for r in runs)
    assert len({r.id for r in runs}) == 13
    assert runs[0].hyperparameters["width"] == 4 and runs[0].hyperparameters["dataset_dim"] == 6


def test_arch_options_are_routed_and_checked_per_arch():
    config = SweepConfig.from_dict(tiny(grid={"arch": ["fcn"], "batchnorm": [False, True],
                                              "dropout": [0.0, 0.5], "weight_decay": [0.0, 1e-3]}))
    runs = config.expand()
    assert len(runs) == 8
    for run, (bn, dropout, wd) in zip(runs, itertools.product([False, True], [0.0, 0.5],
                                                              [0.0, 1e-3]), strict=True):
        assert run.config.arch_options["batchnorm"] is bn
        assert run.config.arch_options["dropout"] == dropout
        assert run.config.weight_decay == wd and "weight_decay" not in run.config.arch_options
    with pytest.raises(ConfigError, match="not an option of arch 'transformer'|neither"):
        SweepConfig.from_dict(tiny(grid={"arch": ["fcn", "transformer"], "width": [4]})).expand()


def test_yaml_exponents_are_numbers(tmp_path):
    path = write(tmp_path / "c.yaml", tiny(grid={"lr": ["1e-3", 0.1]}))
    runs = SweepConfig.from_yaml(path).expand()
    assert [r.config.lr for r in runs] == [1e-3, 0.1]


def test_run_ids_are_stable_readable_and_distinct():
    base = dict(arch="fcn", dataset="mnist1d", lr=0.1, label_noise=0.2, seed=0,
                arch_options={"width": 64, "depth": 3})
    config = TrainConfig(**base)
    # pinned: ids name run directories, so they must never change between versions or machines
    assert run_id(config) == "fcn-w64-lr0.1-ln0.2-s0-42b0c21f"
    same_run = [TrainConfig(**(base | {"arch_options": {"depth": 3, "width": 64}})),  # key order
                TrainConfig(**(base | {"lr": 0.1, "device": "cpu", "data_dir": "/x"})),  # where
                TrainConfig(**(base | {"arch_options": {"width": 64}})),  # depth 3 is the default
                TrainConfig(**(base | {"weight_decay": 5e-4}))]  # the default, explicitly
    assert {run_id(c) for c in same_run} == {run_id(config)}
    assert run_id(TrainConfig(**(base | {"lr": 1}))) == run_id(TrainConfig(**(base | {"lr": 1.0})))
    others = [base | {"seed": 1}, base | {"lr": 0.01}, base | {"epochs": 11},
              base | {"arch_options": {"width": 64, "dropout": 0.1}},
              base | {"dataset_options": {"data_seed": 1}}]
    ids = {run_id(TrainConfig(**c)) for c in others}
    assert len(ids) == len(others) and run_id(config) not in ids


# ----------------------------------------------------------------------------- running


def test_table_and_records(reference):
    table = read_table(reference)
    assert list(table.run) == [r.id for r in SweepConfig.from_dict(tiny()).expand()]
    hyper = ["width"]
    metrics = ["train_error", "test_error", "train_loss", "test_loss", "gap", "loss_gap"]
    assert list(table.columns[:8]) == ["run", *hyper, *metrics[:4], "gap", "loss_gap"]
    assert table.attrs["hyperparameters"] == hyper and table.attrs["metrics"] == metrics
    assert json.loads((reference / "table.json").read_text()) == table.attrs
    assert (table.status == "done").all() and table.error.isna().all()
    for row in table.itertuples():
        run = reference / "runs" / row.run
        record = json.loads((run / "record.json").read_text())
        metrics = pd.read_parquet(run / "metrics.parquet").iloc[-1]
        assert record["metrics"]["test_error"] == row.test_error == metrics.test_error
        assert row.gap == metrics.test_error - metrics.train_error
        assert row.loss_gap == metrics.test_loss - metrics.train_loss
        saved = json.loads((run / "probes" / "robustness" / "meta.json").read_text())["summary"]
        for key, value in saved.items():  # the saved result's summary, to the last bit
            cell = table.loc[row.Index, f"robustness.{key}"]
            assert pd.isna(cell) if value is None else cell == value
        assert record["threads"] == 1 and record["status"] == "done"
    assert yaml.safe_load((reference / "sweep.yaml").read_text())["probes"] == TINY["probes"]


def test_cost_columns_say_where_each_runs_time_went(reference):
    """seconds_training and one seconds_PROBE per probe (and seconds_baselines): each positive, and
    together the run's wall time but for its bookkeeping (reading metrics, writing the record)."""
    table = read_table(reference)
    phases = ["training", *TINY["probes"]]  # the tiny sweep has no baselines
    costs = [f"seconds_{p}" for p in phases]
    assert table.attrs["costs"] == costs and set(costs) <= set(table.columns)
    parts = table[costs]
    assert (parts > 0).all().all()
    total = parts.sum(axis=1)
    assert (total <= table.seconds).all()
    assert ((table.seconds - total) < 0.2 * table.seconds + 1.0).all(), (table.seconds, total)
    import genprobe as gp

    bare = pd.DataFrame(table)  # a table read without its attrs: the costs are no hyper-parameter
    bare.attrs = {}
    ranked = gp.rank_correlation(bare, measures=["robustness.critical_fraction"], bootstrap=0,
                                 min_models=2, max_train_error=1.0)
    assert ranked.attrs["hyperparameters"] == ["width"]


def test_rerun_skips_everything(reference, counted, tmp_path):
    before = read_table(reference)
    records = {p: p.stat().st_mtime_ns for p in (reference / "runs").glob("*/record.json")}
    outcome = run_sweep(SweepConfig.from_dict(tiny()), reference, progress=False)
    train, probes = counted
    assert (outcome.reused, outcome.done) == (2, 2)
    assert train.calls == 0 and all(p.calls == 0 for p in probes.values())
    assert {p: p.stat().st_mtime_ns for p in records} == records
    same(read_table(reference), before)


def test_two_jobs_give_the_same_table(reference, tmp_path):
    out = tmp_path / "two"
    outcome = run_sweep(SweepConfig.from_dict(tiny()), out, jobs=2, threads=1, progress=False)
    assert outcome.done == 2
    same(read_table(out), read_table(reference))


@pytest.mark.slow
def test_ray_gives_the_same_table(reference, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    outcome = run_sweep(SweepConfig.from_dict(tiny()), out, executor="ray", jobs=2, threads=1,
                        progress=False)
    assert outcome.done == 2
    same(read_table(out), read_table(reference))


@pytest.mark.slow
def test_ray_workers_run_at_the_local_executors_priority(monkeypatch):
    """Ray starts workers at nice 15; on the instance genprobe starts they run at the parent's
    priority, as the local executor's do."""
    pytest.importorskip("ray")
    from genprobe.executors import LocalExecutor, RayExecutor
    from sweep_work import niceness

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    seen = {}
    for executor in (LocalExecutor(jobs=1, threads=1), RayExecutor(jobs=1, threads=1)):
        outcomes: list[tuple] = []
        with executor:
            executor.run([{"n": 0}], niceness, started=lambda unit: None,
                         finished=lambda unit, record, error, out=outcomes: out.append((record, error)))
        (record, error), = outcomes
        seen[type(executor).__name__] = (record or {}).get("nice", error)
    assert seen == {"LocalExecutor": os.nice(0), "RayExecutor": os.nice(0)}


def in_ray(monkeypatch, work: str, units: list[int], *, gpus: int = 0, jobs: int = 1
           ) -> dict[int, tuple]:
    """{n: (record, error)} of units `units` run by `work` (a function of tests/sweep_work.py)
    on a local Ray instance of `jobs` CPUs and `gpus` GPUs (a GPU that Ray counts and nothing
    uses: a task that holds one gets a fresh process per call by Ray's default)."""
    ray = pytest.importorskip("ray")
    import sweep_work
    from genprobe.executors import RayExecutor

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    outcomes: dict[int, tuple] = {}
    ray.init(num_cpus=jobs, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _system_config={"worker_niceness": 0})
    try:
        with RayExecutor(jobs=jobs, threads=1, device="cuda" if gpus else "cpu") as executor:
            executor.run([{"n": n} for n in units], getattr(sweep_work, work),
                         started=lambda unit: None,
                         finished=lambda unit, record, error: outcomes.setdefault(
                             unit["n"], (record, error)))
    finally:
        ray.shutdown()
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("gpus", [0, 1])
def test_ray_workers_import_once_and_run_unit_after_unit(monkeypatch, gpus):
    """One Ray worker process runs every unit of a one-job sweep (it imports the work, genprobe
    and torch once), with or without a GPU (Ray gives a task holding a GPU a fresh process per
    call; genprobe's actors keep theirs), with its thread variables set."""
    outcomes = in_ray(monkeypatch, "die_on_odd", [0, 2, 4, 6], gpus=gpus)
    assert all(error is None for _, error in outcomes.values()), outcomes
    assert len({record["pid"] for record, _ in outcomes.values()}) == 1
    assert all(record["omp"] == "1" for record, _ in outcomes.values())


@pytest.mark.slow
def test_a_ray_worker_that_dies_is_recorded_and_replaced(monkeypatch):
    outcomes = in_ray(monkeypatch, "die_on_odd", [0, 1, 2, 3, 4])
    assert sorted(outcomes) == [0, 1, 2, 3, 4]
    for n, (record, error) in outcomes.items():
        if n % 2:
            assert record is None and error.startswith("ray: ActorDiedError"), error
        else:
            assert error is None and record["n"] == n
    pids = [outcomes[n][0]["pid"] for n in (0, 2, 4)]
    assert len(set(pids)) == 3  # each death gave the next unit a fresh worker


def test_changed_probe_options_redo_that_probe_only(reference, tmp_path, counted):
    import shutil

    out = tmp_path / "changed"
    shutil.copytree(reference, out)
    config = tiny(probes={"robustness": {"draws": 1}, "selectivity": {"n": 6}})
    outcome = run_sweep(SweepConfig.from_dict(config), out, progress=False)
    train, probes = counted
    assert train.calls == 0 and probes["robustness"].calls == 0 and probes["selectivity"].calls == 2
    assert outcome.reused == 0 and outcome.done == 2
    fresh = run_sweep(SweepConfig.from_dict(config), tmp_path / "fresh", progress=False)
    same(read_table(out), fresh.table)


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    config = write(tmp_path / "c.yaml", tiny(grid={"lr": [1e30, 0.05]}))  # the first diverges
    out = tmp_path / "out"
    code, stdout, err = call(["sweep", config, "--out", out], capsys)
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("genprobe: ")]
    assert len(lines) == 1 and "1 of 2 runs failed" in lines[0] and "again to retry" in lines[0]
    table = read_table(out)
    assert list(table.status) == ["failed", "done"]
    assert table.error[0].startswith("training: training diverged") and pd.isna(table.error[1])
    assert table.isna().loc[0, ["test_error", "robustness.base_error"]].all()
    assert table.notna().loc[1, ["test_error", "robustness.base_error"]].all()
    record = json.loads((out / "runs" / table.run[0] / "record.json").read_text())
    assert record["status"] == "failed" and record["error"] == table.error[0]
    train = Counter(T.train_run)
    monkeypatch.setattr(T, "train_run", train)
    code, _, _ = call(["sweep", config, "--out", out], capsys)  # retried; the done run is not
    assert code == 1 and train.calls == 1


def test_user_measures_join_the_table_and_the_ranking(tmp_path, caplog):
    import genprobe as gp

    measures = {"weight_norm": {"function": "user_measures:weight_norm", "direction": 1},
                **{name: f"user_measures:{name}" for name in ("raises", "nan", "tensor", "text")}}
    config = tiny(grid={"width": [4, 6, 8, 12]}, measures=measures, ranking={"min_models": 4})
    outcome = run_sweep(SweepConfig.from_dict(config), tmp_path / "s", progress=False)
    assert outcome.done == 4 and outcome.failed == 0  # a failing measure does not fail the run
    table = read_table(tmp_path / "s")
    assert table["user.weight_norm"].notna().all() and table["user.weight_norm"].nunique() == 4
    for name in ("raises", "nan", "tensor", "text"):
        assert table[f"user.{name}"].isna().all()
    record = json.loads((tmp_path / "s" / "runs" / table.run[0] / "record.json").read_text())
    errors = record["measure_errors"]
    assert errors["user.raises"] == ("user.raises: the function raised ValueError: this measure "
                                     "always fails")
    assert "returned nan, not a finite number" in errors["user.nan"]
    assert "returned a Tensor, not a number" in errors["user.tensor"]
    assert "returned a str, not a number" in errors["user.text"]
    assert all("\n" not in line for line in errors.values())
    ranking = gp.measures.rank_sweep(table, bootstrap=50, max_train_error=1.0).set_index("measure")
    assert ranking.loc["user.weight_norm", "direction"] == 1
    assert math.isfinite(ranking.loc["user.weight_norm", "kendall_tau"])
    assert "defined on 0 of 4 models" in ranking.loc["user.raises", "note"]


def test_peak_memory_per_phase_shows_what_a_phase_held(tmp_path):
    """peak_mib_PHASE: the worker's peak resident memory during each phase; a user measure that
    holds 512 MiB peaks at least 400 MiB above the tiny network's training, on every run."""
    from genprobe.memory import reset_peak_resident
    from genprobe.report.sweeps import cost_table

    if not reset_peak_resident():
        pytest.skip("this system cannot reset a process's peak resident memory (not Linux)")
    config = tiny(grid={"width": [4, 6]}, measures={"held": "user_measures:allocates"})
    run_sweep(SweepConfig.from_dict(config), tmp_path / "s", progress=False)
    table = read_table(tmp_path / "s")
    phases = ["training", *TINY["probes"], "user_measures"]
    assert table.attrs["peaks"] == [f"peak_mib_{p}" for p in phases]
    peaks = table[[f"peak_mib_{p}" for p in phases]]
    assert (peaks > 50).all().all()  # a process with torch loaded holds more than that
    assert (table.peak_mib_user_measures - table.peak_mib_training > 400).all(), peaks
    costs = cost_table(table).set_index("phase")
    assert costs.loc["user_measures", "peak_mib"] == table.peak_mib_user_measures.max()


def test_sweep_of_the_tiny_example(tmp_path, capsys):
    code, stdout, err = call(["sweep", EXAMPLES / "tiny.yaml", "--out", tmp_path / "s"], capsys)
    assert code == 0, err
    table = read_table(tmp_path / "s")
    assert len(table) == 4 and (table.status == "done").all()
    for probe in registry.list_probes():  # every registered probe is in the example
        assert any(c.startswith(f"{probe}.") for c in table.columns), probe
    assert "4 runs, 4 done" in stdout


def test_examples_are_valid():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        config = SweepConfig.from_yaml(path)
        assert set(config.probes) == set(registry.list_probes()), path
    runs = SweepConfig.from_yaml(EXAMPLES / "generalization.yaml").expand()
    assert len(runs) >= 24
    for key in ("lr", "label_noise", "seed"):
        assert len({getattr(r.config, key) for r in runs}) > 1
    assert len({r.config.arch_options["width"] for r in runs}) > 1


def test_core_sets_give_each_job_its_own_cores(monkeypatch):
    from genprobe import executors

    monkeypatch.setattr(executors, "available_cores", lambda: [0, 1, 2, 3, 5, 7])
    assert executors.core_sets(3, 2) == [[0, 1], [2, 3], [5, 7]]
    assert executors.core_sets(2, 1) == [[0], [1]]
    assert executors.core_sets(4, 2) == [[0, 1], [2, 3], [5, 7], [0, 1]]  # more than the cores
    assert executors.default_threads(2) == 3 and executors.default_threads(8) == 1


def in_workers(monkeypatch, work: str, count: int) -> dict[int, tuple]:
    """{n: (record, error)} of units 0..count-1 run by `work` (a function of tests/sweep_work.py)
    in two worker processes."""
    import sweep_work
    from genprobe.executors import LocalExecutor

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    outcomes: dict[int, tuple] = {}
    LocalExecutor(jobs=2, threads=1).run(
        [{"n": n} for n in range(count)], getattr(sweep_work, work), started=lambda unit: None,
        finished=lambda unit, record, error: outcomes.setdefault(unit["n"], (record, error)))
    return outcomes


@pytest.mark.slow
def test_a_worker_that_dies_is_recorded_and_replaced(monkeypatch):
    from genprobe.executors import available_cores

    outcomes = in_workers(monkeypatch, "die_on_odd", 5)
    assert sorted(outcomes) == [0, 1, 2, 3, 4]
    for n, (record, error) in outcomes.items():
        if n % 2:
            assert record is None and error == ("its worker process died (killed by SIGKILL; "
                                                "out of memory?)")
        else:
            assert error is None and record["n"] == n and record["omp"] == "1"
            assert len(record["cores"]) == 1 and record["cores"][0] in available_cores()


def test_a_worker_leaves_ctrl_c_to_its_parent(monkeypatch, capfd):
    outcomes = in_workers(monkeypatch, "interrupt_myself", 3)
    assert {n: error for n, (_, error) in outcomes.items()} == {0: None, 1: None, 2: None}
    assert "KeyboardInterrupt" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- SIGKILL


KILLED = textwrap.dedent("""
    import dataclasses, functools, sys, time
    from pathlib import Path
    import yaml
    import genprobe.zoo.train as T
    from genprobe import options
    from genprobe.probes import registry
    from genprobe.sweep import SweepConfig, run_sweep

    phase, marker, config, out = sys.argv[1:5]
    calls = {"n": 0}

    def stall(original, at):
        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            if options._CHECK_ONLY.get():  # the sweep checking options before training
                return original(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == at:  # in the second run: say so, then wait to be killed
                Path(marker).write_text(phase)
                time.sleep(600)
            return original(*args, **kwargs)
        return wrapped

    if phase == "training":  # epoch 0, 1, 2 of each run: the 6th is epoch 2 of the second run
        T._epoch_metrics = stall(T._epoch_metrics, 6)
    else:  # selectivity, the second probe, on the second run
        registry.list_probes()
        spec = registry._PROBES["selectivity"]
        registry._PROBES["selectivity"] = dataclasses.replace(spec, function=stall(spec.function, 2))
    run_sweep(SweepConfig.from_dict(yaml.safe_load(open(config))), out, progress=False)
""")


def kill_when(phase: str, tmp_path: Path, config: Path, out: Path) -> None:
    """Start the tiny sweep in a process group, SIGKILL the group once it reaches `phase` of
    its second run."""
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, phase, marker, config, out],
                            start_new_session=True, stderr=subprocess.PIPE,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timeout"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


@pytest.mark.parametrize("phase", [
    # training resumes as `genprobe train --resume` does (tested in test_train); slow: a second
    # process start (importing genprobe costs seconds)
    pytest.param("training", marks=pytest.mark.slow),
    "probing"])
def test_sigkill_then_resume_gives_the_same_table(phase, reference, tmp_path, counted):
    config, out = write(tmp_path / "c.yaml", tiny()), tmp_path / "out"
    kill_when(phase, tmp_path, config, out)
    first, second = [r.id for r in SweepConfig.from_dict(tiny()).expand()]
    assert (out / "runs" / first / "record.json").is_file()
    assert not (out / "runs" / second / "record.json").exists()
    assert [line.split()[0] for line in (out / ".lock").read_text().splitlines()]  # a dead pid
    if phase == "training":
        assert (out / "runs" / second / "resume.safetensors").is_file()
        assert not (out / "runs" / second / "final.safetensors").exists()
    else:
        assert (out / "runs" / second / "probes" / "robustness" / "meta.json").is_file()
        assert not (out / "runs" / second / "probes" / "selectivity").exists()
    outcome = run_sweep(SweepConfig.from_yaml(config), out, progress=False)
    train, probes = counted
    assert outcome.reused == 1 and outcome.done == 2
    assert train.calls == (1 if phase == "training" else 0)  # the second run, resumed
    assert probes["robustness"].calls == (1 if phase == "training" else 0)
    assert probes["selectivity"].calls == 1
    same(read_table(out), read_table(reference))
    leftovers = [p for p in out.rglob(".*") if p.name not in (".genprobe-sweep", ".lock",
                                                                ".genprobe-run", ".genprobe-result")]
    assert not leftovers


@pytest.mark.slow
def test_sigkill_at_arbitrary_moments_with_two_jobs(reference, tmp_path):
    """Killed again and again (workers included) a moment after each new file appears, wherever
    the work then is, the sweep still ends with the uninterrupted table."""
    config, out = write(tmp_path / "c.yaml", tiny(jobs=2)), tmp_path / "out"
    code = ("import sys; from genprobe.sweep import SweepConfig, run_sweep; "
            "run_sweep(SweepConfig.from_yaml(sys.argv[1]), sys.argv[2], progress=False)")

    def files() -> frozenset:  # the runs' files, sizes and times: progress of the work itself
        # (a count alone missed progress that replaces files, so a run could finish unkilled)
        found = set()
        for path in (out / "runs").rglob("*") if (out / "runs").exists() else ():
            try:
                st = path.stat()
            except FileNotFoundError:  # replaced while we looked
                continue
            found.add((str(path), st.st_size, st.st_mtime_ns))
        return frozenset(found)

    kills, pause = 0, random.Random(0)
    while kills < 6:
        before = files()
        proc = subprocess.Popen([sys.executable, "-c", code, config, out], start_new_session=True,
                                stderr=subprocess.DEVNULL, env=os.environ | {"OMP_NUM_THREADS": "1"})
        while proc.poll() is None and files() == before:
            time.sleep(0.005)
        if proc.poll() is not None:
            break
        time.sleep(pause.uniform(0.0, 0.1))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 2, f"the sweep finished after {kills} kill(s); it was to be killed more"
    outcome = run_sweep(SweepConfig.from_yaml(config), out, progress=False)
    assert outcome.done == 2
    same(read_table(out), read_table(reference))


# ----------------------------------------------------------------------------- bad input


def test_a_locked_sweep_directory_is_refused(reference, capsys):
    with open(reference / ".lock", "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0)
        held.truncate()
        held.write("4242\n")
        held.flush()
        with pytest.raises(OutputError, match=r"in use by another genprobe sweep \(pid 4242\)"):
            run_sweep(SweepConfig.from_dict(tiny()), reference, progress=False)
    before = read_table(reference)
    run_sweep(SweepConfig.from_dict(tiny()), reference, progress=False)  # released: fine again
    same(read_table(reference), before)


NO_GRID = object()
"""A change that removes the grid from the tiny config."""

BAD = [
    # (changes to the tiny config, extra command-line arguments, the message)
    ({"prboes": {}}, [], "unknown key 'prboes'; did you mean 'probes'?"),
    ({"train": TINY["train"] | {"widht": 4}}, [], "'widht' is neither a training option nor an "
     "option of arch 'fcn'; did you mean 'width'?"),
    ({"grid": {"lrr": [0.1]}}, [], "did you mean 'lr'?"),
    ({"grid": {"lr": []}}, [], "zero runs (grid key 'lr' has no values)"),
    ({"grid": NO_GRID}, [], "zero runs (it has neither a grid nor runs)"),
    ({"grid": NO_GRID, "runs": []}, [], "zero runs"),
    ({"grid": {"lr": 0.1}}, [], "grid key 'lr' must be a list of values"),
    ({"probes": {"robustnes": {}}}, [], "unknown probe 'robustnes'; did you mean 'robustness'? "
     "registered probes: ablation, "),
    ({"probes": {"robustness": {"drawz": 1}}}, [], "unknown option 'drawz' of probe 'robustness'; "
     "did you mean 'draws'?"),
    ({"baselines": {"nn": 100}}, [], "unknown option 'nn' of baselines; did you mean 'n'?"),
    ({"probes": {"ntk": {"out": "kernels"}}}, [], "option 'out' of probe 'ntk' names one folder"),
    ({"figures": "yes"}, [], "figures must be true or false"),
    ({"train": TINY["train"] | {"device": "cpu"}}, [], "device is not swept; set it with --device"),
    ({"grid": {"width": [0]}}, [], "width must be an integer >= 1"),
    ({"train": TINY["train"] | {"dataset": "nope"}}, [], "unknown dataset='nope'"),
    ({"jobs": 0}, [], "jobs must be an integer >= 1"),
    ({}, ["--jobs", "0"], "jobs must be an integer >= 1"),
    ({}, ["--executor", "rey"], "unknown executor='rey'"),
    ({}, ["--address", "127.0.0.1:1"], "--address names a Ray cluster; add --executor ray"),
    ({}, ["--executor", "ray", "--address", "nowhere"], "write host:port"),
    ({}, ["--executor", "ray", "--address", "CLOSED"], "cannot be reached"),
    ({}, ["--executor", "ray", "NO-RAY"], "pip install 'genprobe[ray]'"),
    ({"measures": {"m": "nowhere_at_all.module:f"}}, [], "measure 'm': cannot import module "
     "'nowhere_at_all.module'"),
    ({"measures": {"m": "user_measures:missing"}}, [], "module 'user_measures' has no 'missing'"),
    ({"measures": {"m": "user_measures:NOT_A_FUNCTION"}}, [], "is a int, not a function"),
    ({"measures": {"m": "user_measures"}}, [], "is not an import path; write 'package.module:function'"),
    ({"measures": {"bad name": "user_measures:nan"}}, [], "must be a simple identifier"),
    ({"measures": {"m": {"function": "user_measures:nan", "direction": 2}}}, [], "direction must be"),
    ({"ranking": {"level": 1.5}}, [], "level must be a number strictly between 0 and 1"),
    ({"ranking": {"min_models": 1}}, [], "min_models must be an integer >= 2"),
    ({"ranking": {"bootstrp": 10}}, [], "unknown option 'bootstrp'"),
    ({"grid": {"lr": [0.1] * 20, "width": list(range(1, 21)), "seed": list(range(10))}}, [],
     "the sweep has 4,000 runs (20 lr × 10 seed × 20 width), more than 1,000; pass --allow-large"),
    # each probe's options against each run's model, data and planned checkpoints, before training
    ({"probes": {"selectivity": {"per_class": "ten"}}}, [], "run fcn-w4-d1-bs16-lr0.05-ln0-s0-"
     "3cbc7b69: probe 'selectivity': per_class must be an integer >= 1, got 'ten'"),
    ({"probes": {"ntk": {"n": -5}}}, [], "probe 'ntk': n must be an integer >= 1, got -5"),
    ({"probes": {"robustness": {"checkpoints": [99]}}}, [],
     "probe 'robustness': no checkpoint for epoch 99; recorded epochs: [0, 1, 2]"),
    ({"probes": {"robustness": {"modules": "conv*"}}}, [], "module pattern 'conv*' matches no module"),
    ({"probes": {"ablation": {"layers": "nosuch"}}}, [], "layer pattern 'nosuch' matches no module"),
    ({"probes": {"ablation": {"steps": 6}}}, [], "steps=6 is beyond the unit count of a layer (4 units)"),
    ({"probes": {"stiffness": {"per_class": 40}}}, [], "has only"),
    ({"probes": {"activation_noise": {"n": 1000}}}, [], "n=1000 is larger than the test split (24"),
    ({"probes": {"criticality": {"batch_size": 0}}}, [], "batch_size must be an integer >= 1, got 0"),
    ({"probes": {"ntk": {"n": 48, "memory_budget": 1000}}}, [], "more than the memory budget"),
    ({"baselines": {"n": -5}}, [], "baselines: n must be an integer >= 1, got -5"),
]


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("change, args, message", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(change, args, message, tmp_path, capsys,
                                                  monkeypatch):
    if "NO-RAY" in args:
        monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    elif "ray" in args:
        pytest.importorskip("ray")
    args = [f"127.0.0.1:{closed_port()}" if a == "CLOSED" else a for a in args if a != "NO-RAY"]
    config = {k: v for k, v in (TINY | change).items() if v is not NO_GRID}
    began = time.monotonic()
    code, _, err = call(["sweep", write(tmp_path / "c.yaml", config), "--out", tmp_path / "out",
                         *args], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("genprobe: error: "), err
    assert message in err
    assert time.monotonic() - began < 20  # an unreachable cluster is a prompt error, not a hang
    assert not (tmp_path / "out").exists()


def test_bad_probe_options_fail_before_any_run_trains(counted, tmp_path):
    """The second run's model is the one the options do not fit: the check covers every run,
    and nothing trains before it."""
    train, _ = counted
    config = tiny(grid={"width": [8, 4]}, probes={"robustness": {"draws": 1},
                                                  "selectivity": {"n": 9}, "ablation": {"steps": 6}})
    with pytest.raises(ConfigError, match=r"run fcn-w4-.*probe 'ablation': steps=6 is beyond"):
        run_sweep(SweepConfig.from_dict(config), tmp_path / "out", progress=False)
    assert train.calls == 0
    assert not (tmp_path / "out").exists()


def test_a_folder_genprobe_did_not_write_is_refused(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, _, err = call(["sweep", write(tmp_path / "c.yaml", tiny()), "--out", mine], capsys)
    assert code == 2 and "is not a genprobe sweep directory (it holds notes.txt)" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
