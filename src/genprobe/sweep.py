"""Sweeps: train a family of models, probe every one of them, and tabulate the lot — resumably.

A sweep config (YAML) names the runs and the probes::

    name: lr-width                       # optional: the default --out is sweeps/<name or file stem>
    train: {arch: fcn, dataset: mnist1d, epochs: 10, depth: 2}   # the base of every run
    grid:                                # the cartesian product of these (last key fastest)
      lr: [0.01, 0.1]
      width: [32, 128]
      label_noise: [0.0, 0.2]
      seed: [0, 1]
    runs: [{lr: 0.5, width: 512}]        # an explicit list, instead of or besides the grid
    probes: {robustness: {draws: 1}, stiffness: {per_class: 10}}   # registered probes, options
    baselines: true                      # or false, or options of genprobe.measures.baselines
    measures:                            # user-defined measures: a function of a Subject -> float
      sharpness: mypackage.measures:sharpness          # column user.sharpness
      margin: {function: "mypackage.measures:margin", direction: -1}
    ranking: {min_models: 8, bootstrap: 1000}   # options of genprobe.ranking.rank_correlation
    figures: true                        # save each probe's figure.png (false: faster)
    jobs: 2                              # optional defaults of --jobs and --threads
    threads: 1

Keys in ``train``, ``grid`` and ``runs`` are :class:`~genprobe.zoo.train.TrainConfig` fields or
options of the run's architecture (``width``, ``depth``, ``batchnorm``, ``dropout`` ... go to
``arch_options``; ``genprobe archs`` lists them). Everything is checked before any run trains:
unknown keys (with the closest name), every run's training options, its data and model, and the
options of the probes and baselines against each run's model, data and planned checkpoints
(:func:`_check_builds`).

The sweep directory (``OUT``)::

    .genprobe-sweep       marker: genprobe writes only into a sweep directory it made
    .lock                 held (flock) by the sweep writing here; holds its pid
    sweep.yaml            the normalized config of the last invocation
    runs/<run id>/        a run directory as ``genprobe train`` writes it, with probes/<probe>/
                          (each probe's saved result) and record.json (see below)
    table.parquet         one row per run, in the config's expansion order (see :func:`read_table`)
    table.json            the table's column groups and counts (also in ``table.attrs``)

A run's id is readable and a function of its training config alone (:func:`run_id`), so the same
config always maps to the same directory. A unit of work is one run: train it (continuing a run
killed mid-training from its last epoch), run each probe (a saved result that loads is reused),
the baselines, then write ``record.json`` atomically: hyper-parameters, final train/test error and
loss, every scalar measure, status ``done`` or ``failed`` with a one-line error, wall seconds,
threads. Every file is written atomically, so a sweep killed at any point (SIGKILL included) and
run again redoes nothing that finished and ends with the same table.

Re-running a sweep skips runs whose record says ``done`` under the same probes and baselines, and
retries failed runs (their finished parts are reused). Changing a probe's options removes the
saved results of that probe (they no longer match the config) and re-runs it on every run,
reusing the training; changing the grid adds (or leaves out of the table) runs without touching
the others.
"""

from __future__ import annotations

import dataclasses
import difflib
import fcntl
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from . import outputs, store
from ._version import __version__
from .errors import ConfigError, GenprobeError, OutputError, RunError, first_line, one_line

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.yaml"
TABLE = "table.parquet"
TABLE_META = "table.json"
RUNS_DIR = "runs"
RECORD = store.RECORD
LOCK = ".lock"
KEYS = ("name", "train", "grid", "runs", "probes", "baselines", "measures", "ranking", "figures",
        "jobs", "threads")
"""The keys of a sweep config."""
METRICS = ("train_error", "test_error", "train_loss", "test_loss")
"""The final-epoch metrics of each run (from its ``metrics.parquet``)."""
GAPS = ("gap", "loss_gap")
"""test_error − train_error and test_loss − train_loss."""
NOT_SWEPT = ("device", "data_dir")
"""TrainConfig fields that say where a run computes or finds its data, not what it trains: they
are not part of its identity, and ``device`` comes from the sweep's ``--device``."""
LARGE = 1000
"""A sweep of more runs than this needs an explicit ``allow_large`` (``--allow-large``): a grid
that large is more often a typo (a list where a value was meant) than a plan."""
ID_KEYS = (("width", "w"), ("channels", "c"), ("depth", "d"), ("batchnorm", "bn"),
           ("dropout", "do"), ("batch_size", "bs"), ("weight_decay", "wd"))
