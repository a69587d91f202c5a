"""Training runs with checkpoints: the experiments' model families are made here.

:func:`train_run` trains one zoo architecture on one built-in dataset and writes a run
directory (see :mod:`genprobe.store`). Everything that decides the result is in
:class:`TrainConfig`, which is written to the run and is enough to rebuild the same model and
the same data split. Runs are deterministic under ``seed`` on the CPU (data order, label
corruption, initialization, dropout), and an interrupted run resumes from its last epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .. import outputs, store
from .. import params as P
from .. import progress as progress_bars
from .._version import __version__
from ..device import resolve_device, rng_devices
from ..errors import (
    ConfigError,
    GenprobeError,
    OutputError,
    RunError,
    StateError,
    check_choice,
    first_line,
)
from ..evaluate import evaluate
from ..params import state_of
from ..seeds import generator
from .models import create_model, list_models

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant", "step")


def _number(value) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainConfig:
    """One training run. Defaults are the "default training settings" the README's accuracy
    figures were measured with: SGD with momentum 0.9, lr 0.05 on a per-epoch cosine schedule,
    weight decay 5e-4, batch 128, 10 epochs.

    ``checkpoints``: ``"every"`` (each epoch), ``"log:N"`` (about N log-spaced epochs), or a
    comma-separated list of epochs ("1,2,5,10"). Epoch 0 (θ⁰) and the last epoch are always kept.

    ``stop_loss`` / ``stop_error``: train to a target rather than for a fixed time (as Jiang et
    al. 2020 trained every model to a training cross-entropy of 0.01). Training stops at the end
    of the first epoch whose training-set cross-entropy (the ``train_loss`` of metrics.parquet) is
    ``<= stop_loss``, or whose training 0-1 error (``train_error``, against the possibly corrupted
    labels) is ``<= stop_error``; with both set, once both are met. ``epochs`` is then the most
    epochs trained, and the learning-rate schedule still spans ``epochs``. The epoch it stops at is
    the run's last: it is checkpointed and saved as final; checkpoints planned after it are never
    written (:func:`training_outcome` says whether a run reached its target).
    """

    arch: str = "fcn"
    dataset: str = "digits"
    arch_options: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    lr: float = 0.05
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    label_noise: float = 0.0
    n_train: int | None = None
    n_test: int | None = None
    checkpoints: str = "every"
    data_dir: str | None = None
    device: str = "auto"
    stop_loss: float | None = None
    stop_error: float | None = None

    # -- (de)serialisation -------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        if not isinstance(d, Mapping):
            raise ConfigError(f"a training config must be a mapping of option: value, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names and k not in ("genprobe_version", "data")]
        if unknown:
            raise ConfigError(f"unknown training option {unknown[0]!r}; options: {', '.join(sorted(names))}")
        return cls(**{k: v for k, v in d.items() if k in names}).validated()

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        from ..yamlfile import read_mapping

        return cls.from_dict(read_mapping(path, "config file", "training option: value"))

    def validated(self) -> TrainConfig:
        """Check every option; raise ConfigError naming the first bad one."""
        from ..data import list_datasets

        for name in ("arch", "dataset", "optimizer", "schedule", "device"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        check_choice("arch", self.arch, list_models())
        check_choice("dataset", self.dataset, list_datasets())
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("arch_options", "dataset_options"):
            value = getattr(self, name)
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise ConfigError(f"{name} must be a mapping of option name: value, got {value!r}")
        from ..options import check_int

        for name in ("epochs", "batch_size"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed, 0)
        for name in ("n_train", "n_test"):
            check_int(name, getattr(self, name), 1, optional=True)
        if not (_number(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not (_number(self.label_noise) and 0.0 <= self.label_noise <= 1.0):
            raise ConfigError(f"label_noise must be in [0, 1], got {self.label_noise!r}")
        if not (_number(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not (_number(self.momentum) and 0 <= self.momentum < 1):
            raise ConfigError(f"momentum must be a number in [0, 1), got {self.momentum!r}")
        if not isinstance(self.checkpoints, (str, int)) or isinstance(self.checkpoints, bool):
            raise ConfigError(f"checkpoints must be 'every', 'log:N' or a list like '1,2,5', got {self.checkpoints!r}")
        if self.stop_loss is not None and not (_number(self.stop_loss) and self.stop_loss > 0):
            raise ConfigError(f"stop_loss must be a positive finite number (a training cross-entropy "
                              f"such as 0.01), got {self.stop_loss!r}")
        if self.stop_error is not None and not (_number(self.stop_error) and 0 < self.stop_error < 1):
            raise ConfigError(f"stop_error must be a number in (0, 1) (a training error such as 0.01), "
                              f"got {self.stop_error!r}")
        if self.data_dir is not None and not isinstance(self.data_dir, (str, os.PathLike)):
            raise ConfigError(f"data_dir must be a folder path, got {self.data_dir!r}")
        self.checkpoint_epochs()
        return self

    def checkpoint_epochs(self) -> list[int]:
        """The epochs whose states are recorded (0 and the last always included)."""
        spec = str(self.checkpoints).strip()
        if spec == "every":
            epochs = set(range(self.epochs + 1))
        elif spec.startswith("log:"):
            try:
                n = int(spec[4:])
            except ValueError:
                raise ConfigError(f"checkpoints={spec!r}: use log:N with an integer N") from None
            if n < 1:
                raise ConfigError(f"checkpoints={spec!r}: use log:N with N >= 1")
            epochs = {round(math.exp(t * math.log(self.epochs) / max(n - 1, 1))) for t in range(n)}
        else:
            try:
                epochs = {int(e) for e in spec.split(",") if e.strip()}
            except ValueError:
                raise ConfigError(f"checkpoints={spec!r}: use 'every', 'log:N' or a list like '1,2,5'") from None
            bad = [e for e in epochs if not 0 <= e <= self.epochs]
            if bad:
                raise ConfigError(f"checkpoint epoch {bad[0]} is outside 0..{self.epochs}")
        return sorted(epochs | {0, self.epochs})

    def stop_targets(self) -> dict[str, float]:
        """{metrics column: target} of the stop options that are set (empty: train all epochs)."""
        targets = {"train_loss": self.stop_loss, "train_error": self.stop_error}
        return {column: target for column, target in targets.items() if target is not None}

    def learning_rate(self, epoch: int) -> float:
        """Learning rate used during `epoch` (1-based)."""
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "step":  # ÷10 at 50% and 75% of training
            return self.lr * 0.1 ** sum(epoch > self.epochs * f for f in (0.5, 0.75))
        return 0.5 * self.lr * (1 + math.cos(math.pi * (epoch - 1) / self.epochs))


def build(config: TrainConfig):
    """(model, DatasetSplits) of a config: the dataset under the config's seed, then the model
    initialized under the same seed (without reseeding the caller's global RNG). Used by
    training and by ``Subject.load``."""

    model, splits, _ = _build(config)
    return model, splits


def _build(config: TrainConfig):
    """(model, splits, RNG state right after the initialization draws). The model is drawn
    under a forked generator seeded with ``config.seed``: the caller's global RNG is untouched;
    training continues from the returned state, as if seeded globally."""
    from ..data import load_dataset

    splits = load_dataset(config.dataset, seed=config.seed, data_dir=config.data_dir,
                          label_noise=config.label_noise, n_train=config.n_train, n_test=config.n_test,
                          **config.dataset_options)
    with torch.random.fork_rng(devices=rng_devices()):
        torch.manual_seed(config.seed)
        try:
            model = create_model(config.arch, splits.input_shape, splits.num_classes, **config.arch_options)
        except GenprobeError:
            raise
        except (TypeError, ValueError, RuntimeError) as exc:  # an option value torch itself refuses
            raise ConfigError(f"arch {config.arch!r} with options {dict(config.arch_options)}: "
                              f"{first_line(exc)}") from None
        rng = torch.get_rng_state()
    return model, splits, rng


def _save_resume(run: Path, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    tensors = {f"model.{k}": v for k, v in state_of(model).items()}
    opt = optimizer.state_dict()
    for idx, slots in opt["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value)
    tensors["rng"] = torch.get_rng_state()
    meta = {"epoch": str(epoch), "param_groups": json.dumps(opt["param_groups"])}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    store.write_atomic(run / store.RESUME, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _load_resume(run: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epochs: int) -> int:
    """Restore model, optimizer and RNG from the run's resume file; return its epoch. RunError
    (one line) when the file is unreadable or incomplete, StateError when it does not fit the model."""
    from safetensors import SafetensorError, safe_open

    path = run / store.RESUME
    again = f"train it again with `genprobe train ... --out {run} --overwrite`"
    if not path.is_file():
        raise RunError(f"cannot resume {run}: it has no {store.RESUME} (it was stopped before its "
                       f"first epoch was saved); {again}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise RunError(f"cannot resume {run}: {path} is corrupt ({first_line(exc)}); {again}") from None
    try:
        epoch = int(meta["epoch"])
        groups = json.loads(meta["param_groups"])
        rng = tensors["rng"]
    except (KeyError, ValueError, TypeError) as exc:
        raise RunError(f"cannot resume {run}: {path} is corrupt (bad or missing {first_line(exc)}); "
                       f"{again}") from None
    if not 0 <= epoch <= epochs:
        raise RunError(f"cannot resume {run}: {path} is at epoch {epoch} but the run's config has "
                       f"{epochs} epochs; {again}")
    try:
        state = P.canonical_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except StateError as exc:
        raise StateError(f"cannot resume {run}: {path} does not fit the model that its {store.CONFIG} "
                         f"builds: {exc}") from None
    model.load_state_dict(state, strict=False)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if not k.startswith("optim."):
            continue
        _, idx, key = (k.split(".", 2) + ["", ""])[:3]
        if not idx.isdigit() or int(idx) >= len(params):
            raise RunError(f"cannot resume {run}: {path} is corrupt (optimizer entry {k!r} fits no "
                           f"parameter); {again}")
        if v.dim() and v.shape != params[int(idx)].shape:
            raise StateError(f"cannot resume {run}: {path} optimizer state {k!r} has shape {tuple(v.shape)}, "
                             f"the model's parameter has {tuple(params[int(idx)].shape)}")
        slots.setdefault(int(idx), {})[key] = v
    try:
        optimizer.load_state_dict({"state": slots, "param_groups": groups})
        torch.set_rng_state(rng)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise RunError(f"cannot resume {run}: {path} is corrupt ({first_line(exc)}); {again}") from None
    return epoch


def _epoch_metrics(model, splits, device, batch_size: int = 1024) -> dict[str, float]:
    state = state_of(model)
    model.eval()
    train = evaluate(model, state, splits.train, batch_size=batch_size, device=device)
    test = evaluate(model, state, splits.test, batch_size=batch_size, device=device)
    return {"train_loss": train.loss, "train_error": train.error, "test_loss": test.loss, "test_error": test.error}


def train_run(config: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
              progress: bool = False) -> Path:
    """Train `config` and write its run directory at `out`; return `out`.

    Bad options, missing data and an `out` that cannot be written are reported before anything
    is written. `out` may be absent or an empty directory; with `overwrite`, also a run directory
    genprobe wrote (never anything else: :func:`genprobe.store.check_run_replaceable`). With
    `resume`, continue the unfinished run at `out` from its last completed epoch.

    Interrupted (Ctrl-C, or any error) once its first epoch is saved, the run stays resumable;
    before that, and when training diverges, everything it wrote is removed again (a replaced
    run is put back).
    """
    out = Path(out)
    if resume:
        config = TrainConfig.from_dict(store.read_config(out))
        if (out / store.FINAL).is_file():
            raise RunError(f"run {out} is already finished; nothing to resume")
        if not (out / store.RESUME).is_file():
            raise RunError(f"cannot resume {out}: it has no {store.RESUME} (it was stopped before its "
                           f"first epoch was saved); train it again with --overwrite")
        metrics = store.read_metrics(out)
    else:
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
        config.validated()
        _check_out(out, overwrite)
    device = resolve_device(config.device)
    model, splits, rng = _build(config)  # raises before anything is written when data or options are bad
    with torch.random.fork_rng(devices=rng_devices()):  # the caller's RNG is left as it was
        torch.set_rng_state(rng)
        model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        if config.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        if resume:
            start = _load_resume(out, model, optimizer, config.epochs) + 1
            rows = metrics[metrics.epoch < start].to_dict("records")
            if [int(r["epoch"]) for r in rows] != list(range(start)):
                raise RunError(f"cannot resume {out}: {store.METRICS} lacks the metrics of epochs "
                               f"0..{start - 1}; train it again with --overwrite")
            log.info("resuming %s at epoch %d", out, start)
            _train_epochs(config, out, model, optimizer, splits, device, start, rows, progress)
        else:
            fresh = _FreshRun(out)
            try:
                fresh.begin()
                saved = config.to_dict() | {"genprobe_version": __version__,
                                            "data": {k: v for k, v in splits.meta.items() if k != "corrupted_indices"}}
                store.write_config(out, saved)
                corrupted = torch.as_tensor(splits.meta.get("corrupted_indices", []), dtype=torch.long)
                store.write_state(out / store.LABELS, {"train_labels": splits.train.y, "corrupted_indices": corrupted})
                store.write_state(store.checkpoint_path(out, 0), state_of(model))
                rows = [{"epoch": 0, "lr": 0.0, "seconds": 0.0, **_epoch_metrics(model, splits, device)}]
                store.write_metrics(out, pd.DataFrame(rows))
                _save_resume(out, 0, model, optimizer)
            except BaseException:  # not resumable yet: take back everything written
                fresh.undo()
                raise
            try:
                _train_epochs(config, out, model, optimizer, splits, device, 1, rows, progress)
            except RunError:  # diverged: a run of no use to anyone; take back what it wrote
                fresh.undo()
                raise
            except BaseException:  # interrupted: the new run is kept, resumable
                fresh.done()
                raise
            fresh.done()
        store.write_state(out / store.FINAL, state_of(model))
        (out / store.RESUME).unlink(missing_ok=True)
        return out


def _check_out(out: Path, overwrite: bool) -> None:
    """OutputError (one line) unless a fresh run may be written at `out`."""
    outputs.check_creatable(out, "run directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"run directory {out} already exists and is not empty; choose another "
                              "--out, pass --overwrite (replaces a run genprobe wrote), or --resume it")
        store.check_run_replaceable(out)
        here = Path.cwd().resolve()
        if out.resolve() == here or out.resolve() in here.parents:
            raise OutputError(f"run directory {out} holds the current directory and cannot be replaced; "
                              "run the command from elsewhere")
    if out.exists() and not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"run directory {out} cannot be written: no write permission")


class _FreshRun:
    """The directory of a fresh run: created (or emptied by moving a replaced run aside) by
    :meth:`begin`; :meth:`undo` removes what the run wrote and puts a replaced run back;
    :meth:`done` drops the replaced run."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.created = [p for p in [out, *out.parents] if not p.exists()]  # deepest first
        self.aside: Path | None = None  # the folder holding a replaced run

    def begin(self) -> None:
        out = self.out
        try:
            if out.is_dir() and any(out.iterdir()):  # a run genprobe wrote (checked by _check_out)
                store.check_run_replaceable(out)  # again: it may have changed meanwhile
                aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
                try:
                    out.rename(aside / "run")
                except OSError:
                    aside.rmdir()
                    raise
                self.aside = aside
                self.created.insert(0, out)
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"run directory {out} cannot be written: {exc.strerror or exc}") from None
        store.mark_run(out)

    def undo(self) -> None:
        out = self.out
        if out in self.created:
            shutil.rmtree(out, ignore_errors=True)
        elif out.is_dir():  # it was an empty directory before: empty it again
            for p in out.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        for parent in self.created:
            if parent != out:
                try:
                    parent.rmdir()
                except OSError:
                    break
        if self.aside is not None:
            (self.aside / "run").rename(out)
            self.aside.rmdir()
            self.aside = None

    def done(self) -> None:
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None


