"""Run directories: what ``genprobe train`` writes and ``Subject.load`` reads.

Layout of a run directory::

    config.yaml                    the full training config, genprobe version, data provenance
    checkpoints/epoch-0000.safetensors   θ⁰, before any step; then one per scheduled epoch, up to
                                   the last trained (a run with a stop target may end early)
    final.safetensors              θ^F, the state after the last epoch
    metrics.parquet                per epoch: train/test loss and error, learning rate, seconds
    labels.safetensors             the training labels used (after corruption) and the corrupted indices
    resume.safetensors             optimizer state and RNG state of the last checkpoint (for --resume)
    probes/NAME/                   probe results written by ``genprobe probe`` (optional)
    .genprobe-run                  the marker saying genprobe wrote this directory

Every file is written atomically (to a temporary name beside it, then renamed), so an interrupted
or crashed run never leaves a truncated file. ``genprobe train --overwrite`` replaces a directory
only when :func:`check_run_replaceable` can prove genprobe wrote it (:mod:`genprobe.outputs`).

Checkpoints are safetensors, never pickles. :func:`read_state` also reads a user's ``.pt``/``.pth``
state dict, but only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import outputs
from .errors import OutputError, RunError, StateError, first_line
from .outputs import write_atomic

CONFIG = "config.yaml"
FINAL = "final.safetensors"
METRICS = "metrics.parquet"
LABELS = "labels.safetensors"
RESUME = "resume.safetensors"
CHECKPOINT_DIR = "checkpoints"
PROBES_DIR = "probes"
REPORT_FILES = ("report.html", "report.json")
"""Files ``genprobe report`` may write into a run."""
RECORD = "record.json"
"""A sweep's record of one of its runs (:mod:`genprobe.sweep`)."""
RUN_FILES = (CONFIG, FINAL, METRICS, LABELS, RESUME, RECORD, *REPORT_FILES)
"""The files a run directory may hold (besides ``checkpoints/``, ``probes/`` and the marker)."""
_CHECKPOINT = re.compile(r"epoch-(\d+)\.safetensors$")


def checkpoint_path(run: Path, epoch: int) -> Path:
    return Path(run) / CHECKPOINT_DIR / f"epoch-{epoch:04d}.safetensors"