"""Options shown in a run id when they differ from their defaults (lr, label noise and seed
always are), with their abbreviations."""


# ----------------------------------------------------------------------------- config


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _unknown(where: str, phrase: str, name: str, choices, listed_as: str) -> ConfigError:
    """ConfigError: ``WHERE: unknown PHRASE; did you mean 'x'? LISTED_AS: a, b, c``."""
    listed = ", ".join(sorted(map(str, choices)))
    return ConfigError(f"{where}: unknown {phrase}; {_suggest(name, choices)}{listed_as}: {listed}")


def _train_fields() -> list[str]:
    from .zoo.train import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig)]


def _float_fields() -> list[str]:
    from .zoo.train import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig)
            if f.type in ("float", float, "float | None")]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its id, its training config, and its flat hyper-parameters (the
    TrainConfig fields, the architecture's options with defaults filled in, and the dataset's
    options as ``dataset_<name>``)."""

    id: str
    config: Any  # TrainConfig
    hyperparameters: dict[str, Any]


@dataclass
class SweepConfig:
    """A sweep: base training options, the grid and/or explicit runs, the probes and their
    options, and whether to compute baselines (see the module docstring)."""

    train: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    baselines: dict[str, Any] | None = field(default_factory=dict)
    measures: dict[str, dict[str, Any]] = field(default_factory=dict)
    ranking: dict[str, Any] = field(default_factory=dict)
    figures: bool = True
    name: str = "sweep"
    jobs: int | None = None
    threads: int | None = None
    source: str = "sweep config"

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepConfig:
        """Read and check a sweep config file (ConfigError, one line, naming what is wrong)."""
        from .yamlfile import read_mapping

        path = Path(path)
        data = read_mapping(path, "sweep config", "keys train, grid or runs, probes, ... (e.g. "
                            "examples/sweeps/tiny.yaml)")
        data.setdefault("name", path.stem)
        return cls.from_dict(data, source=f"sweep config {path}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "sweep config") -> SweepConfig:
        """A checked SweepConfig from a mapping like the YAML file's."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must be a mapping of key: value, got {type(data).__name__}")
        for key in data:
            if key not in KEYS:
                raise _unknown(source, f"key {key!r}", key, KEYS, "keys")
        train = _mapping(data.get("train"), "train", source)
        grid = _mapping(data.get("grid"), "grid", source)
        for key, values in grid.items():
            if not isinstance(values, list):
                raise ConfigError(f"{source}: grid key {key!r} must be a list of values, got "
                                  f"{values!r}; write {key}: [{values}]")
        runs = data.get("runs") or []
        if not isinstance(runs, list) or not all(isinstance(r, Mapping) for r in runs):
            raise ConfigError(f"{source}: runs must be a list of mappings like [{{lr: 0.1, width: 64}}]")
        name = data.get("name", "sweep")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
            raise ConfigError(f"{source}: name must be a simple word (letters, digits, . _ + -), "
                              f"got {name!r}")
        figures = data.get("figures", True)
        if not isinstance(figures, bool):
            raise ConfigError(f"{source}: figures must be true or false, got {figures!r}")
        config = cls(train=dict(train), grid={k: list(v) for k, v in grid.items()},
                     runs=[dict(r) for r in runs], probes=_probes(data.get("probes"), source),
                     baselines=_baselines(data.get("baselines", True), source),
                     measures=_user_measures(data.get("measures"), source),
                     ranking=_ranking(data.get("ranking"), source), figures=figures,
                     name=name, jobs=data.get("jobs"), threads=data.get("threads"), source=source)
        from .executors import check_jobs

        try:
            check_jobs(config.jobs, config.threads)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        return config

    def to_dict(self) -> dict[str, Any]:
        """The normalized config (what ``sweep.yaml`` holds)."""
        return _jsonable({"name": self.name, "train": self.train, "grid": self.grid, "runs": self.runs,
                          "probes": self.probes,
                          "baselines": False if self.baselines is None else self.baselines,
                          "measures": self.measures, "ranking": self.ranking,
                          "figures": self.figures})

    def size(self) -> int:
        """How many runs the grid and the explicit runs make (before repeats are merged)."""
        return (math.prod(len(v) for v in self.grid.values()) if self.grid else 0) + len(self.runs)

    def expand(self, *, allow_large: bool = False, device: str = "auto") -> list[SweepRun]:
        """The runs, in expansion order: the grid's cartesian product (keys in the config's
        order, the last varying fastest), then the explicit ``runs``. A run that appears twice
        is kept once (its first place). Checks every run's options, data and model, and the
        options of the probes and baselines against each run (on `device`), raising what they
        would (ConfigError, DataError, StateError, ModuleSelectionError); refuses more than
        :data:`LARGE` runs unless `allow_large`."""
        empty = [k for k, v in self.grid.items() if not v]
        if empty or not (self.grid or self.runs):
            why = f"grid key {empty[0]!r} has no values" if empty else "it has neither a grid nor runs"
            raise ConfigError(f"{self.source}: the sweep has zero runs ({why}); give each grid key "
                              "at least one value, or list runs")
        if self.size() > LARGE and not allow_large:
            shape = " × ".join(f"{len(v)} {k}" for k, v in self.grid.items())
            raise ConfigError(f"{self.source}: the sweep has {self.size():,} runs ({shape}"
                              f"{f' + {len(self.runs)} listed' if self.runs else ''}), more than "
                              f"{LARGE:,}; pass --allow-large (allow_large=True) if you mean it")
        points: list[tuple[str, dict]] = []
        if self.grid:
            keys = list(self.grid)
            for values in itertools.product(*(self.grid[k] for k in keys)):
                point = dict(zip(keys, values, strict=True))
                points.append((f"grid point {_brief(point)}", point))
        points += [(f"runs[{i}]", dict(r)) for i, r in enumerate(self.runs)]
        runs: dict[str, SweepRun] = {}
        for where, point in points:
            config = _train_config(self.train, point, f"{self.source}, {where}")
            rid = run_id(config)
            if rid in runs:
                log.info("%s: %s repeats run %s; kept once", self.source, where, rid)
                continue
            runs[rid] = SweepRun(rid, config, hyperparameters(config))
        _check_builds(list(runs.values()), self.source, probes=self.probes,
                      baselines=self.baselines, device=device)
        return list(runs.values())


