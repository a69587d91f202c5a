"""The plan of a sweep: how many runs, what one costs in each phase, and how long the lot will
take on the chosen executor — before any work starts (``genprobe sweep CONFIG --plan``).

Where the estimate comes from, phase by phase (training, each probe, the baselines, the user's
measures — the ``seconds_PHASE`` columns of the table):

- **finished runs of this sweep** in the sweep directory, when it has some: the median over the
  runs recorded ``done`` of each phase's seconds, counting only the phases that did their work in
  that attempt (not a probe result loaded from before, not a training finished before: the record
  says which in ``reused``), and for a probe only the runs that ran it with the config's options.
  Training is scaled by epochs: the median of each run's training seconds per epoch it trained
  (``seconds_training / epochs_trained``) × the epochs of the run to estimate (its ``epochs``; with
  a stop target, the median epochs the finished runs trained, at most its ``epochs``).
- **a calibration** for every phase no finished run measured: the first run to do, for real but
  cut down — trained :data:`CALIBRATION_EPOCHS` epoch, then every probe, the baselines and the
  user's measures once on it, with the run's planned checkpoints present (each a copy of the one
  trained state), so that a probe that works per checkpoint does the real run's amount of work.
  Training is extrapolated: the same run is also trained for one epoch more, the difference is
  an epoch's cost and the rest a run's fixed cost (loading its data, building its model), and a
  run of E epochs costs fixed + E epochs (with a stop target E is its ``epochs``: an upper
  bound). The other phases are taken as measured, on a network trained one epoch (a probe whose
  cost depends on the trained state, such as criticality's search, may differ on the real run).
  The calibration runs twice, in this process, with the sweep's threads per run: the first pass
  pays what a worker pays once, on its first run (imports, lazy initialisation; reported as
  ``startup_seconds``), the second is the estimate. It runs in a folder made with
  :func:`tempfile.mkdtemp`, removed afterwards (only that folder).

The total: the sum of the estimates of the runs to do (a run whose training finished before costs
no training) divided by the runs at once (``--jobs``, at most the runs to do; with ``--executor
submitit`` and no ``--jobs``, all of them) — a lower bound when the runs do not divide evenly
among the jobs, and without the start-up (one per worker, and Ray's own start). Measured on the
tests' tiny sweep (``tests/test_plan.py``): from finished runs each phase within 1.0–1.2× of the
measured medians, from the calibration within 0.6–1.6×.

The plan writes nothing into the sweep directory, and refuses what the sweep would refuse, with
the same one-line errors (it goes through the same checks, :func:`genprobe.sweep.run._prepare`).
With ``--executor submitit`` it says whether the job time limit holds the longest run by the
estimate (:func:`genprobe.executors.time_limit_problem`); a finished run longer than the limit is
the sweep's own error.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import store
from ..errors import RunError
from ..outputs import jsonable
from .config import SweepConfig, SweepRun, run_id
from .layout import RUNS_DIR, _current, read_record, run_dir
from .run import _longest_run, _prepare

log = logging.getLogger(__name__)

CALIBRATION_EPOCHS = 1
"""Epochs the calibration run trains: one shows an epoch's cost; the probes then run on it."""


