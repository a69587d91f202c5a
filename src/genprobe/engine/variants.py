"""Evaluate many edited copies of one network on the same data, fast.

This is the shared engine of the rewinding / perturbing probes (layer robustness, module
criticality, ablation and noise curves). An *edit* is a change of the base network: new values
for some parameters (re-initialization, interpolation, noise) and/or a function applied to some
modules' output activations (unit masks, activation noise). :class:`VariantEvaluator` returns,
per edit, the mean cross-entropy and the 0–1 error over the data (optionally per-example values
and logits), equal to the naive evaluation (deep-copy the model, load the edited state dict, run
the whole forward) up to float rounding.

Usage::

    from genprobe.engine.variants import (Edit, VariantEvaluator, replace_edit, interpolate_edit,
                                          noise_edit, mask_edit, activation_noise_edit, stack_edits)

    ev = VariantEvaluator(subject.model, subject.final, subject.test)       # once
    unit = subject.units("fc2")[0]
    out = ev.evaluate([
        Edit(),                                                  # the base network itself
        replace_edit(unit, subject.init),                        # θ_i ← θ_i⁰
        interpolate_edit(unit, subject.init, subject.final, [0, .5, 1]),   # stacked: 3 variants
        noise_edit(unit, subject.final, sigma=0.1, draws=8, seed=0),      # stacked: 8 draws
        mask_edit("relu1", mask),                                # zero some units of relu1's output
    ], per_example=True)
    out[1].loss, out[1].error          # 0-d float64 tensors
    out[2].error                       # shape (3,): one per α
    out[3].losses                      # (8, N) per-example cross-entropy, per_example=True

Edits
-----
``Edit(params={key: tensor}, activations={module: fn}, args={name: tensor}, size=None)``:

- ``params``: state keys (canonical names, as in ``Subject.final``) → new values. All other keys
  keep the base state's values (bit-identical). Buffers may be edited too.
- ``activations``: module name → ``fn(h, ctx) -> h'`` applied to that module's output ``h``
  (shape (n, ...), a data chunk of n examples). ``ctx`` is an :class:`ActivationContext` with
  ``ctx.index`` (n,) the chunk's example indices into the data (for fixed per-example draws) and
  ``ctx.args`` this variant's slice of ``Edit.args``.
- ``size``: ``None`` for one variant; an int B for a *stack* of B variants: every ``params`` value
  then has shape (B, *param_shape) and every ``args`` value a leading dim B. Stacks are run
  through ``torch.func.vmap`` over the variant dim (falling back to a loop over variants, with a
  logged warning, when a module has no batching rule). Results then have a leading dim B.

Helpers build the common edits from :class:`genprobe.params.Unit`\\ s and states:
:func:`replace_edit`, :func:`interpolate_edit`, :func:`noise_edit`, :func:`mask_edit`,
:func:`activation_noise_edit`; :func:`stack_edits` concatenates edits of the same keys into one
stack. The engine skips variants whose parameters equal the base bit for bit (re-init to θ^F, a
module with θ^F = θ⁰) and returns the base result for them, and computes variants of a stack
that are bit-identical to each other once (a BatchNorm re-randomized to its θ⁰ of ones/zeros).

How it is fast
--------------
- Parameters are dicts applied with ``torch.func.functional_call``; the model is copied once
  (at construction, to a private eval-mode copy on the device), never per edit.
- Prefix reuse: when ``torch.fx`` can trace the model, the evaluator runs the traced graph node by
  node, caching every node's value for the base network on a data chunk; an edit recomputes only
  the nodes downstream of it — the call sites of modules owning an edited key (a module called
  twice has two call sites), ``get_attr`` reads of edited parameters, the outputs of masked
  modules, and every node that depends on those transitively (residual branches included).
  Modules given activation edits are made fx leaves so their outputs exist as graph nodes.
  When tracing fails (data-dependent control flow), or the traced graph disagrees with the
  model's own forward, the engine falls back to a full ``functional_call`` forward per edit and
  logs a warning naming the reason; ``ev.mode`` says which path is used (``"fx"``/``"full"``).
- Loop order: data chunk outer, edits inner; a chunk holds every cached node value, so the chunk
  size is chosen to keep the cache plus the largest stack of variants within ``memory_budget``
  bytes (stacks are split when needed). On the CPU it is also capped so that the largest single
  activation stays within ``evaluate.CPU_CHUNK_BYTES`` (cache-sized work, recycled memory).
- ``fast=True`` (default): conv nets run in channels-last layout (when the model's forward
  agrees); every recomputed Conv2d→BatchNorm2d pair whose BatchNorm the edit leaves untouched
  runs as one conv with the BatchNorm folded in (the conv's weights may be edited); and a
  recomputed ReLU or addition whose first operand is a freshly computed tensor with no other
  user overwrites it instead of allocating (not under vmap). All of these change results only
  by float rounding.
- BatchNorm runs in eval mode (running statistics are buffers of the state).

API summary (for probe authors)
-------------------------------
``VariantEvaluator(model, base_state, data, *, batch_size=None, device="auto",
memory_budget=None, use_fx=True, fast=True)``;
``.evaluate(edits, *, per_example=False, logits=False) -> list[EditResult]``;
``.mode`` (``"fx"``/``"full"``), ``.fallback_reason``, ``.recomputed(edit)`` (node names).
``EditResult(loss, error, losses, errors, logits, label)``.
``Edit(params={}, activations={}, args={}, size=None, label=None)``;
``ActivationContext(index, args)``;
``replace_edit(unit, source, *, buffers="keep", label=None)``;
``interpolate_edit(unit, start, end, alphas, *, buffers="keep", label=None)`` (stack);
``noise_edit(unit, center, sigma, draws, *, seed=None, generator=None, scale="absolute",
label=None)`` (stack);
``mask_edit(module, mask, value=0.0, *, dim=1, label=None)`` (stack when mask is (B, C));
``activation_noise_edit(module, std, *, seed=0, dim=1, label=None)``;
``stack_edits(edits, label=None)``.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call, vmap

from ..device import resolve_device
from ..errors import ConfigError, ModuleSelectionError, StateError, check_choice
from ..evaluate import DEFAULT_BATCH_SIZE, cpu_chunk, largest_activation_bytes
from ..evaluate import per_example as loss_and_error
from ..params import BufferPolicy, Unit
from ..values import Data

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 1 << 30
"""Bytes of cached activations (base network on one data chunk, plus one stack of variants'
recomputed suffix) the evaluator aims to stay within: 1 GiB keeps a CIFAR ResNet's 1,024-image
chunk cached on a laptop while leaving room for the model and the data."""

NOISE_SCALES = ("absolute", "relative")


# ----------------------------------------------------------------------------- edits


@dataclass(frozen=True)
class ActivationContext:
    """What an activation edit's ``fn(h, ctx)`` may use besides the output ``h`` (n, ...)."""

    index: Tensor
    """(n,) long: indices into the evaluated data of the chunk's examples."""
    args: Mapping[str, Tensor] = field(default_factory=dict)
    """This variant's slice of ``Edit.args`` (under a stack: without the leading B dim)."""