def _mapping(value, key: str, source: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{source}: {key} must be a mapping of option: value, got {value!r}")
    return dict(value)


def _brief(point: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in point.items()) + "}"


def _probes(value, source: str) -> dict[str, dict[str, Any]]:
    """{probe: options}, checked against the registry and each probe function's keywords."""
    from .probes.registry import get_probe, list_probes

    if value is None:
        return {}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = dict.fromkeys(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: probes must be a mapping of probe name: options, got {value!r}")
    registered = list_probes()
    probes = {}
    for name, options in value.items():
        if name not in registered:
            raise _unknown(f"{source}, probes", f"probe {name!r}", name, registered,
                           "registered probes")
        options = {} if options is None else options
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            raise ConfigError(f"{source}: options of probe {name!r} must be a mapping of option: value, "
                              f"got {options!r}")
        accepted = get_probe(name).parameters()
        for option in options:
            if option not in accepted:
                raise _unknown(f"{source}, probes", f"option {option!r} of probe {name!r}", option,
                               accepted, "its options")
            if option == "out":  # e.g. ntk's kernel folder: every run would write the same one
                raise ConfigError(f"{source}: option 'out' of probe {name!r} names one folder for "
                                  "every run of the sweep; drop it (each result is saved in its run)")
        probes[name] = dict(options)
    return probes


def _baselines(value, source: str) -> dict[str, Any] | None:
    """None (off) or the options of ``genprobe.measures.baselines``, checked against it."""
    if value is False or value is None:
        return None
    if value is True:
        value = {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{source}: baselines must be true, false or a mapping of options, "
                          f"got {value!r}")
    try:
        from .measures import baselines
    except ImportError:
        raise ConfigError(f"{source}: baselines need genprobe.measures, which this installation "
                          "lacks; set baselines: false") from None
    accepted = [n for n, p in inspect.signature(baselines).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for option in value:
        if option not in accepted:
            raise _unknown(source, f"option {option!r} of baselines", option, accepted,
                           "its options")
    return dict(value)


def _user_measures(value, source: str) -> dict[str, dict[str, Any]]:
    """{name: {"function": "package.module:function", "direction": d}}, each import path resolved
    now (ConfigError, one line, before any work)."""
    from .measures import import_measure

    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: measures must map names to import paths, like "
                          "{sharpness: 'mypackage.measures:sharpness'}, got " f"{value!r}")
    out = {}
    for name, entry in value.items():
        if isinstance(entry, str):
            entry = {"function": entry}
        if not isinstance(entry, Mapping) or set(entry) - {"function", "direction"} \
                or "function" not in entry:
            raise ConfigError(f"{source}: measure {name!r} must be 'package.module:function' or "
                              f"{{function: ..., direction: -1|0|1}}, got {entry!r}")
        direction = entry.get("direction", 0)
        try:
            import_measure(name, entry["function"], direction=direction)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        out[str(name)] = {"function": entry["function"], "direction": int(direction)}
    return out


def _ranking(value, source: str) -> dict[str, Any]:
    """Options of :func:`genprobe.ranking.rank_correlation` for ``genprobe measures`` and the
    report, checked now."""
    from .ranking import RankingOptions

    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: ranking must be a mapping of options, like {{min_models: 8}}, "
                          f"got {value!r}")
    RankingOptions.from_mapping(value, f"{source}, ranking")
    return dict(value)


def _train_config(base: dict, point: dict, where: str):
    """The TrainConfig of base options updated by one grid point or run entry; keys that are
    not TrainConfig fields are options of the run's architecture."""
    from .zoo import list_models, model_options
    from .zoo.train import TrainConfig

    fields = _train_fields()
    merged: dict[str, Any] = {}
    arch_options: dict[str, Any] = {}
    dataset_options: dict[str, Any] = {}
    for part in (base, point):
        for key, value in part.items():
            if key in NOT_SWEPT and (part is point or key == "device"):
                raise ConfigError(f"{where}: {key} is not swept; "
                                  + ("set it with --device" if key == "device" else "give it in train:"))
            if key in ("arch_options", "dataset_options"):
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{where}: {key} must be a mapping of option: value, "
                                      f"got {value!r}")
                (arch_options if key == "arch_options" else dataset_options).update(value)
            elif key in fields:
                merged[key] = value
            else:
                arch_options[key] = value
    for key in _float_fields():  # YAML 1.1 reads 1e-3 as a string
        value = merged.get(key)
        if isinstance(value, str):
            try:
                merged[key] = float(value)
            except ValueError:
                pass
    arch = merged.get("arch", TrainConfig.arch)
    if arch not in list_models():
        raise _unknown(where, f"arch {arch!r}", arch, list_models(), "archs")
    allowed = model_options(arch)
    for key in arch_options:
        if key not in allowed:
            raise ConfigError(f"{where}: {key!r} is neither a training option nor an option of arch "
                              f"{arch!r}; {_suggest(key, [*fields, *allowed])}training options: "
                              f"{', '.join(f for f in fields if f not in NOT_SWEPT)}; "
                              f"{arch} options: {', '.join(allowed)}")
    try:
        return TrainConfig.from_dict(merged | {"arch_options": arch_options,
                                               "dataset_options": dataset_options})
    except GenprobeError as exc:
        raise type(exc)(f"{where}: {exc}") from None