@dataclass
class SweepPlan:
    """What :func:`plan_sweep` estimates (see the module docstring for where each number comes
    from). Seconds are wall seconds of one run with the sweep's threads per run."""

    out: Path
    runs: int
    done: int
    """Runs already done in `out` under this config (the sweep skips them)."""
    todo: int
    executor: str
    """The executor as the sweep's log names it (kind, jobs, threads)."""
    parallel: int
    """Runs at once: the jobs, at most the runs to do (at least 1)."""
    phases: dict[str, float]
    """Estimated seconds of one run in each phase (training: the median over the runs to do)."""
    sources: dict[str, str]
    """Where each phase's estimate comes from: ``finished runs (N)`` or ``calibration``."""
    seconds_per_epoch: float
    training_fixed: float
    """A run's training cost besides its epochs (from a calibration; 0 from finished runs,
    whose seconds per epoch hold it)."""
    epochs: float
    """The median epochs of the runs to do (of all runs when none is left)."""
    total_seconds: float
    """The work left: the sum of the estimates of the runs to do."""
    wall_seconds: float
    """``total_seconds / parallel``."""
    startup_seconds: float | None = None
    """What a worker pays once, on its first run (the calibration's first pass less its second);
    None without a calibration."""
    calibrated: str | None = None
    """The run the calibration cut down (None without one)."""
    time_limit: str | None = None
    """With ``--executor submitit``: whether the job time limit holds the longest run."""
    time_limit_holds: bool | None = None
    upper_bound: bool = False
    """Whether training is estimated at the most epochs of runs that stop at a target (no
    finished run says when they stop)."""
    run_seconds: dict[str, float] = field(default_factory=dict)
    """The estimate of each run to do, by run id."""

    @property
    def per_run(self) -> float:
        """Estimated seconds of one run (the sum of :attr:`phases`)."""
        return sum(self.phases.values())

    def text(self) -> str:
        """The plan as ``genprobe sweep --plan`` prints it."""
        lines = [f"{self.runs} runs in {self.out}: {self.done} done, {self.todo} to do; "
                 f"{self.executor}"]
        how = (f"from a calibration of run {self.calibrated} ({CALIBRATION_EPOCHS} epoch, then each "
               "probe once, in a temporary folder since removed)" if self.calibrated else
               "from the finished runs of this sweep")
        lines.append(f"estimated seconds of one run, by phase ({how}):")
        width = max(len(p) for p in [*self.phases, "one run"])
        for phase, seconds in self.phases.items():
            note = self.sources[phase]
            if phase == "training":
                fixed = f" + {self.training_fixed:.3g} s" if self.training_fixed else ""
                most = "at most " if self.upper_bound else ""
                note = (f"{self.seconds_per_epoch:.3g} s/epoch × {most}{self.epochs:g} epochs{fixed}; "
                        f"{note}" + ("; extrapolated" if note == "calibration" else ""))
            lines.append(f"  {phase:<{width}}  {seconds:10.2f} s   {note}")
        lines.append(f"  {'one run':<{width}}  {self.per_run:10.2f} s")
        lines.append(f"total: {self.todo} runs to do, {_duration(self.total_seconds)} of work; "
                     f"{self.parallel} at once: about {_duration(self.wall_seconds)} wall"
                     if self.todo else "total: nothing to do (every run is done)")
        if self.upper_bound:
            lines.append("  (an upper bound: runs with a stop target end when they reach it)")
        if self.startup_seconds:
            lines.append(f"  (plus about {_duration(self.startup_seconds)} per worker on its first "
                         "run: imports and lazy initialisation)")
        if self.time_limit:
            lines.append(self.time_limit)
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def phases_of(config: SweepConfig) -> list[str]:
    """The phases of a run of `config`, in order: ``training``, each probe, ``baselines`` (when
    computed), ``user_measures`` (when there are some): the table's ``seconds_PHASE`` columns."""
    return ["training", *config.probes, *(["baselines"] if config.baselines is not None else []),
            *(["user_measures"] if config.measures else [])]