def _reached(targets: dict[str, float], row: Mapping[str, Any]) -> bool:
    """Whether one epoch's metrics meet every stop target (False when there is none)."""
    return bool(targets) and all(float(row[column]) <= target for column, target in targets.items())


def _train_epochs(config, out, model, optimizer, splits, device, start, rows, progress) -> None:
    """Train epochs `start`..`config.epochs`, or until the stop targets are met: a resumed run
    whose last saved epoch met them (interrupted before final was written) trains no further."""
    record = set(config.checkpoint_epochs())
    targets = config.stop_targets()
    if start > 1 and _reached(targets, rows[-1]):
        return
    x, y = splits.train.x.to(device), splits.train.y.to(device)
    steps = math.ceil(len(y) / config.batch_size)
    bars = progress_bars.task("training", total=config.epochs) if progress else \
        contextlib.nullcontext(progress_bars.Task(None, None))
    with bars as bar:
        bar.advance(start - 1)
        for epoch in range(start, config.epochs + 1):
            lr = config.learning_rate(epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            order = torch.randperm(len(y), generator=generator(config.seed, "order", epoch))
            model.train()
            began = time.perf_counter()
            for step in range(steps):
                index = order[step * config.batch_size:(step + 1) * config.batch_size].to(device)
                loss = F.cross_entropy(model(x[index]), y[index])
                if not torch.isfinite(loss):
                    raise RunError(f"training diverged at epoch {epoch} (loss {loss.item()}); lower --lr (now {lr:g})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            seconds = time.perf_counter() - began
            rows.append({"epoch": epoch, "lr": lr, "seconds": seconds, **_epoch_metrics(model, splits, device)})
            stop = _reached(targets, rows[-1])
            if epoch in record or stop:
                store.write_state(store.checkpoint_path(out, epoch), state_of(model))
            store.write_metrics(out, pd.DataFrame(rows))
            _save_resume(out, epoch, model, optimizer)
            bar.advance(1, description=f"epoch {epoch} test err {rows[-1]['test_error']:.4f}")
            if stop:
                log.info("%s reached %s at epoch %d", out, _criterion(config), epoch)
                break


def read_metrics(run: str | Path) -> pd.DataFrame:
    """The per-epoch metrics of a run (RunError when missing or corrupt)."""
    return store.read_metrics(run)


def _criterion(config: TrainConfig) -> str:
    names = {"train_loss": "train loss", "train_error": "train error"}
    return " and ".join(f"{names[column]} ≤ {target:g}" for column, target in config.stop_targets().items())


def training_outcome(config: TrainConfig, metrics: pd.DataFrame) -> dict[str, Any]:
    """How a run's training ended, from its config and per-epoch metrics (:func:`read_metrics`):
    ``epochs_run`` (the last epoch in `metrics`), ``converged`` (None when neither ``stop_loss``
    nor ``stop_error`` is set, else whether the last epoch meets the target(s)) and ``criterion``
    (``"train loss ≤ 0.01"``, ``""`` when none)."""
    if metrics.empty or "epoch" not in metrics.columns:
        raise RunError("training_outcome needs a run's per-epoch metrics: one row or more, with an 'epoch' column")
    last = metrics.loc[metrics["epoch"].idxmax()]
    targets = config.stop_targets()
    missing = [column for column in targets if column not in metrics.columns]
    if missing:
        raise RunError(f"the metrics of a run have no {missing[0]!r} column, so its stop target cannot be checked")
    return {"epochs_run": int(last["epoch"]), "converged": _reached(targets, last) if targets else None,
            "criterion": _criterion(config)}


__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainConfig", "build", "read_metrics", "train_run", "training_outcome"]