ActivationFn = Callable[[Tensor, ActivationContext], Tensor]


@dataclass(frozen=True, eq=False)
class Edit:
    """One variant of the base network, or a stack of ``size`` variants (see the module doc).

    Args:
        params: state key → new value ((B, *shape) when ``size`` is B).
        activations: module name → ``fn(h, ctx)`` applied to that module's output.
        args: name → tensor with leading dim B, sliced per variant into ``ctx.args``.
        size: ``None`` (one variant) or B (a stack).
        label: free-form tag, returned on the result.
    """

    params: Mapping[str, Tensor] = field(default_factory=dict)
    activations: Mapping[str, ActivationFn] = field(default_factory=dict)
    args: Mapping[str, Tensor] = field(default_factory=dict)
    size: int | None = None
    label: Any = None

    @property
    def variants(self) -> int:
        return 1 if self.size is None else self.size


@dataclass(frozen=True, eq=False)
class EditResult:
    """Per-edit outcome. Shapes: ``()`` for a single edit, ``(B,)`` / ``(B, N, ...)`` for a stack.

    ``loss`` mean cross-entropy (nats) and ``error`` 0–1 error over the N examples, float64.
    ``losses`` / ``errors`` per-example (N,) float64 and ``logits`` (N, K) float32, when asked.
    """

    loss: Tensor
    error: Tensor
    losses: Tensor | None = None
    errors: Tensor | None = None
    logits: Tensor | None = None
    label: Any = None


def replace_edit(unit: Unit, source: Mapping[str, Tensor], *, buffers: BufferPolicy = "keep",
                 label: Any = None) -> Edit:
    """θ_unit ← `source`'s values (re-initialization to a checkpoint, re-randomization)."""
    return Edit(params={k: source[k] for k in unit.keys(buffers)}, label=label)


def interpolate_edit(unit: Unit, start: Mapping[str, Tensor], end: Mapping[str, Tensor],
                     alphas: Sequence[float] | Tensor, *, buffers: BufferPolicy = "keep",
                     label: Any = None) -> Edit:
    """A stack of len(alphas) variants, θ_unit ← (1 − α) start + α end (integer keys skipped)."""
    alphas = [float(a) for a in torch.as_tensor(alphas, dtype=torch.float64).flatten()]
    if not alphas:
        raise ConfigError("interpolate_edit needs at least one alpha")
    params = {k: torch.stack([torch.lerp(start[k], end[k], a) for a in alphas])
              for k in unit.keys(buffers) if start[k].is_floating_point()}
    return Edit(params=params, size=len(alphas), label=label)


