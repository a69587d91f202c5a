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
  Training is extrapolated: the same run is also trained for more epochs (as many as take about
  :data:`CALIBRATION_SECONDS`, at least 2, at most its own), the difference over the extra epochs
  is an epoch's cost and the rest a run's fixed cost (loading its data, building its model), and
  a run of E epochs costs fixed + E epochs (with a stop target E is its ``epochs``: an upper
  bound). The other phases are taken as measured, on a network trained one epoch (a probe whose
  cost depends on the trained state, such as criticality's search, may differ on the real run).
  The calibration runs in a fresh worker process started as the local executor starts one (the
  sweep's threads per run, set before torch loads, on its own cores): a first pass pays what a
  worker pays once, on its first run (imports, the dataset's source read once per process;
  reported as ``startup_seconds``), then measured passes follow — one, or for a short run as
  many as fill :data:`CALIBRATION_SECONDS` (at most :data:`CALIBRATION_REPEATS`), each phase's
  estimate their median. It runs in a folder made with :func:`tempfile.mkdtemp`, removed
  afterwards (only that folder). Only the first run is calibrated: runs of other sizes (a wider
  network) cost what they cost. It runs on this machine: with ``--executor submitit`` or a Ray
  cluster, the nodes may be faster or slower.

The total: the sum of the estimates of the runs to do (a run whose training finished before costs
no training) divided by the runs at once (``--jobs``, at most the runs to do; with ``--executor
submitit`` and no ``--jobs``, all of them), plus one worker's start-up when a calibration
measured it — a lower bound when the runs do not divide evenly among the jobs, without Ray's own
start (about 8 s on one machine) or a SLURM queue, and for a machine as loaded as it was during
the calibration. Measured on the
tests' tiny sweep (``tests/test_plan.py``), each phase's estimate over the median the sweep then
measured: from its finished runs 1.0× (the same medians); from the calibration 0.6–1.2× over 10
repetitions on the 2-core machine with another job beside them (phases of 30–60 ms), and one run
plus the start-up 0.9–1.1× of a worker's first run.

The plan writes nothing into the sweep directory, and refuses what the sweep would refuse, with
the same one-line errors (it goes through the same checks, :func:`genprobe.sweep.run._prepare`).
With ``--executor submitit`` it says whether the job time limit holds the longest run by the
estimate (:func:`genprobe.executors.time_limit_problem`); a finished run longer than the limit is
the sweep's own error.
"""

from __future__ import annotations

import logging
import math
import shutil
import statistics
import tempfile
import time
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
"""Epochs the calibration run trains before its probes run on it."""
CALIBRATION_SECONDS = 1.0
"""About how long the calibration's longer training lasts (more epochs when one is short): an
epoch's cost is the difference of two training times, which must stand well above their noise
(a 40 ms epoch measured as the difference of 1 and 2 epochs came out anywhere from 0.6× to 4×).
Also the time the measured passes fill: a short run is calibrated again, up to
:data:`CALIBRATION_REPEATS` times, and each phase's estimate is the median."""
CALIBRATION_REPEATS = 5
"""At most this many measured passes (after the first, which pays the start-up)."""


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
    """``total_seconds / parallel``, plus :attr:`startup_seconds` when known (the workers start
    together; 0 when nothing is left to do)."""
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
        how = (f"from a calibration of run {self.calibrated} ({CALIBRATION_EPOCHS} epoch, then "
               "every probe on it, in a worker process and a temporary folder since removed)"
               if self.calibrated else
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
        if self.startup_seconds and self.todo:
            lines.append(f"  (of which about {_duration(self.startup_seconds)} for each worker's "
                         "first run: imports, its data read once)")
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
        measured, training_fixed, startup = _calibrate(first, config, device, runner.threads)
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
                     total_seconds=total,
                     wall_seconds=total / parallel + (startup or 0.0) if todo else 0.0,
                     startup_seconds=startup,
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
    """Run `run` cut down (module docstring) in a fresh worker process, as the local executor
    starts one (:class:`genprobe.executors._Worker`: its threads set before torch loads, on its
    own cores), in a temporary folder made and removed here: the seconds of each phase in the
    second pass (training: per epoch), a run's fixed training cost, and what the first pass cost
    more (a worker's start-up: imports, its data source read for the first time). RunError
    (one line) when a calibration run fails or its process dies."""
    from ..executors import STOP_WAIT_S, _Worker, core_sets

    temp = Path(tempfile.mkdtemp(prefix="genprobe-plan-"))
    log.info("calibrating the plan on run %s (%d epoch) in %s", run.id, CALIBRATION_EPOCHS, temp)
    unit = {"temp": str(temp), "run": run.id, "train": run.config.to_dict(),
            "hyperparameters": run.hyperparameters, "probes": config.probes,
            "baselines": config.baselines, "measures": config.measures, "figures": config.figures,
            "device": device, "threads": threads}
    worker = None
    try:
        worker = _Worker(_calibration, core_sets(1, threads)[0], threads)
        worker.send(unit)
        result, died = worker.receive()
        worker.unit = None
    finally:
        if worker is not None:
            worker.stop()
            worker.reap(time.monotonic() + STOP_WAIT_S)
        shutil.rmtree(temp, ignore_errors=True)
    if result is None or "error" in result:
        why = died if result is None else result["error"]
        raise RunError(f"the plan's calibration of run {run.id} failed, so nothing can be "
                       f"estimated: {why}")
    return result["seconds"], result["fixed"], result["startup"]


def _calibration(unit: dict[str, Any]) -> dict[str, Any]:
    """The calibration's work in its worker process (:func:`_calibrate`): passes of the run cut
    down to :data:`CALIBRATION_EPOCHS` (the first for the start-up; each later one with a longer
    training); ``{"seconds", "fixed", "startup"}``, or ``{"error"}`` with the failed run's
    one-line error."""
    from ..zoo.train import TrainConfig
    from .work import run_unit

    logging.getLogger("genprobe").setLevel(logging.ERROR)  # a network trained one epoch warns
    full = TrainConfig.from_dict(unit["train"])             # (a NaN baseline ...): not the sweep's
    temp = Path(unit["temp"])

    def work(folder: Path, epochs: int, probes: bool) -> dict[str, Any]:
        short = TrainConfig.from_dict(unit["train"] | {
            "epochs": epochs, "checkpoints": "every", "stop_loss": None, "stop_error": None})
        record = run_unit({
            "out": str(folder), "run": run_id(short), "train": short.to_dict() | {"device": unit["device"]},
            "hyperparameters": unit["hyperparameters"], "figures": unit["figures"],
            "device": unit["device"], "threads": unit["threads"],
            "probes": unit["probes"] if probes else {}, "measures": unit["measures"] if probes else {},
            "baselines": unit["baselines"] if probes else None})
        if record["status"] != "done":
            raise RunError(record["error"])
        return record

    try:
        first = spent = 0.0
        passes: list[tuple[dict[str, float], float, float]] = []  # (phases, longer training, total)
        extra = CALIBRATION_EPOCHS
        while not passes or (len(passes) < CALIBRATION_REPEATS and spent < CALIBRATION_SECONDS):
            folder = temp / f"pass-{len(passes) + (first > 0)}"
            trained = work(folder, CALIBRATION_EPOCHS, False)
            where = folder / RUNS_DIR / trained["run"]
            state = store.checkpoint_path(where, CALIBRATION_EPOCHS)
            for epoch in full.checkpoint_epochs():  # the real run's checkpoints, each this state
                if not store.checkpoint_path(where, epoch).is_file():
                    shutil.copyfile(state, store.checkpoint_path(where, epoch))
            probed = work(folder, CALIBRATION_EPOCHS, True)
            seconds = dict(probed["phase_seconds"])
            seconds["training"] = short = trained["phase_seconds"]["training"]
            total = trained["seconds"] + probed["seconds"]
            if not first:  # the first pass: a worker's first run, start-up included
                first = total
                continue
            if not passes:
                extra = min(full.epochs, max(CALIBRATION_EPOCHS + 1,
                                             math.ceil(CALIBRATION_SECONDS / max(short, 1e-3))))
            long = math.nan
            if extra > CALIBRATION_EPOCHS:
                longer = work(temp / f"longer-{len(passes)}", extra, False)
                long = longer["phase_seconds"]["training"]
                spent += longer["seconds"]
            spent += total
            passes.append((seconds, long, total))
    except RunError as exc:
        return {"error": str(exc)}
    seconds = {k: statistics.median(p[k] for p, *_ in passes) for k in passes[0][0]}
    short, long = seconds["training"], statistics.median(long for _, long, _ in passes)
    per_epoch = short / CALIBRATION_EPOCHS
    if not math.isnan(long) and long > short:  # NaN: no longer training (a one-epoch run)
        per_epoch = (long - short) / (extra - CALIBRATION_EPOCHS)
    second = statistics.median(total for *_, total in passes)
    seconds["training"] = per_epoch
    return {"seconds": seconds, "fixed": max(0.0, short - per_epoch * CALIBRATION_EPOCHS),
            "startup": max(0.0, first - second)}


__all__ = ["CALIBRATION_EPOCHS", "CALIBRATION_REPEATS", "CALIBRATION_SECONDS", "SweepPlan",
           "phases_of", "plan_sweep"]
