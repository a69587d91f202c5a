"""The sweep directory, its one owner: the table, ``sweep.yaml``, the run directories and their
records, the lock (see :mod:`genprobe.sweep`)."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .. import outputs, store
from .._version import __version__
from ..errors import ConfigError, OutputError, RunError, first_line
from .config import SweepConfig, SweepRun

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.yaml"
TABLE = "table.parquet"
TABLE_META = "table.json"
RUNS_DIR = "runs"
RECORD = store.RECORD
LOCK = ".lock"
METRICS = ("train_error", "test_error", "train_loss", "test_loss")
"""The final-epoch metrics of each run (from its ``metrics.parquet``)."""
GAPS = ("gap", "loss_gap")
"""test_error − train_error and test_loss − train_loss."""
COST_PREFIX = "seconds_"
"""Column prefix of a run's seconds per phase (``seconds_training``, ``seconds_robustness``, ...)."""
PEAK_PREFIX = "peak_mib_"
"""Column prefix of a run's peak resident memory per phase in MiB (``peak_mib_training``, ...;
``peak_mib_cuda:PHASE``: torch's peak allocation on the GPU), where it was measurable."""




def _kind(values: list) -> str:
    present = [v for v in values if v is not None]
    if all(isinstance(v, bool) for v in present):
        return "boolean"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "Int64"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float64"
    return "string"


def _column(values: list) -> pd.Series:
    kind = _kind(values)
    if kind == "string":
        values = [None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values]
        return pd.Series(values, dtype=object)
    if kind == "float64":
        return pd.Series([math.nan if v is None else float(v) for v in values], dtype="float64")
    return pd.Series(values, dtype=kind)


def varying(runs: list[SweepRun]) -> list[str]:
    """The hyper-parameters whose values differ between `runs`, in their first-seen order."""
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(run.hyperparameters))
    return [n for n in names
            if len({json.dumps(r.hyperparameters.get(n, "<absent>"), sort_keys=True) for r in runs}) > 1]


def build_table(runs: list[SweepRun], records: dict[str, dict],
                config: SweepConfig | None = None) -> pd.DataFrame:
    """One row per recorded run, in the order of `runs`: ``run``, the hyper-parameters that
    vary, the final ``train_error``, ``test_error``, ``train_loss``, ``test_loss``, ``gap`` (test −
    train error), ``loss_gap``, every measure (``probe.key``, ``baseline.*``), ``status``,
    ``error`` and ``seconds`` (wall time of the run's last attempt), ``seconds_PHASE`` for each
    phase of it (``training``, each probe by name, ``baselines``, ``user_measures``; the first
    probe's includes loading the run) and ``peak_mib_PHASE`` (the worker's peak resident memory
    during it, MiB, where measurable), ``converged`` (whether it
    reached its training target; missing without one) and ``epochs_run``. ``table.attrs`` names
    the column groups (``hyperparameters``, ``metrics``, ``measures``), counts the runs, and with
    `config` holds its ``probes``, ``baselines``, ``user_measures`` and ``ranking`` options (what
    :func:`genprobe.measures.rank_correlation` reads to decide which columns are measures)."""
    hyper = varying(runs)
    rows = [(r, records[r.id]) for r in runs if r.id in records]
    measures: dict[str, None] = {}
    for _, rec in rows:
        measures.update(dict.fromkeys(rec.get("measures", {})))
    columns: dict[str, pd.Series] = {"run": pd.Series([r.id for r, _ in rows], dtype=object)}
    for name in hyper:
        columns[name] = _column([r.hyperparameters.get(name) for r, _ in rows])
    metric = {k: [rec.get("metrics", {}).get(k, math.nan) for _, rec in rows] for k in METRICS}
    for k in METRICS:
        columns[k] = pd.Series(metric[k], dtype="float64")
    columns["gap"] = columns["test_error"] - columns["train_error"]
    columns["loss_gap"] = columns["test_loss"] - columns["train_loss"]
    columns["converged"] = pd.Series([rec.get("metrics", {}).get("converged") for _, rec in rows],
                                     dtype="boolean")
    columns["epochs_run"] = pd.Series([rec.get("metrics", {}).get("epochs_run") for _, rec in rows],
                                      dtype="Int64")
    for name in measures:
        columns[name] = pd.Series([rec["measures"].get(name, math.nan) for _, rec in rows],
                                  dtype="float64")
    columns["status"] = pd.Series([rec["status"] for _, rec in rows], dtype=object)
    columns["error"] = pd.Series([rec.get("error") for _, rec in rows], dtype=object)
    columns["seconds"] = pd.Series([rec.get("seconds", math.nan) for _, rec in rows], dtype="float64")
    costs = _per_phase(columns, rows, "phase_seconds", COST_PREFIX)  # where each run's time went
    peaks = _per_phase(columns, rows, "phase_peak_mib", PEAK_PREFIX)
    table = pd.DataFrame(columns)
    table.attrs = {"hyperparameters": hyper, "metrics": [*METRICS, *GAPS],
                   "measures": list(measures), "costs": costs, "peaks": peaks,
                   "runs": len(runs),
                   "done": sum(rec["status"] == "done" for _, rec in rows),
                   "failed": sum(rec["status"] == "failed" for _, rec in rows)}
    if config is not None:  # what the ranking needs to decide which columns are measures
        table.attrs |= {"probes": config.probes, "baselines": config.baselines,
                        "user_measures": config.measures, "ranking": config.ranking}
    return table


