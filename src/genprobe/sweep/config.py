"""A sweep config: its keys, its runs and their ids, and every check made before a run trains
(see :mod:`genprobe.sweep`)."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, GenprobeError, did_you_mean, first_line
from ..outputs import jsonable

log = logging.getLogger(__name__)

KEYS = ("name", "train", "grid", "runs", "probes", "baselines", "measures", "ranking", "figures",
        "jobs", "threads", "slurm")
"""The keys of a sweep config."""
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




def _unknown(where: str, phrase: str, name: str, choices, listed_as: str) -> ConfigError:
    """ConfigError: ``WHERE: unknown PHRASE; did you mean 'x'? LISTED_AS: a, b, c``."""
    listed = ", ".join(sorted(map(str, choices)))
    return ConfigError(f"{where}: unknown {phrase}; {did_you_mean(name, choices)}{listed_as}: {listed}")


def _train_fields() -> list[str]:
    from ..zoo.train import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig)]


def _float_fields() -> list[str]:
    from ..zoo.train import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig)
            if f.type in ("float", float, "float | None")]


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
    slurm: dict[str, Any] = field(default_factory=dict)
    source: str = "sweep config"

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepConfig:
        """Read and check a sweep config file (ConfigError, one line, naming what is wrong)."""
        from ..yamlfile import read_mapping

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
        from ..executors import check_jobs, check_slurm

        try:
            check_jobs(config.jobs, config.threads)
            config.slurm = check_slurm(data.get("slurm"))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        return config

    def to_dict(self) -> dict[str, Any]:
        """The normalized config (what ``sweep.yaml`` holds)."""
        return jsonable({"name": self.name, "train": self.train, "grid": self.grid, "runs": self.runs,
                          "probes": self.probes,
                          "baselines": False if self.baselines is None else self.baselines,
                          "measures": self.measures, "ranking": self.ranking,
                          "figures": self.figures}
                         | ({"slurm": self.slurm} if self.slurm else {}), strict=False)

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
    from ..probes.registry import get_probe, list_probes

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
        from ..measures import baselines
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
    from ..measures import import_measure

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
    """Options of :func:`genprobe.measures.rank_correlation` for ``genprobe measures`` and the
    report, checked now."""
    from ..measures.ranking import RankingOptions

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
    from ..zoo import list_models, model_options
    from ..zoo.train import TrainConfig

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
                              f"{arch!r}; {did_you_mean(key, [*fields, *allowed])}training options: "
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
    from ..data.core import DATASETS
    from ..zoo import model_options
    from ..zoo.train import TrainConfig

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
    from ..zoo import model_options
    from ..zoo.train import TrainConfig

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
    from ..data.core import DATASETS
    from ..zoo import model_options

    flat = {k: v for k, v in config.to_dict().items()
            if k not in (*NOT_SWEPT, "arch_options", "dataset_options")}
    for key, value in (model_options(config.arch) | config.arch_options).items():
        flat.setdefault(key, value)
    data_defaults = DATASETS[config.dataset].options() if config.dataset in DATASETS else {}
    for key, value in (data_defaults | config.dataset_options).items():
        flat[f"dataset_{key}"] = value
    return jsonable(flat, strict=False)


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

    from ..data import load_dataset
    from ..device import rng_devices
    from ..options import check_only
    from ..probes.registry import get_probe
    from ..subject import Subject
    from ..zoo import create_model

    def data_key(c) -> str:
        return json.dumps([c.dataset, c.dataset_options, c.data_dir, c.n_train, c.n_test, c.seed,
                           c.label_noise], sort_keys=True, default=str)

    groups: dict[str, list[SweepRun]] = {}
    for run in runs:
        groups.setdefault(data_key(run.config), []).append(run)
    checks = [(f"probe {name!r}", get_probe(name).function, options)
              for name, options in (probes or {}).items()]
    if baselines is not None:
        from ..measures import baselines as baselines_function

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