def plan_sweep(config: SweepConfig | str | Path, out: str | Path | None = None, *,
               jobs: int | None = None, threads: int | None = None, executor: str = "local",
               address: str | None = None, device: str = "auto", allow_large: bool = False,
               slurm: Mapping[str, Any] | None = None, wait: bool = True) -> SweepPlan:
    """Estimate what :func:`~genprobe.sweep.run_sweep` with the same arguments would cost, without
    running it (see the module docstring): the runs, done and to do, each phase's seconds per
    run, and the total for the executor's jobs. Writes nothing into `out`; raises what the sweep
    would raise, before it would start (ConfigError, DataError, OutputError, ...); RunError when
    the calibration run fails (its one-line error)."""
    import torch

    from .run import default_out

    if not isinstance(config, SweepConfig):
        config = SweepConfig.from_yaml(config)
    out = Path(out) if out is not None else default_out(config)
    finished = _longest_run(out)
    config, runs, out, runner = _prepare(config, out, jobs=jobs, threads=threads, executor=executor,
                                         address=address, device=device, allow_large=allow_large,
                                         slurm=slurm, wait=wait,
                                         check_time=finished is not None)
    records = {r.id: rec for r in runs if (rec := read_record(run_dir(out, r.id), r.id)) is not None}
    todo = [r for r in runs if not _current(records.get(r.id), config)]
    samples, epochs_run = _samples(list(records.values()), config)
    estimate = {p: statistics.median(v) for p, v in samples.items() if v}
    sources = {p: f"finished runs ({len(v)})" for p, v in samples.items() if v}
    startup = calibrated = None
    fixed = 0.0
    missing = [p for p in phases_of(config) if p not in estimate]
    if missing:
        first = (todo or runs)[0]
        threads_before = torch.get_num_threads()
        quiet = logging.getLogger("genprobe")  # the warnings of a network trained one epoch
        level = quiet.level                    # (a NaN baseline ...) say nothing of the sweep
        quiet.setLevel(logging.ERROR)
        try:
            measured, training_fixed, startup = _calibrate(first, config, device, runner.threads)
        finally:
            torch.set_num_threads(threads_before)
            quiet.setLevel(level)
        calibrated = first.id
        for phase in missing:
            estimate[phase], sources[phase] = measured.get(phase, 0.0), "calibration"
        if "training" in missing:
            fixed = training_fixed
    per_epoch = estimate.pop("training")
    others = {p: estimate[p] for p in phases_of(config) if p != "training"}

    def epochs(run: SweepRun) -> float:
        c = run.config
        if c.stop_targets() and epochs_run:
            return min(c.epochs, statistics.median(epochs_run))
        return c.epochs

    shown = todo or runs
    run_epochs = statistics.median(epochs(r) for r in shown)
    training = {r.id: fixed + per_epoch * epochs(r) for r in shown}
    full = {r.id: training[r.id] + sum(others.values()) for r in shown}
    cost = {r.id: full[r.id] - (training[r.id] if (run_dir(out, r.id) / store.FINAL).is_file()
                                else 0.0) for r in todo}
    total = sum(cost.values())
    parallel = max(1, min(runner.jobs or len(todo), len(todo)))
    plan = SweepPlan(out=out, runs=len(runs), done=len(runs) - len(todo), todo=len(todo),
                     executor=runner.describe(), parallel=parallel,
                     phases={"training": statistics.median(training.values())} | others,
                     sources=sources, seconds_per_epoch=per_epoch, training_fixed=fixed,
                     epochs=run_epochs,
                     total_seconds=total, wall_seconds=total / parallel, startup_seconds=startup,
                     calibrated=calibrated, run_seconds=cost,
                     upper_bound=not epochs_run and any(r.config.stop_targets() for r in shown))
    if executor == "submitit":
        from ..executors import time_limit_problem

        limit, longest = runner.options["time"], max(full.values())
        problem = time_limit_problem(limit, longest, basis="by this plan's estimate the longest "
                                     "run takes")
        plan.time_limit_holds = problem is None
        plan.time_limit = problem or (f"slurm time {limit} min holds one run: by this plan's "
                                      f"estimate the longest run takes {_duration(longest)}")
    return plan


