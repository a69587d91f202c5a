"""Per-unit statistics of module outputs, streamed over a data set (single-direction probes).

A *unit* (Morcos et al. 2018) is one feature of a module's output along its unit dim: the dim the
producing layer's weights index (:func:`genprobe.engine.sites.discover` finds it: a feature of a
linear output (N, C), a hidden neuron of a transformer MLP (N, T, C) or of a channels-last
ConvNeXt MLP (N, H, W, C) (the last dim), a channel of a conv output (N, C, H, W) or (N, C, L)
(dim 1)); where no such layer is known, :func:`unit_dim` decides from the shape. The *per-example
activation* of a unit is its mean over the other positions (pixels of a feature map, tokens of a
sequence); for a linear output it is the activation itself.

Usage::

    from genprobe.engine.activations import activation_stats, unit_dim

    stats = activation_stats(subject.model, subject.final, subject.train, ["relu1", "relu2"],
                             num_classes=10)
    s = stats["relu1"]
    s.mean, s.var            # (C,) per-example activation: mean, variance (ddof 0)
    s.class_means            # (K, C) class-conditional means (for class selectivity)
    s.element_mean           # (C,) mean over examples and positions (mean-ablation value)

One pass over the data with forward hooks on a private eval-mode copy of the model (the
caller's model is never touched); per chunk only (chunk, C) values are kept, merged into
running float64 sums (Chan et al.'s pairwise update for the variance), so memory does not grow
with the number of examples.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import inputs
from ..device import resolve_device
from ..errors import ConfigError, ModuleSelectionError, StateError
from ..evaluate import (
    DEFAULT_BATCH_SIZE,
    cpu_chunk,
    input_dtype,
    largest_activation_bytes,
)
from ..options import check_int
from ..params import state_keys
from ..values import Data
from .sites import hooked, is_functional


def unit_dim(h: Tensor | tuple[int, ...]) -> int:
    """The dim of `h` (n, ...), a tensor or its shape, that indexes units: 1 for a 4-D conv map
    (n, C, H, W), else the last dim ((n, C) → 1, (n, T, C) → 2). ConfigError for fewer than 2
    dims (no unit dim)."""
    shape = tuple(h.shape) if isinstance(h, Tensor) else tuple(h)
    if len(shape) < 2:
        raise ConfigError(f"an output of shape {shape} has no unit dim: units need "
                          "(n, C), (n, T, C) or (n, C, H, W)")
    return 1 if len(shape) == 4 else len(shape) - 1


def per_example_activation(h: Tensor, dim: int | None = None) -> Tensor:
    """(n, C) float64: each unit's activation per example, the mean over the other positions."""
    dim = unit_dim(h) if dim is None else dim % h.dim()
    h = h.double().movedim(dim, 1)
    return h.reshape(h.shape[0], h.shape[1], -1).mean(dim=2)


@dataclass(frozen=True)
class UnitStats:
    """Statistics of one module's units over a data set, float64 (C units, K classes).

    Attributes:
        units: C, the number of units (the size of the output's unit dim).
        dim: the unit dim of the output (:func:`unit_dim`).
        mean: (C,) mean over examples of each unit's per-example activation.
        var: (C,) variance (ddof 0) over examples of the per-example activation.
        class_means: (K, C) mean per-example activation over the examples of each class (NaN
            for a class with no examples).
        class_counts: (K,) examples per class (observations: see ``calls``).
        min: (C,) smallest activation value over examples and positions (negative activations).
        element_mean: (C,) mean over examples and positions (for a conv channel: its mean
            activation value), the value of mean-ablation of a whole feature map.
        count: N, the number of observations (examples × calls).
        calls: times the module is called per forward. A module called at several call sites
            has each call's output counted as one more observation of every example.
    """

    units: int
    dim: int
    mean: Tensor
    var: Tensor
    class_means: Tensor
    class_counts: Tensor
    min: Tensor
    element_mean: Tensor
    count: int
    calls: int = 1


