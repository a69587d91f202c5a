"""Subject: the network under study — architecture, named states, and data.

Probes take a Subject and never mutate anything in it. The model is copied once, at
construction, and kept in eval mode; states live on the CPU and are moved to the compute
device by the code that evaluates them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import inputs
from . import params as P
from .errors import ConfigError, DataError, StateError, one_line
from .logits import Output, check_output, describe, logits_of, returning_logits
from .options import check_int
from .values import Data, as_data


@dataclass
class Subject:
    """A network under study.

    Args:
        model: any ``nn.Module``; the architecture. Copied once; the caller's model is untouched.
        init: θ⁰, the state dict at initialization (needed by probes that rewind).
        final: θ^F; default: ``model.state_dict()``.
        checkpoints: ``{epoch: state_dict}`` recorded during training (θ^τ); epoch 0 is θ⁰.
        train, test: ``(X, y)`` tensors or a map-style Dataset of ``(input, label)``.
        num_classes: default: ``max(label) + 1`` over train and test.
        meta: free-form provenance (the run's config when loaded from a run directory).
        output: how to get the (N, K) logits from what the model returns. Default: a tensor is
            the logits; of a tuple or list, its first element; of a mapping or an object (a
            Hugging Face ``ModelOutput``), its ``logits``. Otherwise a function, e.g.
            ``output=lambda out: out["scores"]``. The Subject's model returns the logits.
        stream: for a Dataset: True reads it a batch at a time whenever a probe passes over it
            (never whole: for data larger than memory; a probe's sample is read into memory),
            False reads it into memory once; None (default) streams it when its inputs would take
            more than a quarter of the available memory. Labels of a streamed Dataset come from
            its ``targets`` attribute when it has one (torchvision's datasets do), else from
            reading every item once.
        workers: for a streamed Dataset: worker processes (a torch DataLoader's) that read its
            items ahead of a probe's pass over it, for items whose reading costs (decoding an
            image file, a transform); 0 (default) reads them in this process. The Dataset must
            pickle or fork as a DataLoader's does.
    """

    model: nn.Module
    init: Mapping[str, Tensor] | None = None
    final: Mapping[str, Tensor] | None = None
    checkpoints: Mapping[int, Mapping[str, Tensor]] = field(default_factory=dict)
    train: Any = None
    test: Any = None
    num_classes: int | None = None
    meta: dict = field(default_factory=dict)
    output: Output | None = None
    stream: bool | None = None
    workers: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise StateError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        check_output(self.output)
        self.model = copy.deepcopy(self.model).cpu().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        model = self.model
        self.final = P.canonical_state(model, self.final if self.final is not None else model.state_dict(), "final")
        with torch.no_grad():  # the Subject's own copy carries θ^F: a user calling it gets it
            model.load_state_dict(dict(self.final), strict=False)
        self.init = None if self.init is None else P.canonical_state(model, self.init, "init")
        checkpoints = {}
        for epoch, state in dict(self.checkpoints).items():
            if not isinstance(epoch, int) or epoch < 0:
                raise StateError(f"checkpoint keys must be epochs (non-negative ints), got {epoch!r}")
            checkpoints[epoch] = P.canonical_state(model, state, f"checkpoints[{epoch}]")
        if self.init is not None:
            checkpoints.setdefault(0, self.init)
        elif 0 in checkpoints:
            self.init = checkpoints[0]
        self.checkpoints = dict(sorted(checkpoints.items()))
        _check_finite("final", self.final)
        for epoch, state in self.checkpoints.items():
            _check_finite("init" if epoch == 0 and state is self.init else f"checkpoints[{epoch}]", state)
        if self.init is not None:
            _check_not_final(model, self.init, self.final)
        dtype = next((v.dtype for v in self.final.values() if v.is_floating_point()), torch.float32)
        check_int("workers", self.workers, 0)
        self.train = _as_model_data(self.train, "train", dtype, self.stream, self.workers)
        self.test = _as_model_data(self.test, "test", dtype, self.stream, self.workers)
        labels = [d.y for d in (self.train, self.test) if d is not None]
        if self.num_classes is None:
            self.num_classes = int(max(int(y.max()) for y in labels)) + 1 if labels else None
        elif isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise DataError(f"num_classes must be a positive int, got {self.num_classes!r}")
        for name, d in (("train", self.train), ("test", self.test)):
            if d is not None and int(d.y.max()) >= self.num_classes:
                raise DataError(f"{name}: label {int(d.y.max())} is out of range for num_classes="
                                f"{self.num_classes}; labels must be 0..{self.num_classes - 1}")
        for name, d in (("train", self.train), ("test", self.test)):
            if d is not None:
                if _check_fits(model, self.final, d, name, self.num_classes, self.output):
                    self.model = model = returning_logits(model, self.output)
        self._order: list[str] | None = None

    def __repr__(self) -> str:
        params = sum(v.numel() for k, v in self.final.items() if k in dict(self.model.named_parameters()))
        epochs = sorted(self.checkpoints)
        states = ["final"] + (["init"] if self.init is not None else [])
        if epochs:
            states.append(f"{len(epochs)} checkpoints (epochs {epochs[0]}..{epochs[-1]})")
        data = [f"{name} {len(d)}×{tuple(d.x.shape[1:])}" if isinstance(d.x, Tensor) else
                f"{name} {len(d)}×{inputs.describe(d.x.first, 0)} (streamed)"
                if isinstance(d.x, inputs.Streamed) else f"{name} {len(d)}×{inputs.describe(d.x)}"
                for name, d in (("train", self.train), ("test", self.test)) if d is not None]
        return (f"Subject({type(self.model).__name__}, {params:,} parameters; {', '.join(states)}; "
                f"{', '.join(data) or 'no data'}; {self.num_classes} classes)")

    # -- states ----------------------------------------------------------------

    def state(self, which: str | int = "final") -> P.State:
        """A named state: ``"final"``, ``"init"``, or a recorded checkpoint epoch."""
        if which == "final":
            return self.final
        if which == "init" or which == 0:
            return self.require_init()
        if isinstance(which, int) and which in self.checkpoints:
            return self.checkpoints[which]
        raise StateError(f"no checkpoint for epoch {which!r}; recorded epochs: {sorted(self.checkpoints)}")

    def require_init(self, probe: str = "this probe") -> P.State:
        if self.init is None:
            raise StateError(f"{probe} needs the initial state θ⁰: pass init=<state_dict at init> "
                             "to Subject, or load a run written by `genprobe train`")
        return self.init

    # -- data ------------------------------------------------------------------

    def data(self, split: str) -> Data:
        """The ``"train"`` or ``"test"`` split."""
        if split not in ("train", "test"):
            raise DataError(f"unknown split={split!r}; choose 'train' or 'test'")
        data = getattr(self, split)
        if data is None:
            raise DataError(f"this Subject has no {split} data: pass {split}=(X, y) to Subject")
        return data

    # -- units -----------------------------------------------------------------

    def forward_order(self) -> list[str]:
        """Module names in forward order (traced once on one example, then cached)."""
        if self._order is None:
            example = None
            for d in (self.train, self.test):
                if d is not None:
                    example = inputs.take(d.x, slice(0, 1))
                    break
            self._order = P.forward_order(self.model, example)
        return self._order

    def units(self, modules=None) -> list[P.Unit]:
        """Resolve a module selection (see :func:`genprobe.params.select_units`) in forward order."""
        return P.select_units(self.model, modules, self.forward_order())

    # -- persistence -------------------------------------------------------------

    @classmethod
    def load(cls, run_dir: str | Path, *, data_dir: str | Path | None = None) -> Subject:
        """Load a run directory written by ``genprobe train`` (model, every checkpoint, same data split)."""
        from .runs import read_run

        return cls(**read_run(run_dir, data_dir=data_dir))


def units(target: Subject | nn.Module, modules=None):
    """The units a probe would edit, as a table a user reads to choose ``modules=``: one row per
    unit (``unit``, its ``modules``, their ``types``, ``parameters``: a count) and after them
    one row per default single-direction site (``unit`` the activation module's name, ``types``
    its class, ``parameters`` 0, ``site`` True). `target`: a Subject (forward order, traced on
    one example) or a bare ``nn.Module`` (registration order). `modules`: a selection as the
    probes take it (patterns, or ``{name: patterns}`` for a transformer layer or a residual stage
    as one unit; see :func:`genprobe.params.select_units`). For a Subject, the sites include the
    activation functions its forward calls itself (``relu(fc1)``, type ``relu``; see
    :mod:`genprobe.engine.sites`), found on one example."""
    import pandas as pd

    functional: list[str] = []
    if isinstance(target, Subject):
        from .engine.sites import discover, is_functional

        model, order = target.model, target.forward_order()
        data = target.train if target.train is not None else target.test
        if data is not None:
            seen = discover(copy.deepcopy(model), inputs.take(data.x, slice(0, 1)), target.final)
            functional = [s for s in seen if is_functional(s)]
            order = list(seen) + [n for n in order if n not in seen]
    elif isinstance(target, nn.Module):
        model, order = target, None
    else:
        raise ConfigError(f"units() takes a Subject or an nn.Module, got {type(target).__name__}")
    named = dict(model.named_modules())
    sizes = dict(model.named_parameters())
    rows = [{"unit": u.name, "modules": ", ".join(u.modules) or "(root)",
             "types": ", ".join(sorted({type(named[m]).__name__ for m in u.modules})) or type(model).__name__,
             "parameters": sum(sizes[k].numel() for k in u.params if k in sizes), "site": False}
            for u in P.select_units(model, modules, order)]
    rows += [{"unit": site, "modules": site, "parameters": 0, "site": True,
              "types": type(named[site]).__name__ if site in named else site.split("(")[0].split("@")[0].split("#")[0]}
             for site in P.select_sites(model, None, order, functional=functional)]
    return pd.DataFrame(rows, columns=["unit", "modules", "types", "parameters", "site"])


def check_subject(subject, probe: str) -> None:
    """ConfigError unless `subject` is a Subject (a path or a model is a common slip), naming
    the `probe` (or function) it was given to."""
    if not isinstance(subject, Subject):
        hint = (" (a run directory: load it with gp.Subject.load(path))" if isinstance(subject, (str, bytes))
                or hasattr(subject, "__fspath__") else "")
        raise ConfigError(f"{probe} takes a gp.Subject, got {type(subject).__name__}{hint}")


def _check_finite(what: str, state: P.State) -> None:
    """StateError naming the first tensor with NaN or infinite values: a broken model gives no
    meaningful probe result, and must never give a clean-looking one."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise StateError(f"{what}[{key!r}] holds {bad} NaN or infinite value(s): the model is "
                             "broken there; check the checkpoint or the training run that wrote it")


def _check_not_final(model: nn.Module, init: P.State, final: P.State) -> None:
    params = [k for k, _ in model.named_parameters()]
    if params and all(init[k] is final[k] or torch.equal(init[k], final[k]) for k in params):
        raise StateError("init is identical to final (every parameter is equal): was the initial "
                         "state_dict passed without copying? Save θ⁰ before training as "
                         "{k: v.clone() for k, v in model.state_dict().items()}")


def _as_model_data(data, what: str, dtype: torch.dtype, stream: bool | None, workers: int) -> Data | None:
    """Data with floating inputs in the model's dtype (integer inputs, token ids, stay integer);
    streamed inputs are cast as they are read, by `workers` processes ahead of the reader."""
    data = as_data(data, what, stream)
    if data is not None and isinstance(data.x, inputs.Streamed):
        return Data(dataclasses.replace(data.x, dtype=dtype, workers=workers), data.y)
    if data is None or not any(v.is_floating_point() and v.dtype != dtype for v in inputs.leaves(data.x)):
        return data
    return Data(inputs.move(data.x, "cpu", dtype), data.y)


def _check_fits(model: nn.Module, state: P.State, data: Data, what: str, num_classes: int,
                output: Output | None = None) -> bool:
    """DataError unless the model maps one example of `data` to (1, K) logits with K ≥ classes
    (read by :func:`~genprobe.logits.logits_of`); whether the model's return value is something
    else than the logits tensor (so the Subject's copy must be made to return them)."""
    try:
        with torch.no_grad():
            out = inputs.call(model, inputs.take(data.x, slice(0, 1)), state)
    except Exception as exc:  # noqa: BLE001 - any failure here means: the inputs do not fit
        first = one_line(exc)
        shape = (f"of shape {tuple(data.x.shape[1:])} (dtype {data.x.dtype})" if isinstance(data.x, Tensor)
                 else inputs.describe(data.x))
        raise DataError(f"{what}: inputs {shape} do not fit the model: {first}") from None
    if getattr(type(model), "_genprobe_returns_logits", False):
        logits, adapted = out, False
    else:
        try:
            logits, adapted = logits_of(out, output), output is not None or not isinstance(out, Tensor)
        except StateError as exc:
            raise DataError(f"on one {what} example, {exc}") from None
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        raise DataError(f"the model must return logits of shape (N, K); on one {what} example it "
                        f"returned {describe(out)}" + (f", and the logits read from it are "
                                                       f"{describe(logits)}" if adapted else ""))
    out = logits
    if out.shape[1] < num_classes:
        raise DataError(f"the model gives {out.shape[1]} outputs but the labels have {num_classes} "
                        "classes; pass data whose labels the model can predict")
    return adapted

