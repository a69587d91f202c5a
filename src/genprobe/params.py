"""States, module units, and the state operations every probe uses.

A *state* is a flat ``dict[str, Tensor]`` keyed like ``model.named_parameters()`` followed by
the persistent ``model.named_buffers()`` — what ``state_dict()`` holds, tied tensors once under
their first name. A non-persistent buffer (``register_buffer(..., persistent=False)``, e.g. a
transformer's position ids) is the model's own: never required of the user, never rewound or
saved; every forward uses the model's value. States are never mutated in place: every operation
here returns a new dict that shares the untouched tensors.

A *unit* is the thing a probe edits and reports on: a named set of parameter keys. By default
every module that owns parameters directly is one unit, in forward order. Users select units
with ``fnmatch`` patterns, or group modules into one unit (a residual block, a transformer
layer) with a ``{name: pattern(s)}`` mapping.

Buffer policy (BatchNorm running statistics): buffers are statistics of data flowing through
the trained network, not parameters, so by default (``buffers="keep"``) every edit leaves all
buffers at their values in the base state (normally θ^F). With ``buffers="follow"`` a unit's
own floating-point buffers move with its parameters (rewound to the checkpoint, interpolated,
or reset on re-randomization). Integer buffers (``num_batches_tracked``) always stay.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import fnmatch
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode

from .device import rng_devices
from .errors import ConfigError, ModuleSelectionError, StateError, check_choice
from .inputs import Inputs, call
from .seeds import derive_seed

State = dict[str, Tensor]
BufferPolicy = Literal["keep", "follow"]
BUFFER_POLICIES = ("keep", "follow")


@dataclass(frozen=True)
class Unit:
    """A named group of modules edited together.

    ``modules`` are module names (as in ``named_modules()``); ``params`` and ``buffers`` the state
    keys those modules own (a group owns its modules' whole subtrees).
    """

    name: str
    modules: tuple[str, ...]
    params: tuple[str, ...]
    buffers: tuple[str, ...] = ()

    def keys(self, buffers: BufferPolicy = "keep") -> tuple[str, ...]:
        """The state keys an edit of this unit touches under the buffer policy."""
        check_choice("buffers", buffers, BUFFER_POLICIES)
        return self.params + (self.buffers if buffers == "follow" else ())


# ----------------------------------------------------------------------------- states


def state_of(model: nn.Module) -> State:
    """The model's current parameters and persistent buffers, detached, as a new state (tied
    tensors once)."""
    params, buffers = state_keys(model)
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    return {k: own[k].detach().clone() for k in params + buffers}


def state_keys(model: nn.Module) -> tuple[list[str], list[str]]:
    """(parameter names, persistent buffer names) of the model, tied tensors once."""
    persistent = set(model.state_dict(keep_vars=True))
    return ([k for k, _ in model.named_parameters()],
            [k for k, _ in model.named_buffers() if k in persistent])


def canonical_state(model: nn.Module, state: Mapping[str, Tensor], what: str = "state") -> State:
    """Check `state` against the model and return it restricted to the canonical keys.

    Accepts a plain ``state_dict()`` (which lists tied tensors under every name). Raises
    StateError naming the first missing key, unexpected key or shape mismatch.
    """
    if not isinstance(state, Mapping):
        raise StateError(f"{what} must be a dict of tensors (a state_dict), got {type(state).__name__}")
    params, buffers = state_keys(model)
    reference = dict(model.named_parameters()) | dict(model.named_buffers())
    aliases = set(model.state_dict().keys())
    missing = [k for k in params + buffers if k not in state]
    if missing:
        raise StateError(f"{what} is missing key {missing[0]!r} ({len(missing)} missing in all); "
                         "pass a state_dict of this model")
    unexpected = [k for k in state if k not in aliases]
    if unexpected:
        raise StateError(f"{what} has unexpected key {unexpected[0]!r} ({len(unexpected)} in all); "
                         "is it a state_dict of a different model?")
    out: State = {}
    for k in params + buffers:
        value = state[k]
        if not isinstance(value, Tensor):
            raise StateError(f"{what}[{k!r}] is a {type(value).__name__}, not a tensor")
        if value.shape != reference[k].shape:
            raise StateError(f"{what}[{k!r}] has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(reference[k].shape)}")
        out[k] = value.detach().to("cpu", copy=False)
    return out


def split_state(model: nn.Module, state: State) -> tuple[State, State]:
    """(params, buffers) parts of a state, for ``torch.func.functional_call``."""
    params, buffers = state_keys(model)
    return {k: state[k] for k in params}, {k: state[k] for k in buffers}


# ----------------------------------------------------------------------------- units


def forward_order(model: nn.Module, example: Inputs | None) -> list[str]:
    """Module names in forward order on `example` (one input, batch 1).

    A module's position is the earlier of its first call (a forward pre-hook) and the first use
    of a parameter it owns directly as an argument of any torch function (a
    ``TorchFunctionMode``), on one shared clock. The second catches modules whose parameters
    their parent uses without calling them: ``nn.MultiheadAttention`` passes ``out_proj.weight``
    straight to ``F.multi_head_attention_forward``, so ``out_proj`` comes right after the
    attention, not after the model's head. A tied parameter belongs to its first owner (as in
    the state). Modules neither called nor used keep their registration order, after the others.

    Without an example, registration order (which is forward order for most models). A model
    whose forward fails under the mode is traced again with the pre-hooks alone, and one whose
    forward fails outright gets registration order. The model is run in eval mode under
    ``torch.no_grad()``; every module's training flag is restored and the hooks and the mode
    are removed, also when the forward raises.
    """
    names = [n for n, _ in model.named_modules()]
    if example is None:
        return names
    owner = {id(p): k.rpartition(".")[0] for k, p in model.named_parameters()}
    for watch_parameters in (True, False):
        first = _trace_first_uses(model, example, owner if watch_parameters else {})
        if first is not None:
            return sorted(first, key=first.__getitem__) + [n for n in names if n not in first]
    return names


class _ParameterUses(TorchFunctionMode):
    """Calls ``saw(owner[id(t)])`` for every watched tensor ``t`` among a torch function's arguments."""

    def __init__(self, owner: Mapping[int, str], saw) -> None:
        super().__init__()
        self.owner = owner
        self.saw = saw

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _tensors((args, kwargs)):
            name = self.owner.get(id(t))
            if name is not None:
                self.saw(name)
        return func(*args, **kwargs)