class _Running:
    """Streaming sums for one module's units."""

    def __init__(self, c: int, dim: int, k: int):
        self.c, self.dim, self.k = c, dim, k
        z = torch.zeros(c, dtype=torch.float64)
        self.n = 0
        self.mean, self.m2 = z.clone(), z.clone()
        self.class_sums = torch.zeros(k, c, dtype=torch.float64)
        self.class_counts = torch.zeros(k, dtype=torch.float64)
        self.min = torch.full((c,), float("inf"), dtype=torch.float64)
        self.element_sum, self.elements = z.clone(), 0
        self.calls = 0

    def add(self, h: Tensor, y: Tensor) -> None:
        a = per_example_activation(h, self.dim).cpu()        # (n, C)
        n_b = a.shape[0]
        if n_b == 0:
            return
        mean_b = a.mean(dim=0)
        m2_b = (a - mean_b).square().sum(dim=0)
        n = self.n
        total = n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta.square() * (n * n_b / total)
        self.n = total
        self.class_sums.index_add_(0, y.cpu(), a)
        self.class_counts.index_add_(0, y.cpu(), torch.ones(n_b, dtype=torch.float64))
        flat = h.detach().movedim(self.dim, 0).reshape(self.c, -1)   # (C, n · positions)
        self.min = torch.minimum(self.min, flat.amin(dim=1).double().cpu())
        self.element_sum += flat.double().sum(dim=1).cpu()
        self.elements += flat.shape[1]

    def result(self, examples: int) -> UnitStats:
        n = max(self.n, 1)
        return UnitStats(
            units=self.c, dim=self.dim, mean=self.mean, var=self.m2 / n,
            class_means=self.class_sums / self.class_counts.unsqueeze(1),
            class_counts=self.class_counts, min=self.min,
            element_mean=self.element_sum / max(self.elements, 1), count=self.n,
            calls=self.n // max(examples, 1) if examples else 0)


@torch.no_grad()
def activation_stats(model: nn.Module, state: Mapping[str, Tensor], data: Data,
                     modules: Sequence[str], *, num_classes: int, batch_size: int | None = None,
                     device: str | torch.device = "auto",
                     dims: Mapping[str, int] | None = None) -> dict[str, UnitStats]:
    """:class:`UnitStats` of each of `modules`' outputs over `data`, under `state`, in one pass.

    `state`: canonical keys (``Subject.final``); `data`: ``(x, y)`` with floating inputs (cast
    to the state's dtype) or integer token ids; `modules`: sites, module names or functional
    sites (:mod:`genprobe.engine.sites`; e.g. from :func:`genprobe.params.select_sites`);
    `num_classes`: K, for the class-conditional means; `dims`: each site's unit dim where known
    (``discover(..., dims=)`` finds them; else :func:`unit_dim` of the output). Hooks a private
    eval-mode copy of the model; returns {site: UnitStats} in the order of `modules`.
    """
    modules = list(dict.fromkeys(modules))
    named = dict(model.named_modules())
    unknown = [m for m in modules if m not in named and not is_functional(m)]
    if unknown:
        raise ModuleSelectionError(f"activation_stats: unknown module {unknown[0]!r}; list the "
                                   "names with [n for n, _ in model.named_modules()]")
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    check_int("batch_size", batch_size, 1, optional=True)
    if len(data.y) and (int(data.y.min()) < 0 or int(data.y.max()) >= num_classes):
        raise ConfigError(f"labels must lie in [0, {num_classes}); got "
                          f"[{int(data.y.min())}, {int(data.y.max())}]")
    dev = resolve_device(device)
    private = copy.deepcopy(model)
    keys = [k for group in state_keys(private) for k in group]
    missing = [k for k in keys if k not in state]
    if missing:
        raise StateError(f"state is missing key {missing[0]!r}; pass a canonical state "
                         "(Subject.final or genprobe.params.canonical_state)")
    private.load_state_dict({k: state[k].detach() for k in keys}, strict=False)
    private.to(dev).eval()
    dtype = input_dtype({k: state[k] for k in keys})
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE
        if dev.type == "cpu" and len(data):
            batch_size = cpu_chunk(largest_activation_bytes(
                private, inputs.clone(inputs.move(inputs.take(data.x, slice(0, 2)), dev, dtype))))

    running: dict[str, _Running] = {}
    current: dict[str, Tensor] = {}

    def hook(name):
        def record(out):
            if not isinstance(out, Tensor):
                raise ConfigError(f"module {name!r} returns a {type(out).__name__}, not a tensor: "
                                  "it has no units")
            d = dims[name] % out.dim() if dims and name in dims else unit_dim(out)
            if name not in running:
                running[name] = _Running(out.shape[d], d, int(num_classes))
            r = running[name]
            if out.shape[d] != r.c or d != r.dim:
                raise ConfigError(f"module {name!r} is called with outputs of different unit "
                                  f"counts ({r.c} and {out.shape[d]})")
            r.add(out, current["y"])
        return record

    with hooked(private, {m: hook(m) for m in modules}):
        for start in range(0, len(data), batch_size):
            current["y"] = data.y[start:start + batch_size].long()
            x = inputs.move(inputs.take(data.x, slice(start, start + batch_size)), dev, dtype)
            if inputs.shares(x, data.x):
                x = inputs.clone(x)   # never hand the caller's data to a forward that may write it
            inputs.call(private, x)
    not_called = [m for m in modules if m not in running]
    if not_called:
        raise ModuleSelectionError(f"module {not_called[0]!r} is never called in the forward: "
                                   "it has no activations")
    return {m: running[m].result(len(data)) for m in modules}
