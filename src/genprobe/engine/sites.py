"""Sites: where the single-direction probes read and edit activations.

A site is a module's output (named by the module: ``"layers.1"``) or the output of an activation
function that a forward calls itself rather than through a module — ``F.relu(self.fc1(x))``,
``x.relu()``, ``torch.tanh(h)``, a transformer layer's ``activation=F.gelu``: a *functional
site*. A functional site is named by the function and what it was applied to:

- ``relu(fc1)``: relu of the output of module ``fc1``;
- ``relu@block1``: relu of something else (a sum, a slice), called in module ``block1``'s
  forward (``relu@forward``: in the model's own forward);
- ``#2``, ``#3`` ... appended when the same name comes again in one forward pass.

Calls inside an activation module (``nn.ReLU`` calls ``F.relu``) belong to the module's site,
not to a functional one. Functional sites are found by running the forward under a
``TorchFunctionMode`` that sees every torch function call (no tracing, so models ``torch.fx``
cannot trace have them too); the mode is active only while functional sites are read or edited.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .. import inputs
from ..params import is_activation

FUNCTIONS: dict[Callable, str] = {
    F.relu: "relu", torch.relu: "relu", Tensor.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
    Tensor.relu_: "relu", F.relu6: "relu6", F.leaky_relu: "leaky_relu", F.elu: "elu", F.selu: "selu",
    F.celu: "celu", F.gelu: "gelu", F.silu: "silu", F.mish: "mish", F.softplus: "softplus",
    F.hardswish: "hardswish", F.hardtanh: "hardtanh", torch.tanh: "tanh", Tensor.tanh: "tanh",
    F.tanh: "tanh", torch.sigmoid: "sigmoid", Tensor.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
}
"""Activation functions whose calls are functional sites, with the name a site takes."""

Hook = Callable[[Tensor], "Tensor | None"]
"""Called with a site's output; a tensor it returns replaces the output (None: unchanged)."""


def is_functional(site: str) -> bool:
    """Whether `site` names a functional site (module names hold neither ``(``, ``@`` nor ``#``)."""
    return any(c in site for c in "(@#")


class _Calls(TorchFunctionMode):
    """Names each activation-function call of a forward (see the module docstring) and passes
    its output to ``on_call(name, output)``, whose non-None return replaces the output."""

    def __init__(self, model: nn.Module, on_call: Callable[[str, Tensor], Tensor | None]):
        super().__init__()
        self.on_call = on_call
        self.stack: list[tuple[str, bool]] = []  # (module name, is an activation module)
        self.produced: dict[int, tuple[weakref.ref, str]] = {}
        self.counts: Counter[str] = Counter()
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name, is_activation(module))))
            self.handles.append(module.register_forward_hook(self._leave(name)))

    def _enter(self, name: str, activation: bool):
        def hook(module, args):
            if not self.stack:  # a new forward pass: names count from one again
                self.counts.clear()
                self.produced.clear()
            self.stack.append((name, activation))
        return hook

    def _leave(self, name: str):
        def hook(module, args, out):
            if self.stack:
                self.stack.pop()
            if isinstance(out, Tensor) and name:
                self.produced[id(out)] = (weakref.ref(out), name)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = FUNCTIONS.get(func)
        if kind is None or not isinstance(out, Tensor) or any(act for _, act in self.stack):
            return out
        source = args[0] if args else None
        ref, producer = self.produced.get(id(source), (None, None))
        if producer is not None and ref() is source:
            name = f"{kind}({producer})"
        else:
            where = self.stack[-1][0] if self.stack else ""
            name = f"{kind}@{where or 'forward'}"
        self.counts[name] += 1
        if self.counts[name] > 1:
            name = f"{name}#{self.counts[name]}"
        replaced = self.on_call(name, out)
        return out if replaced is None else replaced


@contextlib.contextmanager
def hooked(model: nn.Module, hooks: Mapping[str, Hook]) -> Iterator[None]:
    """Within the block, the output of each site in `hooks` passes through its hook: module sites
    by forward hooks, functional sites through a :class:`TorchFunctionMode` (entered only when
    one is asked for). Everything is removed on exit, also when the forward raised."""
    modules = dict(model.named_modules())
    handles = [modules[site].register_forward_hook(lambda mod, args, out, fn=fn: fn(out))
               for site, fn in hooks.items() if not is_functional(site)]
    functional = {site: fn for site, fn in hooks.items() if is_functional(site)}
    calls = _Calls(model, lambda name, out: functional[name](out) if name in functional else None) \
        if functional else None
    try:
        if calls is None:
            yield
        else:
            with calls:
                yield
    finally:
        for h in handles:
            h.remove()
        if calls is not None:
            calls.remove()


