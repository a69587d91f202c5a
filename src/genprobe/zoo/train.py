"""Training runs with checkpoints: the experiments' model families are made here.

:func:`train_run` trains one zoo architecture on one built-in dataset and writes a run
directory (see :mod:`genprobe.store`). Everything that decides the result is in
:class:`TrainConfig`, which is written to the run and is enough to rebuild the same model and
the same data split. Runs are deterministic under ``seed`` on the CPU (data order, label
corruption, initialization, dropout), and an interrupted run resumes from its last epoch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from .. import store
from .._version import __version__
from ..device import resolve_device
from ..errors import ConfigError, RunError, check_choice
from ..evaluate import evaluate
from ..params import state_of
from .models import create_model, list_models

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant", "step")


@dataclass
class TrainConfig:
    """One training run. Defaults are the "default training settings" the README's accuracy
    figures were measured with: SGD with momentum 0.9, lr 0.05 on a per-epoch cosine schedule,
    weight decay 5e-4, batch 128, 10 epochs.

    ``checkpoints``: ``"every"`` (each epoch), ``"log:N"`` (about N log-spaced epochs), or a
    comma-separated list of epochs ("1,2,5,10"). Epoch 0 (θ⁰) and the last epoch are always kept.
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

    # -- (de)serialisation -------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names and k not in ("genprobe_version", "data")]
        if unknown:
            raise ConfigError(f"unknown training option {unknown[0]!r}; options: {', '.join(sorted(names))}")
        return cls(**{k: v for k, v in d.items() if k in names}).validated()

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} must be a mapping of option: value")
        return cls.from_dict(d)

    def validated(self) -> TrainConfig:
        """Check every option; raise ConfigError naming the first bad one."""
        from ..data import list_datasets

        check_choice("arch", self.arch, list_models())
        check_choice("dataset", self.dataset, list_datasets())
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ConfigError(f"label_noise must be in [0, 1], got {self.label_noise!r}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("weight_decay must be >= 0 and momentum in [0, 1)")
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

    def learning_rate(self, epoch: int) -> float:
        """Learning rate used during `epoch` (1-based)."""
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "step":  # ÷10 at 50% and 75% of training
            return self.lr * 0.1 ** sum(epoch > self.epochs * f for f in (0.5, 0.75))
        return 0.5 * self.lr * (1 + math.cos(math.pi * (epoch - 1) / self.epochs))


def build(config: TrainConfig):
    """(model, DatasetSplits) of a config: the dataset under the config's seed, then the model
    initialized under the same seed. Used by training and by ``Subject.load``."""
    from ..data import load_dataset

    splits = load_dataset(config.dataset, seed=config.seed, data_dir=config.data_dir,
                          label_noise=config.label_noise, n_train=config.n_train, n_test=config.n_test,
                          **config.dataset_options)
    torch.manual_seed(config.seed)
    model = create_model(config.arch, splits.input_shape, splits.num_classes, **config.arch_options)
    return model, splits


def _save_resume(run: Path, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    tensors = {f"model.{k}": v for k, v in state_of(model).items()}
    opt = optimizer.state_dict()
    for idx, slots in opt["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value)
    tensors["rng"] = torch.get_rng_state()
    meta = {"epoch": str(epoch), "param_groups": json.dumps(opt["param_groups"])}
    tmp = run / (store.RESUME + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(run / store.RESUME)


def _load_resume(run: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    from safetensors import safe_open

    path = run / store.RESUME
    if not path.is_file():
        raise RunError(f"cannot resume {run}: it has no {store.RESUME}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    torch.set_rng_state(tensors["rng"])
    return int(meta["epoch"])


def _epoch_metrics(model, splits, device, batch_size: int = 1024) -> dict[str, float]:
    state = state_of(model)
    model.eval()
    train = evaluate(model, state, splits.train, batch_size=batch_size, device=device)
    test = evaluate(model, state, splits.test, batch_size=batch_size, device=device)
    return {"train_loss": train.loss, "train_error": train.error, "test_loss": test.loss, "test_error": test.error}


def train_run(config: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
              progress: bool = False) -> Path:
    """Train `config` and write its run directory at `out`; return `out`.

    Bad options and missing data are reported before anything is written. With `resume`,
    continue the unfinished run at `out` from its last completed epoch.
    """
    out = Path(out)
    if resume:
        config = TrainConfig.from_dict(store.read_config(out))
        if (out / store.FINAL).is_file():
            raise RunError(f"run {out} is already finished; nothing to resume")
    else:
        config.validated()
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise RunError(f"{out} already exists; choose another --out, pass --overwrite, or --resume it")
    device = resolve_device(config.device)
    model, splits = build(config)  # raises before anything is written when data or options are bad
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if resume:
        start = _load_resume(out, model, optimizer) + 1
        rows = pd.read_parquet(out / store.METRICS).query("epoch < @start").to_dict("records")
        log.info("resuming %s at epoch %d", out, start)
    else:
        if out.exists() and overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True)
        saved = config.to_dict() | {"genprobe_version": __version__,
                                    "data": {k: v for k, v in splits.meta.items() if k != "corrupted_indices"}}
        store.write_config(out, saved)
        corrupted = torch.as_tensor(splits.meta.get("corrupted_indices", []), dtype=torch.long)
        store.write_state(out / store.LABELS, {"train_labels": splits.train.y, "corrupted_indices": corrupted})
        store.write_state(store.checkpoint_path(out, 0), state_of(model))
        rows = [{"epoch": 0, "lr": 0.0, "seconds": 0.0, **_epoch_metrics(model, splits, device)}]
        pd.DataFrame(rows).to_parquet(out / store.METRICS, index=False)
        _save_resume(out, 0, model, optimizer)
        start = 1

    try:
        _train_epochs(config, out, model, optimizer, splits, device, start, rows, progress)
    except RunError:
        if not resume:  # a diverged fresh run is of no use to anyone: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    store.write_state(out / store.FINAL, state_of(model))
    (out / store.RESUME).unlink(missing_ok=True)
    return out


def _train_epochs(config, out, model, optimizer, splits, device, start, rows, progress) -> None:
    record = set(config.checkpoint_epochs())
    x, y = splits.train.x.to(device), splits.train.y.to(device)
    steps = math.ceil(len(y) / config.batch_size)
    bar = _progress(progress, config.epochs, start)
    for epoch in range(start, config.epochs + 1):
        lr = config.learning_rate(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
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
        if epoch in record:
            store.write_state(store.checkpoint_path(out, epoch), state_of(model))
        pd.DataFrame(rows).to_parquet(out / store.METRICS, index=False)
        _save_resume(out, epoch, model, optimizer)
        if bar is not None:
            bar[0].update(bar[1], advance=1, description=f"epoch {epoch} test err {rows[-1]['test_error']:.4f}")
    if bar is not None:
        bar[0].stop()


def _progress(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   transient=False)
    task = bar.add_task("training", total=total, completed=start - 1)
    bar.start()
    return bar, task


def read_metrics(run: str | Path) -> pd.DataFrame:
    """The per-epoch metrics of a run."""
    path = Path(run) / store.METRICS
    if not path.is_file():
        raise RunError(f"{run} has no {store.METRICS}; is it a genprobe run?")
    return pd.read_parquet(path)