def _tensors(obj):
    """The tensors in nested tuples, lists and dicts (a torch function's arguments), in order."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _trace_first_uses(model: nn.Module, example: Inputs, owner: Mapping[int, str]) -> dict[str, int] | None:
    """{module name: clock at its first call or first use of a parameter in `owner`}; None if
    the forward raises. Watches no parameters (pre-hooks only) when `owner` is empty."""
    clock = itertools.count()
    first: dict[str, int] = {}

    def saw(name: str) -> None:
        if name not in first:
            first[name] = next(clock)

    hooks = [module.register_forward_pre_hook(lambda mod, args, name=name: saw(name))
             for name, module in model.named_modules()]
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), (_ParameterUses(owner, saw) if owner else contextlib.nullcontext()):
            call(model, example)
    except Exception:  # an odd model: let the caller fall back rather than fail
        return None
    finally:
        for h in hooks:
            h.remove()
        for module, training in flags:
            module.training = training
    return first


def _direct_keys(model: nn.Module, prefix: str, module: nn.Module, canonical: set[str]):
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    params = tuple(join(n) for n, _ in module.named_parameters(recurse=False) if join(n) in canonical)
    buffers = tuple(join(n) for n, b in module.named_buffers(recurse=False)
                    if join(n) in canonical and b.is_floating_point())
    return params, buffers


def default_units(model: nn.Module, order: Sequence[str] | None = None) -> list[Unit]:
    """Every module that owns parameters directly, one unit each, in `order` (module names)."""
    param_names, buffer_names = state_keys(model)
    canonical = set(param_names) | set(buffer_names)
    modules = dict(model.named_modules())
    units = []
    for name in order or list(modules):
        if name not in modules:
            continue
        params, buffers = _direct_keys(model, name, modules[name], canonical)
        if params:
            units.append(Unit(name or "(root)", (name,), params, buffers))
    return units


def select_units(
    model: nn.Module,
    modules: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None,
    order: Sequence[str] | None = None,
) -> list[Unit]:
    """Resolve a user's module selection to units.

    - ``None``: the default units.
    - a pattern or list of patterns: the default units whose module name matches any of them
      (``fnmatch``: ``"features.*"``, ``"*conv*"``), each its own unit.
    - a mapping ``{group_name: pattern(s)}``: one unit per group, owning every parameter in the
      subtrees of the modules its patterns match (``{"block1": "layer1.0"}``).

    Raises ModuleSelectionError, listing the available names, when a pattern matches nothing
    or when two units would share a parameter.
    """
    _check_selection(modules)
    units = default_units(model, order)
    if modules is None:
        return units
    available = ", ".join(u.name for u in units)
    if isinstance(modules, Mapping):
        param_names, buffer_names = state_keys(model)
        canonical = set(param_names) | set(buffer_names)
        rank = {n: i for i, n in enumerate(order or [n for n, _ in model.named_modules()])}
        all_modules = dict(model.named_modules())
        groups = []
        for group, patterns in modules.items():
            patterns = [patterns] if isinstance(patterns, str) else list(patterns)
            matched = [n for n in all_modules if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
            if not matched:
                raise ModuleSelectionError(
                    f"group {group!r}: pattern(s) {patterns} match no module; modules with "
                    f"parameters: {available}")
            params: list[str] = []
            buffers: list[str] = []
            for n in matched:
                for sub, mod in all_modules[n].named_modules(prefix=n):
                    p, b = _direct_keys(model, sub, mod, canonical)
                    params += [k for k in p if k not in params]
                    buffers += [k for k in b if k not in buffers]
            if not params:
                raise ModuleSelectionError(f"group {group!r} matches modules {matched} that own no parameters")
            first = min(rank.get(sub, len(rank)) for n in matched for sub, _ in all_modules[n].named_modules(prefix=n))
            groups.append((first,
                           Unit(str(group), tuple(matched), tuple(params), tuple(buffers))))
        selected = [u for _, u in sorted(groups, key=lambda t: t[0])]
    else:
        patterns = [modules] if isinstance(modules, str) else list(modules)
        if not patterns:
            raise ModuleSelectionError(f"empty module selection; modules with parameters: {available}")
        for p in patterns:
            if not any(fnmatch.fnmatchcase(u.name, p) for u in units):
                raise ModuleSelectionError(
                    f"module pattern {p!r} matches no module with parameters; available: {available}")
        selected = [u for u in units if any(fnmatch.fnmatchcase(u.name, p) for p in patterns)]
    owner: dict[str, str] = {}
    for u in selected:
        for k in u.params:
            if k in owner:
                raise ModuleSelectionError(
                    f"parameter {k!r} is in both unit {owner[k]!r} and unit {u.name!r}; groups must not overlap")
            owner[k] = u.name
    return selected


_ACCEPTED = ("None, an fnmatch pattern (str), a list of patterns, or a mapping "
             "{unit name: pattern or list of patterns}")


def _check_selection(modules) -> None:
    """ModuleSelectionError naming the bad value unless `modules` has an accepted form."""
    if modules is None or isinstance(modules, str):
        return
    if isinstance(modules, Mapping):
        for group, patterns in modules.items():
            if not isinstance(group, str) or not group:
                raise ModuleSelectionError(f"modules: unit name {group!r} must be a non-empty string; "
                                           f"modules accepts {_ACCEPTED}")
            items = [patterns] if isinstance(patterns, str) else patterns
            if not isinstance(items, (list, tuple, set, frozenset)) or not items \
                    or not all(isinstance(p, str) for p in items):
                raise ModuleSelectionError(f"modules: group {group!r} has pattern(s) {patterns!r}, not a "
                                           f"pattern or a non-empty list of patterns; modules accepts {_ACCEPTED}")
        return
    if not isinstance(modules, (list, tuple, set, frozenset)):
        raise ModuleSelectionError(f"modules={modules!r} ({type(modules).__name__}) is not a module "
                                   f"selection; modules accepts {_ACCEPTED}")
    bad = [p for p in modules if not isinstance(p, str)]
    if bad:
        raise ModuleSelectionError(f"modules: pattern {bad[0]!r} ({type(bad[0]).__name__}) is not a string; "
                                   f"modules accepts {_ACCEPTED}")


# ----------------------------------------------------------------------------- operations


def replace(base: State, source: State, keys: Sequence[str]) -> State:
    """`base` with the tensors at `keys` taken from `source` (re-initialization to a checkpoint)."""
    out = dict(base)
    for k in keys:
        out[k] = source[k]
    return out


def interpolate(start: State, end: State, alpha: float, keys: Sequence[str], base: State | None = None) -> State:
    """``base`` with ``keys`` at ``(1 - alpha) * start + alpha * end``; ``base`` defaults to `end`.

    Integer tensors are never interpolated (they keep the base's value).
    """
    out = dict(end if base is None else base)
    for k in keys:
        if start[k].is_floating_point():
            out[k] = torch.lerp(start[k], end[k], float(alpha))
    return out


def distance(a: State, b: State, keys: Sequence[str]) -> float:
    """Frobenius norm ‖a − b‖ over `keys` (all tensors of a unit taken together)."""
    total = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    return total ** 0.5


def norm(a: State, keys: Sequence[str]) -> float:
    """Frobenius norm ‖a‖ over `keys`."""
    return sum(float(a[k].double().pow(2).sum()) for k in keys) ** 0.5


def reset_module(module: nn.Module) -> None:
    """PyTorch's own re-initialization of `module`: ``reset_parameters()``, or
    ``_reset_parameters()`` for MultiheadAttention. StateError for a module with neither."""
    for method in ("reset_parameters", "_reset_parameters"):  # MultiheadAttention has the latter
        if hasattr(module, method):
            getattr(module, method)()
            return
    raise StateError(f"{type(module).__name__} has no reset_parameters()")


def rerandomize_seed(seed: int, unit: str, draw: int = 0) -> int:
    """The torch seed of re-randomization draw `draw` of the unit named `unit` under `seed`:
    :func:`genprobe.seeds.derive_seed` of (`seed`, `unit`, `draw`). Every (seed, unit, draw)
    gets a stream of its own, so re-randomizing never replays the stream a model was built under
    after ``torch.manual_seed(seed)`` (which would reproduce θ⁰), and two units of the same shape
    never get the same draw. ConfigError unless `seed` and `draw` are integers ≥ 0.
    """
    if isinstance(draw, bool) or not isinstance(draw, (int, np.integer)) or draw < 0:
        raise ConfigError(f"draw must be an integer >= 0, got {draw!r}")
    return derive_seed(seed, unit, int(draw))


def rerandomize(model: nn.Module, base: State, unit: Unit, seed: int,
                buffers: BufferPolicy = "keep", *, draw: int = 0) -> State:
    """`base` with `unit`'s parameters replaced by a fresh draw from their init distribution.

    The draw uses the model's own initializer: ``model.init_module(module)`` when the model
    defines it (every genprobe zoo model does, so σ_w / NTK-parameterization inits are honoured),
    otherwise each module's ``reset_parameters()`` (``_reset_parameters()`` for attention). The
    draw is made on copies of the unit's modules under a forked RNG seeded with
    :func:`rerandomize_seed` of (`seed`, the unit's name, `draw`): the same three give the same
    draw, and the caller's model and global RNG are untouched. Draws ``0, 1, ...`` of one seed
    are independent samples.
    """
    check_choice("buffers", buffers, BUFFER_POLICIES)
    modules = dict(model.named_modules())
    init_module = getattr(model, "init_module", None)
    out = dict(base)
    owned = set(unit.keys(buffers))
    torch_seed = rerandomize_seed(seed, unit.name, draw)
    with torch.random.fork_rng(devices=rng_devices()):  # manual_seed also seeds CUDA
        torch.manual_seed(torch_seed)
        for name in unit.modules:
            for sub, mod in modules[name].named_modules(prefix=name):
                join = (lambda n, s=sub: f"{s}.{n}") if sub else (lambda n: n)
                direct = [join(n) for n, _ in mod.named_parameters(recurse=False)]
                if not any(k in owned for k in direct):
                    continue
                fresh = copy.deepcopy(mod)
                reset = init_module or reset_module
                try:
                    reset(fresh)
                except StateError as exc:
                    raise StateError(f"cannot re-randomize module {sub!r}: {exc}; define "
                                     "init_module(module) on the model") from None
                if buffers == "follow" and hasattr(fresh, "reset_running_stats"):
                    fresh.reset_running_stats()
                for n, t in list(fresh.named_parameters(recurse=False)) + list(fresh.named_buffers(recurse=False)):
                    if join(n) in owned:
                        out[join(n)] = t.detach().to(base[join(n)].device)
    return out


# ----------------------------------------------------------------------------- activation sites


ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.Softplus, nn.ReLU6,
    nn.Hardtanh, nn.Mish)
"""The module types whose outputs are a network's activations (post-nonlinearity: the units of
the single-direction probes). ``nn.ReLU6`` is a ``nn.Hardtanh``; subclasses count too. So does a
parameterless module whose class name ends in ``Activation`` (Hugging Face's ``GELUActivation``,
``NewGELUActivation``, ... in its transformer blocks' MLPs): see :func:`is_activation`."""


def is_activation(module: nn.Module) -> bool:
    """Whether `module`'s output is an activation (see :data:`ACTIVATION_MODULES`)."""
    return isinstance(module, ACTIVATION_MODULES) or (
        type(module).__name__.endswith("Activation")
        and next(module.parameters(recurse=True), None) is None)


def select_sites(model: nn.Module, layers: str | Sequence[str] | None,
                 order: Sequence[str] | None = None, *, example: Inputs | None = None,
                 functional: Sequence[str] = ()) -> list[str]:
    """Names of the sites whose output a single-direction probe ablates: modules, and the
    `functional` sites (activation functions the forward calls itself, found by
    :func:`genprobe.engine.sites.discover`: ``"relu(fc1)"``).

    - ``None``: every activation module (:func:`is_activation`) that the forward calls, and
      every functional site. Which modules are called is seen on `example` (one input batch;
      forward pre-hooks) when given, else from a ``torch.fx`` trace of the model (modules
      without children as leaves); a model that neither runs nor traces keeps all its
      activation modules.
    - a pattern or list of ``fnmatch`` patterns: every module or functional site whose name
      matches one (any module, parameterless ones included: ``"*relu*"``, ``"stages.*.act2"``,
      ``"relu(*)"``).

    Names come in `order` (module names, e.g. ``Subject.forward_order()``; names not in it
    last, in registration order), each once. A module used at two call sites (one ``nn.ReLU``
    applied twice) is one site: an edit of its output applies at both calls. Raises
    ModuleSelectionError for a pattern that matches nothing (naming the closest names)
    or a value of another type.
    """
    names = [n for n, _ in model.named_modules() if n] + list(functional)
    modules = dict(model.named_modules())
    rank = {n: i for i, n in enumerate(order or ())}
    registration = {n: i for i, n in enumerate(names)}

    def ordered(selected) -> list[str]:
        return sorted(dict.fromkeys(selected), key=lambda n: (n not in rank, rank.get(n, 0),
                                                                registration[n]))

    how = "list them with gp.units(subject) or `genprobe units RUN`"
    if layers is None:
        acts = [n for n in names if n in modules and is_activation(modules[n])]
        called = _called_modules(model, example) if acts else None
        return ordered([n for n in acts if called is None or n in called] + list(functional))
    if isinstance(layers, str):
        patterns = [layers]
    elif isinstance(layers, (list, tuple)) and all(isinstance(p, str) for p in layers):
        patterns = list(layers)
    else:
        raise ModuleSelectionError(f"layers={layers!r} ({type(layers).__name__}) is not a site "
                                   "selection; use None, an fnmatch pattern (str) or a list of "
                                   f"patterns over module names ({how})")
    if not patterns:
        raise ModuleSelectionError(f"layers is an empty list; use None for every activation "
                                   f"module, or patterns over module names ({how})")
    selected = []
    for p in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, p)]
        if not hits:
            close = difflib.get_close_matches(p, names, n=5, cutoff=0.5)
            hint = f"closest names: {', '.join(close)}" if close else "no close name"
            raise ModuleSelectionError(f"layer pattern {p!r} matches no module or site ({hint}); {how}")
        selected += hits
    return ordered(selected)


def _called_modules(model: nn.Module, example: Inputs | None) -> set[str] | None:
    """Names of the modules the forward calls (None: cannot tell)."""
    if example is not None:
        first = _trace_first_uses(model, example, {})
        return None if first is None else set(first)

    class _Leaves(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return next(m.children(), None) is None

    try:
        graph = _Leaves().trace(model)
    except Exception:  # data-dependent control flow, odd inputs: cannot tell
        return None
    return {n.target for n in graph.nodes if n.op == "call_module"}
