"""Running a sweep: expand, check, execute the units, keep the table (see :mod:`genprobe.sweep`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .._version import __version__
from ..errors import OutputError
from .config import SweepConfig
from .layout import (
    _current,
    _SweepDirectory,
    _write_table,
    build_table,
    read_table,
    records,
    run_dir,
    write_record,
)
from .work import _unit, run_unit

log = logging.getLogger(__name__)

@dataclass
class SweepOutcome:
    """What :func:`run_sweep` did: the sweep directory, its table, and how many runs were done
    before (``reused``), are done now, and failed; with ``--executor submitit``, how many jobs
    it submitted and left running."""

    out: Path
    table: pd.DataFrame
    runs: int
    done: int
    failed: int
    reused: int
    submitted: int = 0
    """Jobs this invocation submitted (``--executor submitit``; 0 otherwise)."""
    running: int = 0
    """Jobs left queued or running when it returned (``wait=False``; 0 otherwise): the next
    invocation collects them."""

    @property
    def failed_runs(self) -> list[str]:
        return self.table.loc[self.table.status == "failed", "run"].tolist()


def default_out(config: SweepConfig) -> Path:
    """The default sweep directory: ``sweeps/<name>``."""
    return Path("sweeps") / config.name


def run_sweep(config: SweepConfig | str | Path, out: str | Path | None = None, *,
              jobs: int | None = None, threads: int | None = None, executor: str = "local",
              address: str | None = None, device: str = "auto",
              progress: bool = True, on_run: Callable[[dict], None] | None = None,
              allow_large: bool = False, slurm: Mapping[str, Any] | None = None,
              wait: bool = True) -> SweepOutcome:
    """Run a sweep (a :class:`SweepConfig`, or the path of its YAML file) into `out` (default
    :func:`default_out`); see the module docstring.

    ``jobs`` / ``threads``: concurrent runs and intra-op threads per run (defaults: the config's,
    else 1 job and an equal share of the cores; with ``submitit``, ``jobs`` alone caps the runs at
    once, and threads default to the job's CPUs). Results depend on the thread count (floating-point
    summation order), not on the number of jobs; each record keeps its thread count.
    ``executor``: ``local`` (:class:`~genprobe.executors.LocalExecutor`), ``ray``
    (:class:`~genprobe.executors.RayExecutor`, at ``address`` or a local instance) or
    ``submitit`` (:class:`~genprobe.executors.SubmititExecutor`: a SLURM job per run, with the
    config's ``slurm:`` options updated by ``slurm``; ``wait=False`` submits and returns, and the
    next invocation collects). ``device``: where runs train and probes compute. ``on_run(record)``
    is called as each run finishes. ``allow_large``: accept more than :data:`LARGE` runs.

    Everything is checked before anything is written. A failed run is recorded and the sweep
    goes on; the outcome counts them. Raises OutputError when `out` is not a sweep directory
    genprobe made, or another sweep holds it.
    """
    config, runs, out, runner = _prepare(config, out, jobs=jobs, threads=threads, executor=executor,
                                         address=address, device=device, allow_large=allow_large,
                                         slurm=slurm, wait=wait)
    threads = runner.threads
    with runner, _SweepDirectory(out) as directory:
        directory.clean()
        directory.forget_changed_probes(config)
        directory.write_config(config)
        records = {r.id: rec for r in runs if (rec := directory.record(r)) is not None}
        others = sorted({rec.get("threads") for rec in records.values()} - {threads}, key=str)
        if others:
            log.warning("runs recorded in %s used %s thread(s) per run, this sweep uses %d: "
                        "results of different thread counts may differ in their last bits",
                        out, "/".join(map(str, others)), threads)
        reused = sum(_current(records.get(r.id), config) for r in runs)
        todo = [_unit(out, r, config, device, threads) for r in runs
                if not _current(records.get(r.id), config)]
        _write_table(out, build_table(runs, records, config))
        log.info("sweep %s: %d runs, %d done before, %d to do (%s)", out, len(runs), reused,
                 len(todo), runner.describe())
        _execute(runner, todo, runs, records, out, reused, progress, on_run, config)
        _write_table(out, build_table(runs, records, config))
    table = read_table(out)  # as every reader will see it (parquet's own dtypes)
    done = int((table.status == "done").sum())
    return SweepOutcome(out=out, table=table, runs=len(runs), done=done,
                        failed=int((table.status == "failed").sum()), reused=reused,
                        submitted=getattr(runner, "submitted", 0),
                        running=getattr(runner, "running", 0))


def _prepare(config: SweepConfig | str | Path, out: str | Path | None, *, jobs: int | None,
             threads: int | None, executor: str, address: str | None, device: str,
             allow_large: bool, slurm: Mapping[str, Any] | None, wait: bool,
             check_time: bool = True) -> tuple[SweepConfig, list, Path, Any]:
    """Every check a sweep makes before it writes anything (:func:`run_sweep`, and the plan of
    :func:`genprobe.sweep.plan.plan_sweep`, which must refuse what the sweep would): the config
    and every run, the device, the executor and its options, the sweep directory. Returns the
    config, its runs, the sweep directory and the executor (not entered). `check_time`: False
    when the caller checks a submitit job's time limit itself."""
    from ..device import resolve_device
    from ..executors import check_slurm, make_executor, running_jobs

    if not isinstance(config, SweepConfig):
        config = SweepConfig.from_yaml(config)
    resolve_device(device)
    runs = config.expand(allow_large=allow_large, device=device)
    out = Path(out) if out is not None else default_out(config)
    flags = check_slurm(slurm)
    if jobs is None and executor != "submitit":  # the config's jobs: fit a machine's cores; a
        jobs = config.jobs  # cluster's scheduler starts as many jobs as it can, unless --jobs
    runner = make_executor(executor, jobs=jobs,
                           threads=threads if threads is not None else config.threads,
                           address=address, device=device, out=out, wait=wait, name=config.name,
                           slurm=config.slurm | flags if executor == "submitit" else flags,
                           run_seconds=_longest_run(out) if executor == "submitit" else None,
                           check_time=check_time)
    _SweepDirectory(out).check()  # before Ray starts
    if executor != "submitit" and (busy := running_jobs(out, [r.id for r in runs])):
        raise OutputError(f"{len(busy)} job(s) that --executor submitit submitted still run in "
                          f"{out} ({', '.join(busy[:3])}{' ...' if len(busy) > 3 else ''}); collect "
                          "them with --executor submitit, or cancel them (scancel) first")
    return config, runs, out, runner