def noise_edit(unit: Unit, center: Mapping[str, Tensor], sigma: float, draws: int, *,
               seed: int | None = None, generator: torch.Generator | None = None,
               scale: str = "absolute", label: Any = None) -> Edit:
    """A stack of `draws` variants θ_unit ← center + u, u ~ N(0, σ² I), over the unit's parameters.

    ``scale="relative"``: each parameter tensor's noise has standard deviation
    σ · ‖center_k‖_F / √numel_k, so that E‖u_k‖² = σ² ‖center_k‖² (noise proportional to the
    tensor's norm, as in sharpness measures). Draws come from `generator`, else a CPU generator
    seeded with `seed` (default 0), in the unit's key order: reproducible.
    """
    if scale not in NOISE_SCALES:
        raise ConfigError(f"unknown scale={scale!r}; choose one of {NOISE_SCALES}")
    if draws < 1:
        raise ConfigError(f"draws must be >= 1, got {draws}")
    g = generator or torch.Generator().manual_seed(0 if seed is None else int(seed))
    params = {}
    for k in unit.params:
        c = center[k]
        u = torch.randn((draws, *c.shape), generator=g, dtype=c.dtype)
        std = float(sigma)
        if scale == "relative":
            std *= float(c.double().norm()) / math.sqrt(max(c.numel(), 1))
        params[k] = c.unsqueeze(0) + std * u.to(c.device)
    return Edit(params=params, size=draws, label=label)


def _unit_view(x: Tensor, ndim: int, dim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim % ndim] = -1
    return x.reshape(shape)


def mask_edit(module: str, mask: Tensor, value: float | Tensor = 0.0, *, dim: int = 1,
              label: Any = None) -> Edit:
    """Set the units of `module`'s output where `mask` is True to `value` (0, or per-unit means).

    `mask`: (C,) bool, one entry per unit along `dim` of the output (dim 1: channels of a conv
    output (n, C, H, W) or features of a linear output (n, C)); or (B, C) for a stack of B masks.
    `value`: a scalar or a (C,) tensor (e.g. each unit's mean activation).
    """
    mask = torch.as_tensor(mask, dtype=torch.bool)
    value = torch.as_tensor(value)
    if mask.dim() not in (1, 2):
        raise ConfigError(f"mask must be (C,) or (B, C), got shape {tuple(mask.shape)}")

    def fn(h: Tensor, ctx: ActivationContext) -> Tensor:
        m = _unit_view(ctx.args["mask"].to(h.device), h.dim(), dim)
        v = ctx.args["value"].to(h.device, h.dtype)
        v = v if v.dim() == 0 else _unit_view(v, h.dim(), dim)
        return torch.where(m, v, h)

    if mask.dim() == 1:
        return Edit(activations={module: fn}, args={"mask": mask, "value": value}, label=label)
    stacked = value.expand(mask.shape[0], *value.shape)
    return Edit(activations={module: fn}, args={"mask": mask, "value": stacked},
                size=mask.shape[0], label=label)


def activation_noise_edit(module: str, std: float | Tensor, *, seed: int = 0, dim: int = 1,
                          label: Any = None) -> Edit:
    """Add Gaussian noise to `module`'s output: h + std · z, z ~ N(0, I) fresh per example.

    `std`: a scalar or (C,) per-unit standard deviations along `dim` (e.g. factor × each unit's
    empirical std). Each chunk's draw uses a generator seeded with (seed, first example index):
    reproducible for a fixed chunk size.
    """
    std = torch.as_tensor(std)

    def fn(h: Tensor, ctx: ActivationContext) -> Tensor:
        first = int(ctx.index[0]) if len(ctx.index) else 0
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + first)
        z = torch.randn(h.shape, generator=g, dtype=h.dtype).to(h.device)
        s = std.to(h.device, h.dtype)
        return h + (s if s.dim() == 0 else _unit_view(s, h.dim(), dim)) * z

    return Edit(activations={module: fn}, label=label)


def stack_edits(edits: Sequence[Edit], label: Any = None) -> Edit:
    """One stack of the given parameter edits (each single or stacked), all of the same keys."""
    if not edits:
        raise ConfigError("stack_edits needs at least one edit")
    keys = set(edits[0].params)
    for e in edits:
        if set(e.params) != keys or e.activations or e.args:
            raise ConfigError("stack_edits stacks parameter-only edits of the same keys")
    params = {k: torch.cat([e.params[k] if e.size is not None else e.params[k].unsqueeze(0)
                            for e in edits]) for k in keys}
    return Edit(params=params, size=sum(e.variants for e in edits), label=label)


# ----------------------------------------------------------------------------- fx program