def _per_phase(columns: dict[str, pd.Series], rows: list[tuple[SweepRun, dict]], key: str,
               prefix: str) -> list[str]:
    """Add a float column `prefix` + PHASE for each phase of the records' ``key`` mapping (NaN
    where a run lacks it), in first-seen order; their names."""
    phases: dict[str, None] = {}
    for _, rec in rows:
        phases.update(dict.fromkeys(rec.get(key, {})))
    for phase in phases:
        columns[prefix + phase] = pd.Series([rec.get(key, {}).get(phase, math.nan) for _, rec in rows],
                                            dtype="float64")
    return [prefix + p for p in phases]


def read_table(sweep: str | Path) -> pd.DataFrame:
    """``SWEEP/table.parquet`` of a sweep directory written by ``genprobe sweep``; RunError (one
    line, saying which command writes it) when `sweep` is not one, or has no table yet, or the
    table is unreadable. ``table.attrs`` names its ``hyperparameters``, ``metrics`` and
    ``measures``."""
    sweep = Path(sweep)
    mark = outputs.MARKS["sweep"]
    if not sweep.is_dir() or not (sweep / mark).is_file():
        what = "does not exist" if not sweep.exists() else "is not a sweep directory"
        raise RunError(f"{sweep} {what} (no {mark} marker): `genprobe sweep CONFIG.yaml --out DIR` "
                       "writes one")
    path = sweep / TABLE
    if not path.is_file():
        raise RunError(f"{sweep} has no {TABLE} yet: `genprobe sweep` writes it as its runs "
                       "finish (run it again on the same config to resume)")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types for every kind of damage
        raise RunError(f"{path} cannot be read as a table ({first_line(exc, 120)}); re-run "
                       "`genprobe sweep` to rewrite it") from None


def run_dir(sweep: str | Path, run: str) -> Path:
    """The run directory of run id `run` in a sweep directory."""
    return Path(sweep) / RUNS_DIR / str(run)


def records(sweep: str | Path) -> list[Path]:
    """The ``record.json`` files of a sweep directory's recorded runs."""
    return sorted((Path(sweep) / RUNS_DIR).glob(f"*/{RECORD}"))


FIGURE = "measures"
"""Stem of the figure ``genprobe measures`` writes into a sweep directory (.png and .svg)."""