def _longest_run(out: Path) -> float | None:
    """The wall seconds of the longest run recorded done in the sweep directory `out` (the
    estimate a job's time limit is checked against); None when none is."""
    import json

    longest = None
    for path in records(out) if out.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            seconds = float(record["seconds"]) if record.get("status") == "done" else math.nan
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if math.isfinite(seconds):
            longest = seconds if longest is None else max(longest, seconds)
    return longest


def _execute(runner, todo, runs, records, out, reused, show, on_run, config) -> None:
    """Run the units of `todo` on `runner`, keeping the records and the table up to date."""
    import contextlib

    import torch

    from .. import progress

    state = {"running": 0, "done": reused, "failed": 0}

    def describe() -> str:
        return f"sweep: {state['done']} done, {state['running']} running, {state['failed']} failed"

    bars = progress.task(describe(), total=len(runs)) if show else \
        contextlib.nullcontext(progress.Task(None, None))
    threads = torch.get_num_threads()  # a one-job sweep runs in this process: give it back
    with bars as bar:
        bar.advance(reused, description=describe())

        def started(unit: dict) -> None:
            state["running"] += 1
            bar.advance(0, description=describe())

        def finished(unit: dict, record: dict | None, error: str | None) -> None:
            if record is None:  # the unit's process died before it could record anything
                record = _crashed(out, unit, error)
            records[unit["run"]] = record
            state["running"] -= 1
            state["done" if record["status"] == "done" else "failed"] += 1
            bar.advance(1, description=describe())
            _write_table(out, build_table(runs, records, config))
            if on_run is not None:
                on_run(record)

        try:
            runner.run(todo, run_unit, started=started, finished=finished)
        finally:
            torch.set_num_threads(threads)


def _crashed(out: Path, unit: dict, error: str | None) -> dict[str, Any]:
    record = {"run": unit["run"], "status": "failed", "error": f"crashed: {error}",
              "hyperparameters": unit["hyperparameters"], "metrics": {}, "measures": {},
              "probes": unit["probes"], "baselines": unit["baselines"], "figures": unit["figures"],
              "device": unit["device"], "threads": unit["threads"], "genprobe_version": __version__,
              "seconds": math.nan}
    write_record(run_dir(out, unit["run"]), record)
    return record
