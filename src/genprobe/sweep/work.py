"""One unit of a sweep's work: train one run (or continue it), probe it, record it (see
:mod:`genprobe.sweep`)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from .. import outputs, store
from .._version import __version__
from ..errors import GenprobeError, RunError, one_line
from .config import SweepConfig, SweepRun, run_id
from .layout import METRICS, RECORD, RUNS_DIR, write_record

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], phase: str, peaks: dict[str, float], device: str):
    """Add the wall seconds of the block to ``seconds[phase]`` (a run's training, each probe, the
    baselines, the user's measures), also when it fails, and the process's peak resident memory
    during the block in MiB to ``peaks[phase]`` (the largest where a phase comes again; where
    measurable: Linux); where `device` is a GPU, the peak of torch's allocations on it to
    ``peaks["cuda:" + phase]``."""
    import torch

    from ..device import resolve_device
    from ..memory import peak_resident, reset_peak_resident

    cuda = resolve_device(device).type == "cuda"
    measured = reset_peak_resident()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - began
        peak = peak_resident() if measured else None
        if peak is not None:
            peaks[phase] = max(peaks.get(phase, 0.0), peak / 2**20)
        if cuda:
            key = f"cuda:{phase}"
            peaks[key] = max(peaks.get(key, 0.0), torch.cuda.max_memory_allocated() / 2**20)


def _unit(out: Path, run: SweepRun, config: SweepConfig, device: str, threads: int) -> dict[str, Any]:
    """Everything a worker needs to do one run (plain data: it crosses process boundaries)."""
    return {"out": str(out), "run": run.id, "train": run.config.to_dict() | {"device": device},
            "hyperparameters": run.hyperparameters, "probes": config.probes,
            "baselines": config.baselines, "measures": config.measures,
            "figures": config.figures, "device": device, "threads": threads}


def run_unit(unit: dict[str, Any]) -> dict[str, Any]:
    """Do one run of a sweep: train it (or continue it), run each probe not saved yet, the
    baselines, then write its record atomically and return it. Every failure becomes a
    ``failed`` record with a one-line error; only an interruption (Ctrl-C) propagates."""
    import torch

    began = time.perf_counter()
    torch.set_num_threads(unit["threads"])
    run = Path(unit["out"]) / RUNS_DIR / unit["run"]
    record: dict[str, Any] = {
        "run": unit["run"], "status": "failed", "error": None,
        "hyperparameters": unit["hyperparameters"], "metrics": {}, "measures": {},
        "probes": unit["probes"], "baselines": unit["baselines"],
        "user_measures": unit.get("measures", {}), "measure_errors": {},
        "figures": unit["figures"], "device": unit["device"], "threads": unit["threads"],
        "genprobe_version": __version__, "phase_seconds": {}, "phase_peak_mib": {}, "reused": [],
        "epochs_trained": 0}
    seconds, peaks = record["phase_seconds"], record["phase_peak_mib"]
    phase = "training"
    try:
        (run / RECORD).unlink(missing_ok=True)  # a failed or outdated record is redone
        _clean_stale(run)
        with _timed(seconds, "training", peaks, unit["device"]):
            record["epochs_trained"] = _train(run, unit)
            record["metrics"] = _final_metrics(run)
        if not record["epochs_trained"]:
            record["reused"].append("training")
        subject = _LazySubject(run)
        for name, options in unit["probes"].items():
            phase = f"probe {name}"
            with _timed(seconds, name, peaks, unit["device"]):  # the first one also loads the run
                summary, saved = _probe(run, name, options, subject, unit["device"], unit["figures"])
            record["measures"].update({f"{name}.{k}": v for k, v in summary.items()})
            if saved:
                record["reused"].append(name)
        if unit["baselines"] is not None:
            phase = "baselines"
            from .. import measures

            options = {"device": unit["device"]} | unit["baselines"]
            with _timed(seconds, "baselines", peaks, unit["device"]):
                values = measures.baselines(subject.get(), **options)
            record["measures"].update({k if k.startswith("baseline.") else f"baseline.{k}": float(v)
                                       for k, v in values.items()})
        for name, entry in unit.get("measures", {}).items():
            phase = f"measure user.{name}"
            from ..measures import evaluate_measure, import_measure

            spec = import_measure(name, entry["function"], direction=entry["direction"])
            with _timed(seconds, "user_measures", peaks, unit["device"]):
                record["measures"][spec.column], why = evaluate_measure(spec, subject.get())
            if why is not None:  # the run goes on: one line names the measure
                record["measure_errors"][spec.column] = why
                log.warning("run %s: %s", unit["run"], why)
        record["status"] = "done"
    except Exception as exc:  # a failed run is recorded, and the sweep goes on
        kind = "" if isinstance(exc, GenprobeError) else f"{type(exc).__name__}: "
        record["error"] = f"{phase}: {kind}{one_line(exc, 300)}"
        log.warning("run %s failed: %s", unit["run"], record["error"])
    record["seconds"] = time.perf_counter() - began
    write_record(run, record)
    return record


class _LazySubject:
    """The run's Subject, loaded at the first probe that is not saved yet."""

    def __init__(self, run: Path) -> None:
        self.run, self.subject = run, None

    def get(self):
        if self.subject is None:
            from ..subject import Subject

            self.subject = Subject.load(self.run)
        return self.subject


def _clean_stale(run: Path) -> None:
    """Remove the temporary files and directories a killed process left in `run` (this unit is
    the only writer there: the sweep holds the lock). A temporary directory goes only when it
    holds nothing but what a result holds."""
    from ..results import result_file

    for folder in (run, run / store.CHECKPOINT_DIR):
        for p in folder.iterdir() if folder.is_dir() else []:
            if outputs.temporary_file_of(p.name) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
    probes = run / store.PROBES_DIR
    for p in probes.iterdir() if probes.is_dir() else []:
        if outputs.temporary_directory_of(p.name) and p.is_dir() and not p.is_symlink() and all(
                result_file(q.name) or q.name == outputs.MARKS["result"] for q in p.iterdir()):
            shutil.rmtree(p, ignore_errors=True)


def _train(run: Path, unit: dict[str, Any]) -> int:
    """Train the run at `run`, continue it if it was interrupted, or leave it if finished; the
    number of epochs this call trained (0 when it was finished)."""
    from ..zoo.train import TrainConfig, train_run

    config = TrainConfig.from_dict(unit["train"])
    if (run / store.CONFIG).is_file():
        saved = run_id(TrainConfig.from_dict(store.read_config(run)))
        if saved != unit["run"]:
            raise RunError(f"{run} holds a run of another config (id {saved}); move it away")
    if (run / store.FINAL).is_file():
        return 0
    if (run / store.RESUME).is_file():
        try:
            before = int(store.read_metrics(run)["epoch"].max())
        except (RunError, KeyError, ValueError):
            before = 0
        train_run(config, run, resume=True)
    else:  # fresh; over what a killed start left (check_run_replaceable proves it is a run's)
        before = 0
        train_run(config, run, overwrite=run.is_dir() and any(run.iterdir()))
    return max(0, int(store.read_metrics(run)["epoch"].max()) - before)


def _final_metrics(run: Path) -> dict[str, Any]:
    """The last epoch's metrics, and whether the run reached its training target
    (``converged``: None when it had none; ``epochs_run``)."""
    from ..zoo.train import TrainConfig, training_outcome

    metrics = store.read_metrics(run).sort_values("epoch")
    last = metrics.iloc[-1]
    outcome = training_outcome(TrainConfig.from_dict(store.read_config(run)), metrics)
    return {"epoch": int(last["epoch"]), **{k: float(last[k]) for k in METRICS},
            "converged": outcome["converged"], "epochs_run": int(outcome["epochs_run"])}


def _probe(run: Path, name: str, options: dict, subject: _LazySubject, device: str,
           figures: bool) -> tuple[dict[str, float], bool]:
    """The summary of probe `name` on the run and whether it was saved before: from its saved
    result when that loads, else computed and saved (with its figure when `figures`)."""
    from ..probes.registry import get_probe
    from ..results import Result

    path = run / store.PROBES_DIR / name
    if path.is_dir():
        try:
            result = Result.load(path)
        except RunError:
            result = None
        if result is not None and result.probe == name:
            if figures and not (path / "figure.png").is_file():
                result.save(path, figure=True)
            return result.summary, True
    spec = get_probe(name)
    kwargs = dict(options)
    if "device" in spec.parameters():
        kwargs.setdefault("device", device)
    result = spec.function(subject.get(), **kwargs)
    result.save(path, figure=figures)
    return result.summary, False