def measures_figure_paths(sweep: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """The (PNG, SVG) paths ``genprobe measures`` writes: ``SWEEP/measures.png`` / ``.svg``, or
    `out` (a ``.png`` path; the SVG beside it). OutputError when one exists and genprobe cannot
    prove it wrote it (only the figure files inside a sweep directory are replaced)."""
    png = Path(sweep) / f"{FIGURE}.png" if out is None else Path(out)
    if png.suffix.lower() != ".png":
        raise ConfigError(f"--out {png} must name a .png file (the .svg is written beside it)")
    svg = png.with_suffix(".svg")
    for path in (png, svg):
        ours = (path.name in (f"{FIGURE}.png", f"{FIGURE}.svg")
                and (path.parent / outputs.MARKS["sweep"]).is_file())
        if path.exists() and not (path.is_file() and ours):
            raise OutputError(f"{path} already exists and genprobe did not write it; choose "
                              "another --out path")
        if not path.parent.is_dir():
            raise OutputError(f"cannot write {path}: folder {path.parent} does not exist")
    return png, svg


def read_config(sweep: str | Path) -> dict[str, Any] | None:
    """The normalized config ``SWEEP/sweep.yaml`` of the sweep's last invocation; None when it
    is missing or unreadable (the next ``genprobe sweep`` rewrites it)."""
    path = Path(sweep) / SWEEP_FILE
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        data = None
    return data if isinstance(data, dict) else None


def _write_table(out: Path, table: pd.DataFrame) -> None:
    outputs.write_atomic(out / TABLE, lambda tmp: table.to_parquet(tmp, index=False))
    outputs.write_text_atomic(out / TABLE_META, json.dumps(table.attrs, indent=1) + "\n")





class _SweepDirectory:
    """The sweep directory, created (or recognised by its marker) and locked for this process."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.fd: int | None = None

    def check(self) -> None:
        """OutputError unless the directory is absent, empty, or a sweep directory genprobe made."""
        out = self.out
        outputs.check_creatable(out, "sweep directory")
        if out.is_dir() and any(out.iterdir()) and not (out / outputs.MARKS["sweep"]).is_file():
            inside = sorted(p.name for p in out.iterdir())[:3]
            more = " ..." if len(inside) == 3 else ""
            raise OutputError(f"sweep directory {out} already exists and is not a genprobe sweep "
                              f"directory (it holds {', '.join(inside)}{more}); genprobe writes "
                              "only into directories it made: choose another --out")

    def __enter__(self) -> _SweepDirectory:
        out, mark = self.out, outputs.MARKS["sweep"]
        self.check()
        try:
            out.mkdir(parents=True, exist_ok=True)
            if not (out / mark).is_file():
                outputs.write_text_atomic(out / mark, "written by genprobe: a sweep directory\n")
            self.fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputError(f"sweep directory {out} cannot be written: "
                              f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            self.fd = None
            raise OutputError(f"sweep directory {out} is in use by another genprobe sweep (pid "
                              f"{holder}); wait for it to end, or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None

    def clean(self) -> None:
        """Remove temporary files a killed sweep left at the top of the directory."""
        for p in self.out.iterdir():
            if outputs.temporary_file_of(p.name) in (SWEEP_FILE, TABLE, TABLE_META, outputs.MARKS["sweep"]) \
                    and p.is_file():
                p.unlink(missing_ok=True)


    def forget_changed_probes(self, config: SweepConfig) -> None:
        """Remove the saved results of every probe whose options differ from the last
        invocation's (or that it did not run): they were computed under other options. A
        result directory goes only when it is one genprobe wrote."""
        from ..results import result_file

        before = read_config(self.out) or {}
        old = before.get("probes") if isinstance(before.get("probes"), dict) else {}
        changed = [name for name, options in config.probes.items()
                   if name not in old or outputs.jsonable(old[name] or {}) != outputs.jsonable(options)]
        runs = self.out / RUNS_DIR
        for name in changed:
            for run in sorted(runs.iterdir()) if runs.is_dir() else []:
                path = run / store.PROBES_DIR / name
                if path.is_dir() and outputs.is_owned(path, "result", result_file):
                    log.info("removing %s: probe %s options changed", path, name)
                    shutil.rmtree(path)

    def write_config(self, config: SweepConfig) -> None:
        text = yaml.safe_dump(config.to_dict() | {"genprobe_version": __version__}, sort_keys=False)
        outputs.write_text_atomic(self.out / SWEEP_FILE, text)

    def record(self, run: SweepRun) -> dict[str, Any] | None:
        return read_record(self.out / RUNS_DIR / run.id, run.id)


def read_record(run: Path, run_id: str) -> dict[str, Any] | None:
    """The ``record.json`` of the run directory `run` when it is the record of `run_id`; None
    when it is missing, unreadable, or another run's."""
    path = run / RECORD
    try:
        record = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("run") == run_id else None


def write_record(run: Path, record: dict[str, Any]) -> None:
    """Write the run directory `run`'s ``record.json`` atomically (creating `run`)."""
    run.mkdir(parents=True, exist_ok=True)
    outputs.write_text_atomic(run / RECORD, json.dumps(record, indent=1))


def _current(record: dict[str, Any] | None, config: SweepConfig) -> bool:
    """Whether a run's record is done under the config's probes, baselines and figures."""
    return (record is not None and record.get("status") == "done"
            and outputs.jsonable(record.get("probes")) == outputs.jsonable(config.probes)
            and outputs.jsonable(record.get("baselines")) == outputs.jsonable(config.baselines)
            and outputs.jsonable(record.get("user_measures", {})) == outputs.jsonable(config.measures)
            and (record.get("figures", False) or not config.figures))