FEATURES_LAST = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.RMSNorm, nn.Embedding, nn.EmbeddingBag)
"""Modules whose weights index the last dim of their output: a Linear on (n, H, W, C) or
(n, T, C) features (a ConvNeXt MLP, a transformer's)."""

FEATURES_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)
"""Modules whose weights index dim 1 of their output: convolutions, batch/instance/group norms."""

ELEMENTWISE = (nn.Dropout, nn.Identity)
"""Modules (besides activations) whose output keeps its input's layout."""


def weights_dim(module: nn.Module, out: Tensor) -> int | None:
    """The dim of `out` (n, ...) that `module`'s weights index: the one dim of the size of its
    features (a Linear's or convolution's outputs, a norm's channels); where several dims have
    that size, the last for :data:`FEATURES_LAST` (Linear, LayerNorm, ...) and 1 for
    :data:`FEATURES_FIRST` (convolutions, BatchNorm, ...); None for other modules."""
    default = (out.dim() - 1 if isinstance(module, FEATURES_LAST)
               else 1 if isinstance(module, FEATURES_FIRST) else None)
    if default is None or out.dim() < 2:
        return default
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() < 1:
        return default
    features = weight.shape[1] if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) else weight.shape[0]
    matches = [d for d in range(1, out.dim()) if out.shape[d] == features]
    return matches[0] if len(matches) == 1 else default


def unit_dim_of(shape: tuple[int, ...], dim: int | None) -> int:
    """The unit dim of an output of `shape` (n, ...): `dim`, the dim its producing layer's weights
    index (:func:`weights_dim`), where known; else 1 for a 4-D map (n, C, H, W) and the last
    dim otherwise."""
    if dim is not None:
        return dim
    return 1 if len(shape) == 4 else len(shape) - 1


@torch.no_grad()
def discover(model: nn.Module, x: inputs.Inputs, state: Mapping[str, Tensor] | None = None,
             *, dims: dict[str, int] | None = None) -> dict[str, object]:
    """Every site of one forward of `model` on inputs `x` (under `state` when given), in the
    order of first output: ``{site: output shape}`` (a tuple; the output's type name when it is
    not a tensor). Module sites are every called module but the model itself.

    `dims`, when given, is filled with each tensor site's unit dim (:func:`unit_dim_of`): the
    dim the weights of the layer that produced it index — followed through activations,
    dropout, containers and modules that keep their input's shape — so a channels-last
    ``Linear`` output (n, H, W, C) has its units last and a ``Conv1d`` output (n, C, L) at 1."""
    seen: dict[str, object] = {}
    found: dict[str, int | None] = {}  # site: the dim its producer's weights index
    produced: dict[int, tuple[weakref.ref, int | None]] = {}

    def dim_of(t) -> int | None:
        ref, dim = produced.get(id(t), (None, None))
        return dim if ref is not None and ref() is t else None

    def module_hook(name):
        def hook(mod, args, out):
            if not isinstance(out, Tensor):
                seen.setdefault(name, type(out).__name__)
                return
            source = args[0] if args and isinstance(args[0], Tensor) else None
            dim = weights_dim(mod, out)
            if dim is None and (is_activation(mod) or isinstance(mod, ELEMENTWISE)) and source is not None:
                dim = dim_of(source)
            elif dim is None:  # a container returning a child's output keeps the child's dim; a
                # module keeping its input's shape (a residual block, an activation of its own) the input's
                dim = dim_of(out)
                if dim is None and source is not None and source.shape == out.shape:
                    dim = dim_of(source)
            if dim_of(out) is None:
                produced[id(out)] = (weakref.ref(out), dim)
            seen.setdefault(name, tuple(out.shape))
            found.setdefault(name, dim)
        return hook

    def call_hook(name, out):
        if name not in seen:
            seen[name] = tuple(out.shape)
            base = name.split("#")[0]  # relu(fc1)#2: relu of fc1's output, the second time
            found[name] = found.get(base[base.index("(") + 1:-1]) if base.endswith(")") else None
        return None

    handles = [m.register_forward_hook(module_hook(n)) for n, m in model.named_modules() if n]
    calls = _Calls(model, call_hook)
    try:
        with calls:
            inputs.call(model, x, state)
    finally:
        for h in handles:
            h.remove()
        calls.remove()
    if dims is not None:
        dims.update({site: unit_dim_of(shape, found.get(site)) for site, shape in seen.items()
                     if isinstance(shape, tuple) and len(shape) >= 2})
    return seen