def _identity(config) -> dict[str, Any]:
    """What a run trains: its TrainConfig fields, architecture and dataset options that differ
    from their defaults (so an explicit default is the same run as an absent one, and a new
    option added to genprobe with a default leaves existing ids alone), arch and dataset always;
    whole-valued floats as ints (lr 1.0 is lr 1)."""
    from .data.core import DATASETS
    from .zoo import model_options
    from .zoo.train import TrainConfig

    defaults = TrainConfig()
    arch_defaults = model_options(config.arch)
    data_defaults = DATASETS[config.dataset].options() if config.dataset in DATASETS else {}
    ident = {"arch": config.arch, "dataset": config.dataset}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        if f.name in (*NOT_SWEPT, "arch", "dataset", "arch_options", "dataset_options"):
            continue
        if value != getattr(defaults, f.name):
            ident[f.name] = value
    ident["arch_options"] = {k: v for k, v in config.arch_options.items()
                             if k not in arch_defaults or v != arch_defaults[k]}
    ident["dataset_options"] = {k: v for k, v in config.dataset_options.items()
                                if k not in data_defaults or v != data_defaults[k]}
    return _canonical(ident)


def _canonical(value):
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _short(value) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def run_id(config) -> str:
    """The run id of a TrainConfig: readable and stable (the same config always gives the same
    id, on any machine), e.g. ``fcn-w64-lr0.1-ln0.2-s0-3fa9c2d1``: the architecture, the options
    of :data:`ID_KEYS` that differ from their defaults, lr, label noise and seed, then 8 hex digits
    of the SHA-256 of the run's identity (:func:`_identity`) for uniqueness."""
    from .zoo import model_options
    from .zoo.train import TrainConfig

    ident = _identity(config)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]
    arch_defaults, defaults = model_options(config.arch), TrainConfig()
    parts = [_short(config.arch)]
    for key, short in ID_KEYS:
        if key in arch_defaults:
            value, default = config.arch_options.get(key, arch_defaults[key]), arch_defaults[key]
        elif hasattr(defaults, key):
            value, default = getattr(config, key), getattr(defaults, key)
        else:
            continue
        if value != default:
            parts.append(short if value is True else f"{short}{_short(value)}")
    parts += [f"lr{_short(float(config.lr))}", f"ln{_short(float(config.label_noise))}",
              f"s{config.seed}", digest]
    return "-".join(parts)