def write_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write a state as safetensors, atomically (a crash never leaves a truncated checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, or from ``.pt``/``.pth`` with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"checkpoint {path} does not exist")
    try:
        if path.suffix in (".pt", ".pth", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise StateError(f"{path} does not hold a state dict of tensors")
            return state
        return load_file(str(path))
    except StateError:
        raise
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        first = first_line(exc)
        raise StateError(f"cannot read checkpoint {path}: {first[:200]} "
                         "(is it a safetensors file, or a weights-only .pt state dict?)") from None


def list_checkpoints(run: Path) -> dict[int, Path]:
    """{epoch: path} of the checkpoints recorded in a run, sorted by epoch."""
    folder = Path(run) / CHECKPOINT_DIR
    found = {}
    for p in folder.glob("epoch-*.safetensors") if folder.is_dir() else []:
        m = _CHECKPOINT.search(p.name)
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def write_config(run: Path, config: dict) -> None:
    text = yaml.safe_dump(config, sort_keys=False)
    write_atomic(Path(run) / CONFIG, lambda tmp: tmp.write_text(text))


def read_config(run: str | Path) -> dict:
    """The config mapping of a run (RunError, one line, when it is missing or corrupt)."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise RunError(f"run {run} is a file, not a run directory written by `genprobe train`")
    if not run.is_dir():
        raise RunError(f"run directory {run} does not exist; create one with `genprobe train ... --out {run}`")
    path = run / CONFIG
    if not path.is_file():
        raise RunError(f"{run} is not a genprobe run: it has no {CONFIG} (write one with `genprobe train`)")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RunError(f"{path} is corrupt: {first_line(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is corrupt or unreadable: {first_line(exc)}") from None
    if not isinstance(config, dict):
        raise RunError(f"{path} is corrupt: it holds a {type(config).__name__}, not a mapping of "
                       "option: value (is it a genprobe run config?)")
    if "arch" not in config or "dataset" not in config:
        raise RunError(f"{path} is not a genprobe run config (no arch/dataset)")
    return config


def write_metrics(run: Path, metrics: pd.DataFrame) -> None:
    """Write the per-epoch metrics table of a run, atomically."""
    write_atomic(Path(run) / METRICS, lambda tmp: metrics.to_parquet(tmp, index=False))


def read_metrics(run: str | Path) -> pd.DataFrame:
    """The per-epoch metrics of a run (RunError, one line, when missing or corrupt)."""
    path = Path(run) / METRICS
    if not path.is_file():
        raise RunError(f"{run} has no {METRICS}; is it a genprobe run?")
    try:
        metrics = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises its own types for every kind of damage
        raise RunError(f"{path} is corrupt: {first_line(exc)}") from None
    if "epoch" not in metrics.columns:
        raise RunError(f"{path} is corrupt: it has no 'epoch' column")
    return metrics


# ----------------------------------------------------------------------------- ownership


def mark_run(run: Path) -> None:
    """Mark `run` as a run directory genprobe wrote (see :mod:`genprobe.outputs`)."""
    outputs.write_text_atomic(Path(run) / outputs.MARKS["run"], "written by genprobe: a run directory\n")


def _is_tmp_of(name: str, names) -> bool:
    return outputs.temporary_file_of(name) in names


def _is_checkpoint_name(name: str) -> bool:
    """A checkpoint file's name, or the temporary name of one."""
    return bool(_CHECKPOINT.fullmatch(outputs.temporary_file_of(name) or name))


def _run_entry(run: Path) -> Callable[[str], bool]:
    """Whether a name in directory `run` is something a run holds: its files (or a temporary
    file of one, left by a hard kill), ``checkpoints/`` holding only checkpoints, ``probes/``
    holding only genprobe result directories."""
    from .results import result_file

    def allowed(name: str) -> bool:
        path = run / name
        if name in RUN_FILES or _is_tmp_of(name, RUN_FILES):
            return path.is_file() and not path.is_symlink()
        if name == CHECKPOINT_DIR:
            return path.is_dir() and not path.is_symlink() and all(
                p.is_file() and not p.is_symlink() and _is_checkpoint_name(p.name) for p in path.iterdir())
        if name == PROBES_DIR:
            return path.is_dir() and not path.is_symlink() and all(
                p.is_dir() and not p.is_symlink() and outputs.is_owned(p, "result", result_file)
                for p in path.iterdir())
        return False

    return allowed


def check_run_replaceable(run: Path) -> None:
    """OutputError (one line, before any work) unless `run` is absent, an empty directory, or a
    run directory genprobe wrote, holding only what a run holds."""
    run = Path(run)
    allowed = _run_entry(run)
    if run.is_dir() and (run / outputs.MARKS["run"]).is_file():
        foreign = [_foreign(run, p.name) for p in sorted(run.iterdir())
                   if p.name != outputs.MARKS["run"] and not allowed(p.name)]
        if foreign:
            raise OutputError(f"run directory {run} is a genprobe run but also holds {', '.join(foreign[:3])}"
                              f"{' ...' if len(foreign) > 3 else ''}, which genprobe did not write; it "
                              "replaces only what it wrote: move that away or choose another --out")
    outputs.check_replaceable(run, "run", allowed, "run directory")


def _foreign(run: Path, name: str) -> str:
    """`name`, or the first entry inside it that a run does not hold (``probes/mine``)."""
    path = run / name
    if name == CHECKPOINT_DIR and path.is_dir():
        inside = [p.name for p in sorted(path.iterdir()) if not _is_checkpoint_name(p.name) or not p.is_file()]
    elif name == PROBES_DIR and path.is_dir():
        from .results import result_file

        inside = [p.name for p in sorted(path.iterdir())
                  if not (p.is_dir() and outputs.is_owned(p, "result", result_file))]
    else:
        inside = []
    return f"{name}/{inside[0]}" if inside else name