def _samples(records: list[dict[str, Any]], config: SweepConfig
             ) -> tuple[dict[str, list[float]], list[int]]:
    """The seconds each phase took in the finished runs of `records` that did that phase's work
    (training: seconds per epoch trained), and the epochs each run trained in all."""
    samples: dict[str, list[float]] = {p: [] for p in phases_of(config)}
    epochs_run: list[int] = []
    for record in records:
        if record.get("status") != "done":
            continue
        seconds = record.get("phase_seconds") or {}
        reused = set(record.get("reused") or [])
        metrics = record.get("metrics") or {}
        if metrics.get("epochs_run"):
            epochs_run.append(int(metrics["epochs_run"]))
        trained = record.get("epochs_trained", metrics.get("epochs_run"))  # older records: all
        if "training" in seconds and "training" not in reused and trained:
            samples["training"].append(seconds["training"] / trained)
        for name, options in config.probes.items():
            ran = (record.get("probes") or {}).get(name)
            if name in seconds and name not in reused and ran is not None \
                    and jsonable(ran) == jsonable(options):
                samples[name].append(seconds[name])
        if "baselines" in samples and "baselines" in seconds \
                and jsonable(record.get("baselines")) == jsonable(config.baselines):
            samples["baselines"].append(seconds["baselines"])
        if "user_measures" in samples and "user_measures" in seconds \
                and jsonable(record.get("user_measures")) == jsonable(config.measures):
            samples["user_measures"].append(seconds["user_measures"])
    return samples, epochs_run


def _calibrate(run: SweepRun, config: SweepConfig, device: str, threads: int
               ) -> tuple[dict[str, float], float, float]:
    """Run `run` cut down (module docstring) twice in a temporary folder, removed afterwards:
    the second pass's seconds of each phase (training: per epoch), a run's fixed training cost,
    and what the first pass cost more (a worker's start-up)."""
    from ..zoo.train import TrainConfig
    from .work import run_unit

    def shortened(epochs: int):
        return TrainConfig.from_dict(run.config.to_dict() | {
            "epochs": epochs, "checkpoints": "every", "stop_loss": None, "stop_error": None})

    planned = run.config.checkpoint_epochs()
    temp = Path(tempfile.mkdtemp(prefix="genprobe-plan-"))
    log.info("calibrating the plan on run %s (%d epoch) in %s", run.id, CALIBRATION_EPOCHS, temp)

    def unit(folder: Path, epochs: int, work: bool) -> dict[str, Any]:
        short = shortened(epochs)
        return {"out": str(folder), "run": run_id(short), "train": short.to_dict() | {"device": device},
                "hyperparameters": run.hyperparameters, "figures": config.figures,
                "device": device, "threads": threads,
                "probes": config.probes if work else {}, "measures": config.measures if work else {},
                "baselines": config.baselines if work else None}

    passes = []
    try:
        for n in range(2):
            folder = temp / f"pass-{n}"
            trained = _check(run_unit(unit(folder, CALIBRATION_EPOCHS, False)), run)
            where = folder / RUNS_DIR / trained["run"]
            state = store.checkpoint_path(where, CALIBRATION_EPOCHS)
            for epoch in planned:  # the real run's checkpoints, each the one trained state
                if not store.checkpoint_path(where, epoch).is_file():
                    shutil.copyfile(state, store.checkpoint_path(where, epoch))
            probed = _check(run_unit(unit(folder, CALIBRATION_EPOCHS, True)), run)
            seconds = dict(probed["phase_seconds"])
            seconds["training"] = trained["phase_seconds"]["training"]
            passes.append((seconds, trained["seconds"] + probed["seconds"]))
        longer = _check(run_unit(unit(temp / "longer", CALIBRATION_EPOCHS + 1, False)), run)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    (_, first), (seconds, second) = passes
    short, long = seconds["training"], longer["phase_seconds"]["training"]
    per_epoch = long - short if long > short else short / CALIBRATION_EPOCHS
    seconds["training"] = per_epoch
    return seconds, max(0.0, short - per_epoch * CALIBRATION_EPOCHS), max(0.0, first - second)


def _check(record: dict[str, Any], run: SweepRun) -> dict[str, Any]:
    if record["status"] != "done":
        raise RunError(f"the plan's calibration of run {run.id} failed, so nothing can be "
                       f"estimated: {record['error']}")
    return record


__all__ = ["CALIBRATION_EPOCHS", "SweepPlan", "phases_of", "plan_sweep"]