def hyperparameters(config) -> dict[str, Any]:
    """The flat hyper-parameters of a run: TrainConfig fields (but :data:`NOT_SWEPT` and the
    option mappings), every option of its architecture (defaults filled in), and its dataset's
    options as ``dataset_<name>``."""
    from .data.core import DATASETS
    from .zoo import model_options

    flat = {k: v for k, v in config.to_dict().items()
            if k not in (*NOT_SWEPT, "arch_options", "dataset_options")}
    for key, value in (model_options(config.arch) | config.arch_options).items():
        flat.setdefault(key, value)
    data_defaults = DATASETS[config.dataset].options() if config.dataset in DATASETS else {}
    for key, value in (data_defaults | config.dataset_options).items():
        flat[f"dataset_{key}"] = value
    return _jsonable(flat)


def _check_builds(runs: list[SweepRun], source: str, *, probes: Mapping[str, dict] | None = None,
                  baselines: Mapping[str, Any] | None = None, device: str = "auto") -> None:
    """Load each run's data and build its model, and check the options of every probe and of
    the baselines against them, so that missing data, a bad option value, a module pattern
    that matches nothing, an unrecorded checkpoint or a sample larger than the data is an error
    now, not a failed run an hour from now.

    A probe's options are checked by the probe itself (:meth:`ProbeSpec.check`, which stops
    before its work) on a stand-in subject: the run's model at its initialization, its data
    (same seed, label noise and subsets), and the checkpoints its config plans, every one at θ⁰;
    θ^F is θ⁰ nudged by 1e-3 (only shapes, names and epochs matter here). A run that meets a stop
    target early records fewer checkpoints than planned: a probe asking for a later one fails
    on that run alone. Data is loaded once per (dataset, seed, label noise), one at a time."""
    import torch

    from .data import load_dataset
    from .device import rng_devices
    from .probes.registry import check_only, get_probe
    from .subject import Subject
    from .zoo import create_model

    def data_key(c) -> str:
        return json.dumps([c.dataset, c.dataset_options, c.data_dir, c.n_train, c.n_test, c.seed,
                           c.label_noise], sort_keys=True, default=str)

    groups: dict[str, list[SweepRun]] = {}
    for run in runs:
        groups.setdefault(data_key(run.config), []).append(run)
    checks = [(f"probe {name!r}", get_probe(name).function, options)
              for name, options in (probes or {}).items()]
    if baselines is not None:
        from .measures import baselines as baselines_function

        checks.append(("baselines", baselines_function, baselines))
    for group in groups.values():
        c = group[0].config
        try:
            splits = load_dataset(c.dataset, seed=c.seed, data_dir=c.data_dir, n_train=c.n_train,
                                  n_test=c.n_test, label_noise=c.label_noise, **c.dataset_options)
        except GenprobeError as exc:
            raise type(exc)(f"{source}, run {group[0].id}: {exc}") from None
        seen: set[str] = set()  # in a group, only the model and the checkpoints matter
        for run in group:
            c, where = run.config, f"{source}, run {run.id}"
            key = json.dumps([c.arch, c.arch_options, c.checkpoint_epochs()], sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            with torch.random.fork_rng(devices=rng_devices()):
                torch.manual_seed(c.seed)
                try:
                    model = create_model(c.arch, splits.input_shape, splits.num_classes, **c.arch_options)
                except GenprobeError as exc:
                    raise type(exc)(f"{where}: {exc}") from None
                except (TypeError, ValueError, RuntimeError) as exc:
                    raise ConfigError(f"{where}: arch {c.arch!r} with options {dict(c.arch_options)}: "
                                      f"{first_line(exc)}") from None
            if not checks:
                continue
            init = {k: v.detach().clone() for k, v in model.state_dict().items()}
            final = {k: v + 1e-3 if v.is_floating_point() else v for k, v in init.items()}
            subject = Subject(model, init=init, final=final,
                              checkpoints=dict.fromkeys(c.checkpoint_epochs(), init),
                              train=splits.train, test=splits.test, num_classes=splits.num_classes)
            for what, function, options in checks:
                kwargs = dict(options)
                if "device" in inspect.signature(function).parameters:
                    kwargs.setdefault("device", device)
                try:
                    check_only(function, subject, kwargs, what)
                except GenprobeError as exc:
                    raise type(exc)(f"{where}: {what}: {exc}") from None


# ----------------------------------------------------------------------------- one unit of work


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
        "genprobe_version": __version__}
    phase = "training"
    try:
        (run / RECORD).unlink(missing_ok=True)  # a failed or outdated record is redone
        _clean_stale(run)
        _train(run, unit)
        record["metrics"] = _final_metrics(run)
        subject = _LazySubject(run)
        for name, options in unit["probes"].items():
            phase = f"probe {name}"
            summary = _probe(run, name, options, subject, unit["device"], unit["figures"])
            record["measures"].update({f"{name}.{k}": v for k, v in summary.items()})
        if unit["baselines"] is not None:
            phase = "baselines"
            from . import measures

            options = {"device": unit["device"]} | unit["baselines"]
            values = measures.baselines(subject.get(), **options)
            record["measures"].update({k if k.startswith("baseline.") else f"baseline.{k}": float(v)
                                       for k, v in values.items()})
        for name, entry in unit.get("measures", {}).items():
            phase = f"measure user.{name}"
            from .measures import evaluate_measure, import_measure

            spec = import_measure(name, entry["function"], direction=entry["direction"])
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
    run.mkdir(parents=True, exist_ok=True)
    outputs.write_text_atomic(run / RECORD, json.dumps(record, indent=1))
    return record


