"""Subject: the network under study — architecture, named states, and data.

Probes take a Subject and never mutate anything in it. The model is copied once, at
construction, and kept in eval mode; states live on the CPU and are moved to the compute
device by the code that evaluates them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from . import params as P
from .errors import DataError, StateError
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
    """

    model: nn.Module
    init: Mapping[str, Tensor] | None = None
    final: Mapping[str, Tensor] | None = None
    checkpoints: Mapping[int, Mapping[str, Tensor]] = field(default_factory=dict)
    train: Any = None
    test: Any = None
    num_classes: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise StateError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        self.model = copy.deepcopy(self.model).cpu().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        model = self.model
        self.final = P.canonical_state(model, self.final if self.final is not None else model.state_dict(), "final")
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
        self.train = as_data(self.train, "train")
        self.test = as_data(self.test, "test")
        if self.num_classes is None:
            labels = [d.y for d in (self.train, self.test) if d is not None]
            self.num_classes = int(max(int(y.max()) for y in labels)) + 1 if labels else None
        self._order: list[str] | None = None

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
                    example = d.x[:1]
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
        from .store import load_subject

        return load_subject(run_dir, data_dir=data_dir)