class _Tracer(fx.Tracer):
    def __init__(self, leaves: frozenset[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaves:
            return True
        # trace through a standard leaf when a module inside it needs its own call site
        inner = any(leaf.startswith(qualname + ".") for leaf in self.leaves) if qualname else False
        return super().is_leaf_module(m, qualname) and not inner


class _Program:
    """A traced model, run node by node with parameter overrides and a cache of the base run."""

    def __init__(self, model: nn.Module, leaves: frozenset[str], alias: dict[str, str]):
        tracer = _Tracer(leaves)
        graph = tracer.trace(model)
        self.gm = fx.GraphModule(tracer.root, graph)
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if not placeholders:
            raise fx.proxy.TraceError("the traced graph has no input")
        self.input = placeholders[0]
        self.extra_inputs = {n: (n.args[0] if n.args else None) for n in placeholders[1:]}
        self.output = next(n for n in self.nodes if n.op == "output")
        modules = dict(self.gm.named_modules())
        self.module_keys: dict[fx.Node, list[tuple[str, str]]] = {}
        self.reads: dict[fx.Node, set[str]] = {}
        for n in self.nodes:
            if n.op == "call_module":
                mod = modules[n.target]
                local = list(mod.named_parameters(remove_duplicate=False)) + \
                    list(mod.named_buffers(remove_duplicate=False))
                pairs = [(ln, alias[f"{n.target}.{ln}"]) for ln, _ in local
                         if f"{n.target}.{ln}" in alias]
                self.module_keys[n] = pairs
                self.reads[n] = {c for _, c in pairs}
            elif n.op == "get_attr":
                self.reads[n] = {alias[n.target]} if n.target in alias else set()
        self.modules = modules
        self.pairs = {n: next(iter(n.users)) for n in self.nodes if self._foldable(n)}
        self._folded: dict[fx.Node, tuple[Tensor, Tensor]] = {}
        self.elementwise = {n: kind for n in self.nodes if (kind := self._elementwise_kind(n))}

    def _elementwise_kind(self, n: fx.Node) -> str | None:
        """``"relu"``/``"add"`` for a ReLU or a two-operand addition whose first operand is a node
        used by nothing else: run in place on that operand when its value is fresh memory."""
        if not n.args or not isinstance(n.args[0], fx.Node) or len(n.args[0].users) != 1:
            return None
        if (n.op == "call_module" and type(self.modules[n.target]) is nn.ReLU) or \
                (n.op == "call_function" and n.target in (torch.relu, nn.functional.relu)
                 and len(n.args) == 1) or (n.op == "call_method" and n.target == "relu" and len(n.args) == 1):
            return "relu"
        if n.op == "call_function" and n.target in (operator.add, torch.add) and len(n.args) == 2 \
                and not n.kwargs and n.args[1] is not n.args[0]:
            return "add"
        return None

    def _makes_fresh(self, n: fx.Node, acts: Mapping[str, ActivationFn]) -> bool:
        """Whether node `n`'s recomputed value is a newly allocated tensor nothing else holds."""
        if n.op == "call_module":
            return n.target not in acts and (n in self.elementwise or isinstance(
                self.modules[n.target], (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                                         nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)))
        return n in self.elementwise

    def _foldable(self, n: fx.Node) -> bool:
        """A Conv2d call whose only user is an eval-mode BatchNorm2d call on its output alone."""
        if n.op != "call_module" or type(self.modules[n.target]) is not nn.Conv2d or len(n.users) != 1:
            return False
        bn_node = next(iter(n.users))
        if bn_node.op != "call_module" or bn_node.args != (n,) or bn_node.kwargs:
            return False
        bn = self.modules[bn_node.target]
        return (type(bn) is nn.BatchNorm2d and not bn.training and bn.running_mean is not None
                and bn.running_var is not None and bn.affine)

    def folded(self, conv_node: fx.Node, override: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(weight, bias) of the conv, edited by `override` where it is, with the following
        (unedited) BatchNorm folded in."""
        own = {ln: override[c] for ln, c in self.module_keys[conv_node] if c in override}
        if not own and conv_node in self._folded:
            return self._folded[conv_node]
        conv = self.modules[conv_node.target]
        bn = self.modules[self.pairs[conv_node].target]
        weight, bias = own.get("weight", conv.weight), own.get("bias", conv.bias)
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)            # (C_out,)
        bias = bias if bias is not None else torch.zeros_like(bn.running_mean)
        out = (weight * scale.view(-1, 1, 1, 1), (bias - bn.running_mean) * scale + bn.bias)
        if not own:
            self._folded[conv_node] = out
        return out

    def fusable(self, nodes: list[fx.Node], keys: set[str], acts: set[str]) -> set[fx.Node]:
        """Conv nodes of `nodes` whose conv→BN pair is recomputed and whose BatchNorm is not
        edited (the conv may be): folded there."""
        todo = set(nodes)
        return {c for c, b in self.pairs.items()
                if c in todo and b in todo and not self.reads[b] & keys
                and c.target not in acts}

    def affected(self, keys: set[str], act_modules: set[str]) -> list[fx.Node]:
        """Nodes to recompute for an edit, in graph (topological) order."""
        seeds = [n for n, r in self.reads.items() if r & keys]
        seeds += [n for n in self.nodes if n.op == "call_module" and n.target in act_modules]
        todo, seen = list(seeds), set(seeds)
        while todo:
            for user in todo.pop().users:
                if user not in seen:
                    seen.add(user)
                    todo.append(user)
        return sorted(seen, key=self.index.__getitem__)

    def run_node(self, n: fx.Node, get, override: Mapping[str, Tensor],
                 acts: Mapping[str, ActivationFn], ctx: ActivationContext):
        """Value of node `n`; `get(node)` gives input values; `override` maps edited canonical
        keys to their values (every other tensor is the private model's own: the base state)."""
        args = fx.node.map_arg(n.args, get)
        kwargs = fx.node.map_arg(n.kwargs, get)
        if n.op == "call_module":
            mod = self.modules[n.target]
            local = {ln: override[c] for ln, c in self.module_keys[n] if c in override}
            if local:
                out = functional_call(mod, local, tuple(args), dict(kwargs))
            else:
                out = mod(*args, **kwargs)
            fn = acts.get(n.target)
            return out if fn is None else fn(out, ctx)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "get_attr":
            for key in self.reads[n]:
                if key in override:
                    return override[key]
            obj = self.gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            return obj
        if n.op == "output":
            return args[0]
        raise RuntimeError(f"unexpected fx node op {n.op!r}")

    def has_call_site(self, module: str) -> bool:
        return any(n.op == "call_module" and n.target == module for n in self.nodes)

    def run_base(self, x: Tensor) -> dict[fx.Node, Any]:
        env: dict[fx.Node, Any] = {}
        empty = ActivationContext(torch.empty(0, dtype=torch.long))
        for n in self.nodes:
            if n.op == "placeholder":
                env[n] = x if n is self.input else self.extra_inputs[n]
            else:
                env[n] = self.run_node(n, env.__getitem__, {}, {}, empty)
        return env

    def run_suffix(self, env, nodes: list[fx.Node], override, acts, ctx,
                   fused: set[fx.Node] = frozenset(), in_place: bool = False) -> Any:
        """Recompute `nodes` (the rest from `env`); conv nodes in `fused` run with their BN
        folded in, and the BN node then passes that value on. `in_place`: a ReLU or addition
        whose first operand is a fresh recomputed tensor with no other user overwrites it
        (same values, no new allocation; not under vmap)."""
        local: dict[fx.Node, Any] = {}
        fresh: set[fx.Node] = set()
        folded_bn = {self.pairs[c]: c for c in fused}

        def get(m):
            return local[m] if m in local else env[m]

        for n in nodes:
            if n in fused:
                w, b = self.folded(n, override)
                local[n] = self.modules[n.target]._conv_forward(get(n.args[0]), w, b)
                fresh.add(n)
            elif n in folded_bn:
                out = local[folded_bn[n]]
                fn = acts.get(n.target)
                local[n] = out if fn is None else fn(out, ctx)
                if fn is None:
                    fresh.add(n)
            elif in_place and n in self.elementwise and n.args[0] in fresh and (n.op != "call_module"
                                                                 or n.target not in acts):
                local[n] = self._in_place(n, local[n.args[0]], get)
                fresh.add(n)
            else:
                local[n] = self.run_node(n, get, override, acts, ctx)
                if self._makes_fresh(n, acts):
                    fresh.add(n)
        return get(self.output)

    def _in_place(self, n: fx.Node, first: Tensor, get) -> Tensor:
        if self.elementwise.get(n) == "relu":
            return first.relu_()
        if self.elementwise.get(n) == "add":
            other = get(n.args[1]) if isinstance(n.args[1], fx.Node) else n.args[1]
            if isinstance(other, (Tensor, int, float)) and torch.result_type(first, other) == first.dtype \
                    and (not isinstance(other, Tensor)
                         or torch.broadcast_shapes(first.shape, other.shape) == first.shape):
                return first.add_(other)
            return first + other
        raise RuntimeError(f"node {n.name} has no in-place form")


# ----------------------------------------------------------------------------- evaluator


@dataclass
class _Plan:
    edit: Edit
    keep: list[int]                   # variant indices computed (the others repeat one of them)
    nodes: list[fx.Node] | None = None  # nodes to recompute; None: a full forward
    same: dict[int, int] = field(default_factory=dict)  # variant → the kept variant it equals
    fused: set = field(default_factory=set)  # conv nodes run with their BatchNorm folded in


STACK_MODES = ("auto", "vmap", "loop")
"""How a stack of variants is run: ``vmap`` over the variant dim, or a ``loop`` over variants.
``auto`` (the default) loops on the CPU and uses vmap elsewhere: on a 2-core CPU, vmap over a
stack of 10 conv-weight variants of a ResNet stem took 2.3× as long as looping (0.50 s vs
0.22 s on 2,000 images) and was never faster for other modules, while on a GPU one batched
kernel launch beats many small ones."""


class VariantEvaluator:
    """Evaluates edits of `model` under `base_state` on `data` (see the module docstring).

    Args:
        model: the architecture (any ``nn.Module``); copied once, never mutated.
        base_state: the state every edit starts from (normally θ^F), with the model's canonical
            keys (parameters then buffers, tied tensors once: ``Subject.final``).
        data: the examples, :class:`genprobe.subject.Data` ``(x (N, ...), y (N,))``.
        batch_size: the largest data chunk (default ``evaluate.DEFAULT_BATCH_SIZE``); the
            memory budget may lower it.
        device: ``"auto"|"cpu"|"cuda"|"cuda:N"``.
        memory_budget: bytes of cached activations to stay within (default 1 GiB).
        use_fx: ``False`` forces the full-forward path (for testing and comparison).
        fast: use the CPU/GPU-friendly execution: channels-last memory layout for conv nets
            (kept only if the model's forward accepts it and agrees), and each recomputed
            Conv2d→BatchNorm2d pair that an edit does not touch run as one conv with the
            BatchNorm folded in. Exact up to float rounding; ``False`` runs the modules as they are.
    """

    def __init__(self, model: nn.Module, base_state: Mapping[str, Tensor], data: Data, *,
                 batch_size: int | None = None, device: str | torch.device = "auto",
                 memory_budget: int | None = None, use_fx: bool = True, fast: bool = True,
                 stack: Literal["auto", "vmap", "loop"] = "auto"):
        check_choice("stack", stack, STACK_MODES)
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if memory_budget is not None and memory_budget < 1:
            raise ConfigError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        self.device = resolve_device(device)
        self.data = data
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.memory_budget = memory_budget or DEFAULT_MEMORY_BUDGET
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.alias = _alias_map(self.model)
        keys = _ordered_keys(self.model)
        missing = [k for k in keys if k not in base_state]
        if missing:
            raise StateError(f"base_state is missing key {missing[0]!r}; pass a canonical state "
                             "(Subject.final or genprobe.params.canonical_state)")
        self.model.load_state_dict({k: base_state[k].detach() for k in keys}, strict=False)
        self.model.to(self.device)
        self.fast = fast
        self.channels_last = fast and self._try_channels_last()
        own = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        self.base: dict[str, Tensor] = {k: own[k].detach() for k in keys}
        self.module_names = {n for n, _ in self.model.named_modules()}
        self.use_fx = use_fx
        self.fallback_reason: str | None = None if use_fx else "use_fx=False"
        self._programs: dict[frozenset[str], _Program | None] = {}
        self._bytes_per_example: tuple[float, float] | None = None
        self.stack = stack if stack != "auto" else ("loop" if self.device.type == "cpu" else "vmap")
        self._vmap_ok = self.stack == "vmap"

    def _try_channels_last(self) -> bool:
        """Switch the private model to channels-last when it is a conv net on images and its
        forward gives the same outputs that way (a ``.view`` on a conv output would not)."""
        if self.data.x.dim() != 4 or not any(isinstance(m, nn.Conv2d) for m in self.model.modules()):
            return False
        x = self.data.x[: min(4, len(self.data))].to(self.device)
        with torch.no_grad():
            reference = self.model(x)
            self.model.to(memory_format=torch.channels_last)
            try:
                out = self.model(x.contiguous(memory_format=torch.channels_last))
                if torch.allclose(out, reference, rtol=1e-4, atol=1e-5):
                    return True
            except Exception:  # any failure: keep the default layout
                pass
            self.model.to(memory_format=torch.contiguous_format)
        return False

    def _input(self, index: Tensor) -> Tensor:
        x = self.data.x[index].to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # -- public ----------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``"fx"`` (prefix reuse) or ``"full"`` (a full forward per edit)."""
        return "fx" if self._program(frozenset()) is not None else "full"

    def recomputed(self, edit: Edit) -> list[str] | None:
        """Names of the fx nodes `edit` recomputes (the rest come from the cache), in order;
        ``None`` when it runs the full forward."""
        self._check(edit)
        plan = self._plan(edit, self._program(frozenset(edit.activations)))
        return None if plan.nodes is None else [n.name for n in plan.nodes]

    @torch.no_grad()
    def evaluate(self, edits: Sequence[Edit], *, per_example: bool = False,
                 logits: bool = False) -> list[EditResult]:
        """Evaluate every edit on the data. Returns one :class:`EditResult` per edit, in order.

        `per_example`: also return per-example losses and errors; `logits`: also the logits.
        """
        edits = list(edits)
        for e in edits:
            self._check(e)
        program = self._program(frozenset(m for e in edits for m in e.activations))
        plans = [self._plan(e, program) for e in edits]
        n_total = len(self.data)
        chunk, max_stack = self._chunking(program)
        accs = [_Acc(p.edit.size) for p in plans]
        for start in range(0, n_total, chunk):
            index = torch.arange(start, min(start + chunk, n_total))
            x = self._input(index)
            y = self.data.y[index].to(self.device)
            env = program.run_base(x) if program is not None else None
            base_out = _check_logits(env[program.output] if env is not None else self.model(x))
            for plan, acc in zip(plans, accs, strict=True):
                acc.add(self._run_plan(plan, program, env, x, index, base_out, max_stack), y,
                        per_example, logits)
        return [acc.result(p.edit.label, n_total, per_example, logits) for p, acc in zip(plans, accs, strict=True)]

    # -- planning ----------------------------------------------------------------

    def _check(self, e: Edit) -> None:
        if e.size is not None and e.size < 1:
            raise ConfigError(f"Edit.size must be None or >= 1, got {e.size}")
        for k, v in e.params.items():
            if k not in self.base:
                hint = f" (an alias of {self.alias[k]!r})" if k in self.alias else ""
                raise StateError(f"edit of unknown state key {k!r}{hint}; use the model's canonical "
                                 "state keys (genprobe.params.state_keys)")
            want = tuple(self.base[k].shape) if e.size is None else (e.size, *self.base[k].shape)
            if tuple(v.shape) != want:
                raise StateError(f"edit of {k!r} has shape {tuple(v.shape)}, expected {want}")
        for m in e.activations:
            if m not in self.module_names:
                raise ModuleSelectionError(f"activation edit of unknown module {m!r}; modules: "
                                           f"{', '.join(sorted(n for n in self.module_names if n))}")
        for k, v in e.args.items():
            if e.size is not None and (v.dim() == 0 or v.shape[0] != e.size):
                raise ConfigError(f"Edit.args[{k!r}] must have leading dim size={e.size}")

    def _plan(self, e: Edit, program: _Program | None) -> _Plan:
        keep, same = list(range(e.variants)), {}
        if not e.activations:  # skip variants equal to the base, compute repeated ones once
            keep = [b for b in keep if not self._equals_base(e, b)]
            if e.size is not None and not e.args:
                distinct: list[int] = []
                for b in keep:
                    twin = next((a for a in distinct if self._equal_variants(e, a, b)), None)
                    if twin is None:
                        distinct.append(b)
                    else:
                        same[b] = twin
                keep = distinct
        nodes, fused = None, set()
        if program is not None and all(program.has_call_site(m) for m in e.activations):
            nodes = program.affected(set(e.params), set(e.activations))
            if self.fast:
                fused = program.fusable(nodes, set(e.params), set(e.activations))
        return _Plan(e, keep, nodes, same, fused)

    @staticmethod
    def _equal_variants(e: Edit, a: int, b: int) -> bool:
        return all(torch.equal(v[a], v[b]) for v in e.params.values())

    def _equals_base(self, e: Edit, b: int) -> bool:
        for k, v in e.params.items():
            v = v if e.size is None else v[b]
            base = self.base[k]
            if v.dtype != base.dtype or not torch.equal(v.to(base.device), base):
                return False
        return True

    def _chunking(self, program: _Program | None) -> tuple[int, int]:
        """(examples per chunk, variants per vmapped stack) within the memory budget."""
        total, largest = self._estimate_bytes(program)
        n = min(self.batch_size, max(len(self.data), 1),
                max(1, int(self.memory_budget // (2 * total))))
        if self.device.type == "cpu":
            n = cpu_chunk(largest, limit=n)
        return n, max(1, int(self.memory_budget // (n * total)) - 1)

    def _estimate_bytes(self, program: _Program | None) -> tuple[float, float]:
        """Bytes per example of every cached node value together, and of the largest one (the
        base run on a few examples)."""
        if self._bytes_per_example is None:
            k = max(min(4, len(self.data)), 1)
            x = self._input(torch.arange(min(4, len(self.data))))
            if program is not None:
                values = [v for v in program.run_base(x).values() if isinstance(v, Tensor)]
                sizes = [v.numel() * v.element_size() / k for v in values]
                total, largest = sum(sizes), max(sizes, default=1.0)
            else:
                total = largest = largest_activation_bytes(self.model, x)
            self._bytes_per_example = (max(total, 1.0), max(largest, 1.0))
        return self._bytes_per_example

    def _program(self, acts: frozenset[str]) -> _Program | None:
        if acts in self._programs:
            return self._programs[acts]
        program = None
        if self.use_fx:
            try:
                program = _Program(self.model, acts, self.alias)
                self._verify(program)
            except Exception as exc:  # any tracing/verification failure → full forward
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                self.fallback_reason = reason
                logger.warning("variants: torch.fx cannot split %s (%s); falling back to a full "
                               "forward per edit (correct, slower)", type(self.model).__name__, reason)
                program = None
        self._programs[acts] = program
        return program

    @torch.no_grad()
    def _verify(self, program: _Program) -> None:
        x = self._input(torch.arange(min(4, len(self.data))))
        ours = program.run_base(x)[program.output]
        theirs = self.model(x)
        if not (isinstance(ours, Tensor) and ours.shape == theirs.shape
                and torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)):
            raise RuntimeError("the traced graph's output differs from the model's forward")

    # -- running -----------------------------------------------------------------

    def _run_plan(self, plan: _Plan, program, env, x, index, base_out, max_stack) -> Tensor:
        """Logits of every variant of the plan's edit on this chunk: (n, K) or (B, n, K)."""
        e = plan.edit
        if e.size is None:
            if not plan.keep:
                return base_out
            return self._run_one(plan, program, env, x, index, e.params, e.args)
        out = base_out.unsqueeze(0).repeat(e.size, *([1] * base_out.dim()))
        for lo in range(0, len(plan.keep), max_stack):
            sel = torch.tensor(plan.keep[lo:lo + max_stack], dtype=torch.long)
            params = {k: v[sel.to(v.device)].to(self.device) for k, v in e.params.items()}
            args = {k: v[sel.to(v.device)] for k, v in e.args.items()}
            out[sel.to(out.device)] = self._run_stack(plan, program, env, x, index, params, args,
                                                      len(sel))
        for b, a in plan.same.items():
            out[b] = out[a]
        return out

    def _run_one(self, plan, program, env, x, index, params, args) -> Tensor:
        ctx = ActivationContext(index, args)
        override = {k: self._layout(v.to(self.device)) for k, v in params.items()}
        if plan.nodes is not None:
            return _check_logits(program.run_suffix(env, plan.nodes, override,
                                                    plan.edit.activations, ctx, plan.fused,
                                                    in_place=self.fast))
        return self._full_forward(override, x, plan.edit.activations, ctx)

    def _run_stack(self, plan, program, env, x, index, params, args, size) -> Tensor:
        if plan.nodes is not None and self._vmap_ok:
            def one(p, a):
                return program.run_suffix(env, plan.nodes, p, plan.edit.activations,
                                          ActivationContext(index, a), plan.fused)
            try:
                return _check_logits(vmap(one)(params, args))
            except Exception as exc:  # a module without a batching rule: loop instead
                self._vmap_ok = False
                logger.warning("variants: vmap over stacked edits failed (%s: %s); evaluating "
                               "the variants one at a time", type(exc).__name__,
                               str(exc).splitlines()[0][:200])
        return torch.stack([self._run_one(plan, program, env, x, index,
                                          {k: v[b] for k, v in params.items()},
                                          {k: v[b] for k, v in args.items()})
                            for b in range(size)])

    def _layout(self, v: Tensor) -> Tensor:
        if self.channels_last and v.dim() == 4:
            return v.contiguous(memory_format=torch.channels_last)
        return v

    def _full_forward(self, override, x, acts, ctx) -> Tensor:
        modules = dict(self.model.named_modules())
        hooks = [modules[m].register_forward_hook(lambda mod, inp, out, fn=fn: fn(out, ctx))
                 for m, fn in acts.items()]
        try:
            if override:
                return _check_logits(functional_call(self.model, override, (x,)))
            return _check_logits(self.model(x))
        finally:
            for h in hooks:
                h.remove()


class _Acc:
    """Accumulates one edit's per-chunk logits into sums (and per-example pieces)."""

    def __init__(self, size: int | None):
        self.size = size
        b = 1 if size is None else size
        self.loss = torch.zeros(b, dtype=torch.float64)
        self.wrong = torch.zeros(b, dtype=torch.float64)
        self.losses: list[Tensor] = []
        self.errors: list[Tensor] = []
        self.logits: list[Tensor] = []

    def add(self, out: Tensor, y: Tensor, per_example: bool, keep_logits: bool) -> None:
        out = out.unsqueeze(0) if self.size is None else out            # (B, n, K)
        b, n, k = out.shape
        loss, wrong = loss_and_error(out.reshape(b * n, k), y.repeat(b))
        loss, wrong = loss.view(b, n), wrong.view(b, n)
        self.loss += loss.sum(dim=1).cpu()
        self.wrong += wrong.sum(dim=1).cpu()
        if per_example:
            self.losses.append(loss.cpu())
            self.errors.append(wrong.cpu())
        if keep_logits:
            self.logits.append(out.float().cpu())

    def result(self, label, n: int, per_example: bool, keep_logits: bool) -> EditResult:
        def shape(t: Tensor | None) -> Tensor | None:
            return t[0] if (t is not None and self.size is None) else t

        def cat(parts: list[Tensor]) -> Tensor:
            return torch.cat(parts, dim=1)

        return EditResult(shape(self.loss / max(n, 1)), shape(self.wrong / max(n, 1)),
                          shape(cat(self.losses)) if per_example else None,
                          shape(cat(self.errors)) if per_example else None,
                          shape(cat(self.logits)) if keep_logits else None, label)


# ----------------------------------------------------------------------------- helpers


def _alias_map(model: nn.Module) -> dict[str, str]:
    """Every parameter/buffer name (tied aliases included) → its canonical (first) name."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + \
        list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        alias[name] = first.setdefault(id(t), name)
    return alias


def _ordered_keys(model: nn.Module) -> list[str]:
    return [k for k, _ in model.named_parameters()] + [k for k, _ in model.named_buffers()]


def _check_logits(out: Any) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() < 2:
        raise StateError(f"the model must return logits (N, K); got {type(out).__name__}"
                         + (f" of shape {tuple(out.shape)}" if isinstance(out, Tensor) else ""))
    return out