class _LazySubject:
    """The run's Subject, loaded at the first probe that is not saved yet."""

    def __init__(self, run: Path) -> None:
        self.run, self.subject = run, None

    def get(self):
        if self.subject is None:
            from .subject import Subject

            self.subject = Subject.load(self.run)
        return self.subject


_TMP_FILE = re.compile(r"^\.(?P<name>.+)\.\d+\.tmp$")  # outputs.tmp_name
_TMP_DIR = re.compile(r"^\.(?P<name>[^/]+?)\.(?:[A-Za-z0-9_]+\.tmp|old-\d+)$")  # staged_directory


def _clean_stale(run: Path) -> None:
    """Remove the temporary files and directories a killed process left in `run` (this unit is
    the only writer there: the sweep holds the lock). A temporary directory goes only when it
    holds nothing but what a result holds."""
    from .results import result_file

    for folder in (run, run / store.CHECKPOINT_DIR):
        for p in folder.iterdir() if folder.is_dir() else []:
            if _TMP_FILE.match(p.name) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
    probes = run / store.PROBES_DIR
    for p in probes.iterdir() if probes.is_dir() else []:
        if _TMP_DIR.match(p.name) and p.is_dir() and not p.is_symlink() and all(
                result_file(q.name) or q.name == outputs.MARKS["result"] for q in p.iterdir()):
            shutil.rmtree(p, ignore_errors=True)


def _train(run: Path, unit: dict[str, Any]) -> None:
    """Train the run at `run`, continue it if it was interrupted, or leave it if finished."""
    from .zoo.train import TrainConfig, train_run

    config = TrainConfig.from_dict(unit["train"])
    if (run / store.CONFIG).is_file():
        saved = run_id(TrainConfig.from_dict(store.read_config(run)))
        if saved != unit["run"]:
            raise RunError(f"{run} holds a run of another config (id {saved}); move it away")
    if (run / store.FINAL).is_file():
        return
    if (run / store.RESUME).is_file():
        train_run(config, run, resume=True)
    else:  # fresh; over what a killed start left (check_run_replaceable proves it is a run's)
        train_run(config, run, overwrite=run.is_dir() and any(run.iterdir()))


def _final_metrics(run: Path) -> dict[str, Any]:
    """The last epoch's metrics, and whether the run reached its training target
    (``converged``: None when it had none; ``epochs_run``)."""
    from .zoo.train import TrainConfig, training_outcome

    metrics = store.read_metrics(run).sort_values("epoch")
    last = metrics.iloc[-1]
    outcome = training_outcome(TrainConfig.from_dict(store.read_config(run)), metrics)
    return {"epoch": int(last["epoch"]), **{k: float(last[k]) for k in METRICS},
            "converged": outcome["converged"], "epochs_run": int(outcome["epochs_run"])}


def _probe(run: Path, name: str, options: dict, subject: _LazySubject, device: str,
           figures: bool) -> dict[str, float]:
    """The summary of probe `name` on the run: from its saved result when that loads, else
    computed and saved (with its figure when `figures`)."""
    from .probes.registry import get_probe
    from .results import Result

    path = run / store.PROBES_DIR / name
    if path.is_dir():
        try:
            result = Result.load(path)
        except RunError:
            result = None
        if result is not None and result.probe == name:
            if figures and not (path / "figure.png").is_file():
                result.save(path, figure=True)
            return result.summary
    spec = get_probe(name)
    kwargs = dict(options)
    if "device" in spec.parameters():
        kwargs.setdefault("device", device)
    result = spec.function(subject.get(), **kwargs)
    result.save(path, figure=figures)
    return result.summary


# ----------------------------------------------------------------------------- the table


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
    ``error`` and ``seconds`` (wall time of the run's last attempt), ``converged`` (whether it
    reached its training target; missing without one) and ``epochs_run``. ``table.attrs`` names
    the column groups (``hyperparameters``, ``metrics``, ``measures``), counts the runs, and with
    `config` holds its ``probes``, ``baselines``, ``user_measures`` and ``ranking`` options (what
    :func:`genprobe.ranking.rank_correlation` reads to decide which columns are measures)."""
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
    table = pd.DataFrame(columns)
    table.attrs = {"hyperparameters": hyper, "metrics": [*METRICS, *GAPS],
                   "measures": list(measures), "runs": len(runs),
                   "done": sum(rec["status"] == "done" for _, rec in rows),
                   "failed": sum(rec["status"] == "failed" for _, rec in rows)}
    if config is not None:  # what the ranking needs to decide which columns are measures
        table.attrs |= {"probes": config.probes, "baselines": config.baselines,
                        "user_measures": config.measures, "ranking": config.ranking}
    return table


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


# ----------------------------------------------------------------------------- the directory


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
            match = _TMP_FILE.match(p.name)
            if match and match.group("name") in (SWEEP_FILE, TABLE, TABLE_META, outputs.MARKS["sweep"]) \
                    and p.is_file():
                p.unlink(missing_ok=True)


    def forget_changed_probes(self, config: SweepConfig) -> None:
        """Remove the saved results of every probe whose options differ from the last
        invocation's (or that it did not run): they were computed under other options. A
        result directory goes only when it is one genprobe wrote."""
        from .results import result_file

        before = read_config(self.out) or {}
        old = before.get("probes") if isinstance(before.get("probes"), dict) else {}
        changed = [name for name, options in config.probes.items()
                   if name not in old or _jsonable(old[name] or {}) != _jsonable(options)]
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
        path = self.out / RUNS_DIR / run.id / RECORD
        try:
            record = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) and record.get("run") == run.id else None


def _current(record: dict[str, Any] | None, config: SweepConfig) -> bool:
    """Whether a run's record is done under the config's probes, baselines and figures."""
    return (record is not None and record.get("status") == "done"
            and _jsonable(record.get("probes")) == _jsonable(config.probes)
            and _jsonable(record.get("baselines")) == _jsonable(config.baselines)
            and _jsonable(record.get("user_measures", {})) == _jsonable(config.measures)
            and (record.get("figures", False) or not config.figures))


# ----------------------------------------------------------------------------- the sweep


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` did: the sweep directory, its table, and how many runs were done
    before (``reused``), are done now, and failed."""

    out: Path
    table: pd.DataFrame
    runs: int
    done: int
    failed: int
    reused: int

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
              allow_large: bool = False) -> SweepOutcome:
    """Run a sweep (a :class:`SweepConfig`, or the path of its YAML file) into `out` (default
    :func:`default_out`); see the module docstring.

    ``jobs`` / ``threads``: concurrent runs and intra-op threads per run (defaults: the config's,
    else 1 job and an equal share of the cores). Results depend on the thread count (floating-point
    summation order), not on the number of jobs; each record keeps its thread count.
    ``executor``: ``local`` (:class:`~genprobe.executors.LocalExecutor`) or ``ray``
    (:class:`~genprobe.executors.RayExecutor`, at ``address`` or a local instance). ``device``:
    where runs train and probes compute. ``on_run(record)`` is called as each run finishes.
    ``allow_large``: accept more than :data:`LARGE` runs.

    Everything is checked before anything is written. A failed run is recorded and the sweep
    goes on; the outcome counts them. Raises OutputError when `out` is not a sweep directory
    genprobe made, or another sweep holds it.
    """
    from .device import resolve_device
    from .executors import check_jobs, make_executor

    if not isinstance(config, SweepConfig):
        config = SweepConfig.from_yaml(config)
    resolve_device(device)
    runs = config.expand(allow_large=allow_large, device=device)
    jobs, threads = check_jobs(jobs if jobs is not None else config.jobs,
                               threads if threads is not None else config.threads)
    runner = make_executor(executor, jobs=jobs, threads=threads, address=address, device=device)
    out = Path(out) if out is not None else default_out(config)
    _SweepDirectory(out).check()  # before Ray starts
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
                        failed=int((table.status == "failed").sum()), reused=reused)


def _execute(runner, todo, runs, records, out, reused, show, on_run, config) -> None:
    """Run the units of `todo` on `runner`, keeping the records and the table up to date."""
    import contextlib

    import torch

    from . import progress

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
    run = out / RUNS_DIR / unit["run"]
    run.mkdir(parents=True, exist_ok=True)
    outputs.write_text_atomic(run / RECORD, json.dumps(record, indent=1))
    return record


__all__ = ["SweepConfig", "SweepOutcome", "SweepRun", "build_table", "default_out", "hyperparameters",
           "measures_figure_paths", "read_config", "read_table", "records", "run_dir", "run_id", "run_sweep", "run_unit", "varying"]
