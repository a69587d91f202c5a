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

The edits are :mod:`genprobe.engine.edits`; the traced program, :mod:`genprobe.engine.program`.

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
  logs a warning naming the reason; ``ev.mode`` says whether the model can be split
  (``"fx"``/``"full"``).
- A route per ``evaluate`` call: prefix reuse costs a base run per chunk (to fill the cache),
  which a plain forward per variant does not need; ``ev.route`` is the path the last call took,
  by the cost rule of :meth:`VariantEvaluator._choose_route` (estimated multiply-adds from one
  hooked forward: no timing, so the choice is reproducible). A single variant, or edits of the
  first layer alone, run as plain forwards, with no tracing.
- Loop order: data chunk outer, edits inner. ``memory_budget`` (bytes, :mod:`genprobe.memory`):
  the cached node values of one chunk take at most half of it, which sets the chunk size; the
  variants of a stack run at once share the rest (each: its recomputed activations and its
  edited parameters, materialized from the edit), so a stack that does not fit runs in pieces,
  with identical results. On the CPU the chunk is also capped so that the largest single
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
memory_budget=None, use_fx=True, fast=True, stack="auto")``;
``.evaluate(edits, *, per_example=False, logits=False, on_progress=None) -> list[EditResult]``;
``.mode`` (``"fx"``/``"full"``), ``.route`` (the last call's), ``.fallback_reason``,
``.recomputed(edit)`` (node names).
``EditResult(loss, error, losses, errors, logits, label)``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn
from torch.func import vmap

from .. import inputs
from ..device import resolve_device
from ..errors import ConfigError, ModuleSelectionError, StateError, check_choice
from ..evaluate import DEFAULT_BATCH_SIZE, cpu_chunk
from ..evaluate import per_example as loss_and_error
from ..inputs import Inputs
from ..memory import resolve_memory_budget
from ..options import check_int
from ..params import state_keys
from ..values import Data
from .edits import ActivationContext, Edit, EditResult, PathParams
from .program import Program
from .sites import hooked, is_functional

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- evaluator


@dataclass
class _Plan:
    edit: Edit
    keep: list[int]                   # variant indices computed (the others repeat one of them)
    nodes: list[fx.Node] | None = None  # nodes to recompute; None: a full forward
    same: dict[int, int] = field(default_factory=dict)  # variant → the kept variant it equals
    fused: set = field(default_factory=set)  # conv nodes run with their BatchNorm folded in
    piece: int = 1                    # variants run at once (their parameters materialized)


STACK_MODES = ("auto", "vmap", "loop")
"""How a stack of variants is run: ``vmap`` over the variant dim, or a ``loop`` over variants.
``auto`` (the default) loops on the CPU and uses vmap elsewhere: on a 2-core CPU, vmap over a
stack of 10 conv-weight variants of a ResNet stem took 2.3× as long as looping (0.50 s vs
0.22 s on 2,000 images) and was never faster for other modules, while on a GPU one batched
kernel launch beats many small ones."""

CALL_COST = 2e5
"""The route rule's fixed cost of one module call per data chunk, in multiply-adds: about 10 µs
of Python and dispatch at the ~20 G multiply-adds/s a 2-core Xeon reaches on small layers.
Only matters for tiny chunks, where every path is overhead."""


@dataclass
class _Profile:
    """The model's forward on a few examples, seen through module hooks (for the route rule)."""

    order: dict[str, int]               # module name → index of its first call
    calls: list[tuple[int, float]]      # (call index, multiply-adds per example) of leaf calls
    largest: float                      # bytes per example of the largest activation
    writes_input: bool                  # the forward changes its input in place

    def cost(self, start: int, n: int) -> float:
        """Multiply-adds (with :data:`CALL_COST` per call) of the leaf calls from call `start`
        on, for a chunk of `n` examples."""
        return sum(n * c + CALL_COST for i, c in self.calls if i >= start)


class VariantEvaluator:
    """Evaluates edits of `model` under `base_state` on `data` (see the module docstring).

    Args:
        model: the architecture (any ``nn.Module``); copied once, never mutated.
        base_state: the state every edit starts from (normally θ^F), with the model's canonical
            keys (parameters then buffers, tied tensors once: ``Subject.final``).
        data: the examples, :class:`genprobe.subject.Data` ``(x (N, ...), y (N,))``; floating
            inputs are evaluated in the model's floating dtype, integer inputs (token ids) as
            they are.
        batch_size: the largest data chunk (default ``evaluate.DEFAULT_BATCH_SIZE``); the
            memory budget may lower it.
        device: ``"auto"|"cpu"|"cuda"|"cuda:N"``.
        memory_budget: bytes of working memory (see :mod:`genprobe.memory`; default 25% of the
            device's available memory, at most 8 GiB): the cached activations of one data chunk
            take at most half, and the variants of a stack run at once (their recomputed
            activations and their edited parameters, materialized from the edit) share the
            rest; a stack that does not fit is run in pieces, with identical results.
        use_fx: ``False`` forces the full-forward path (for testing and comparison).
        fast: use the CPU/GPU-friendly execution: channels-last memory layout for conv nets
            (kept only if the model's forward accepts it and agrees), and each recomputed
            Conv2d→BatchNorm2d pair that an edit does not touch run as one conv with the
            BatchNorm folded in. Exact up to float rounding; ``False`` runs the modules as they are.
        stack: see :data:`STACK_MODES`.
    """

    def __init__(self, model: nn.Module, base_state: Mapping[str, Tensor], data: Data, *,
                 batch_size: int | None = None, device: str | torch.device = "auto",
                 memory_budget: int | None = None, use_fx: bool = True, fast: bool = True,
                 stack: Literal["auto", "vmap", "loop"] = "auto"):
        check_choice("stack", stack, STACK_MODES)
        check_int("batch_size", batch_size, 1, optional=True)
        self.device = resolve_device(device)
        self.memory_budget = resolve_memory_budget(memory_budget, self.device)
        self.data = data
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
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
        own = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        self.input_dtype = next((own[k].dtype for k in keys if own[k].is_floating_point()), None)
        self.fast = fast
        self._profile: _Profile | None = None
        self.channels_last = False
        self.channels_last = fast and self._try_channels_last()
        self.base: dict[str, Tensor] = {k: own[k].detach() for k in keys}
        self._base_prints: dict[str, int] = {}
        self.module_names = {n for n, _ in self.model.named_modules()}
        self.use_fx = use_fx
        self.fallback_reason: str | None = None if use_fx else "use_fx=False"
        self._programs: dict[frozenset[str], Program | None] = {}
        self._bytes: dict[frozenset[str] | None, tuple[float, float]] = {}
        self.route: str | None = None
        self.stack = stack if stack != "auto" else ("loop" if self.device.type == "cpu" else "vmap")
        self._vmap_ok = self.stack == "vmap"

    def _try_channels_last(self) -> bool:
        """Switch the private model to channels-last when it is a conv net on images and its
        forward gives the same outputs that way (a ``.view`` on a conv output would not)."""
        if not any(isinstance(m, nn.Conv2d) for m in self.model.modules()):
            return False
        x = self._input(torch.arange(min(4, len(self.data))))
        if not isinstance(x, Tensor) or x.dim() != 4:
            return False
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

    def _input(self, index: Tensor | slice) -> Inputs:
        """The inputs `index` on the device, floating ones in the model's dtype, integer ones
        (token ids) unchanged. A slice may be a view of the caller's data: never written to."""
        x = inputs.take(self.data.x, index)
        if isinstance(index, slice) and (self._profile is None or self._profile.writes_input):
            x = inputs.clone(x)  # the model writes its input in place: never the caller's data
        x = inputs.move(x, self.device, self.input_dtype)
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
        if any(is_functional(m) for m in edit.activations):
            return None
        nodes, _ = self._nodes(edit, self._program(frozenset(edit.activations)))
        return None if nodes is None else [n.name for n in nodes]

    @torch.no_grad()
    def evaluate(self, edits: Sequence[Edit], *, per_example: bool = False, logits: bool = False,
                 on_progress: Callable[[int, int], Any] | None = None) -> list[EditResult]:
        """Evaluate every edit on the data. Returns one :class:`EditResult` per edit, in order.

        `per_example`: also return per-example losses and errors; `logits`: also the logits.
        `on_progress(done, total)`: called after each data chunk with the number of examples
        that chunk held (its increment) and the total number of examples. The path taken
        (``"fx"`` or ``"full"``, see :meth:`_choose_route`) is left in ``ev.route``.
        """
        edits = list(edits)
        for e in edits:
            self._check(e)
        self._module_profile()
        distinct = [self._distinct(e, self._piece(e, 0.0, self.memory_budget / 2)) for e in edits]
        need_base = any(len(keep) + len(same) < e.variants
                        for e, (keep, same) in zip(edits, distinct, strict=True))
        acts = frozenset(m for e in edits for m in e.activations)
        program = None
        if self._choose_route(edits, distinct, need_base) == "fx":
            program = self._program(acts)
        self.route = "fx" if program is not None else "full"
        n_total = len(self.data)
        chunk, share = self._chunking(program, acts)
        plans = []
        for e, (keep, same) in zip(edits, distinct, strict=True):
            nodes, fused = self._nodes(e, program)
            plans.append(_Plan(e, keep, nodes, same, fused, self._piece(e, chunk * self._bytes[
                acts if program is not None else None][0], share)))
        accs = [_Acc(p.edit.size) for p in plans]
        for start in range(0, n_total, chunk):
            index = torch.arange(start, min(start + chunk, n_total))
            x = self._input(slice(start, start + len(index)))
            y = self.data.y[start:start + len(index)].to(self.device)
            env = program.run_base(x) if program is not None else None
            base_out = None
            if env is not None:
                base_out = _check_logits(env[program.output])
            elif need_base:
                base_out = _check_logits(inputs.call(self.model, x))
            for plan, acc in zip(plans, accs, strict=True):
                out = self._run_plan(plan, program, env, x, index, base_out)
                acc.add(out, y, per_example, logits)
            if on_progress is not None:
                on_progress(len(index), n_total)
        return [acc.result(p.edit.label, n_total, per_example, logits)
                for p, acc in zip(plans, accs, strict=True)]

    def _choose_route(self, edits: list[Edit], distinct, need_base: bool) -> str:
        """``"fx"`` (prefix reuse) or ``"full"`` (a full forward per variant), whichever the
        cost rule expects to be cheaper.

        The rule, in multiply-adds per data chunk of n examples, from one hooked forward of the
        model on a few examples (each leaf module call costs n × its multiply-adds (parameters
        × output positions for Linear, ConvNd and other parametrized modules) + n × its output
        size + :data:`CALL_COST`):

        - fx: the base network (cached for reuse: always run) + for every variant computed, the
          calls from the first call of a module its edit touches on (its suffix);
        - full: the base network only when a variant equal to it needs its result + for every
          variant computed, the whole network.

        So prefix reuse is chosen whenever it saves more than the base run costs: always when
        the base result is needed anyway (the robustness map), and for variants computed
        without it (a bisection round of criticality) when their suffixes leave out at least
        one network's worth of compute. A single variant, or edits of the first layer, go the
        full way, with no tracing and no cached activations. Both routes give the same results
        up to float rounding (tested against the naive loop).
        """
        if not self.use_fx or any(is_functional(m) for e in edits for m in e.activations):
            return "full"  # a functional site is edited through a TorchFunctionMode, not the fx graph
        counts = [len(keep) for keep, _ in distinct]
        if sum(counts) + need_base <= 1:
            return "full"
        profile = self._module_profile()
        n = min(self.batch_size, max(len(self.data), 1))
        whole = profile.cost(0, n)
        fx = whole + sum(c * profile.cost(self._first_call(e, profile), n)
                         for e, c in zip(edits, counts, strict=True) if c)
        full = (need_base + sum(counts)) * whole
        return "fx" if fx < full else "full"

    def _first_call(self, e: Edit, profile: _Profile) -> int:
        """Index of the first module call that an edit changes (0 when it cannot tell)."""
        owners = {name.rpartition(".")[0] for name, canon in self.alias.items()
                  if canon in e.params}
        owners |= set(e.activations)
        calls = [profile.order[m] for m in owners if m in profile.order]
        return min(calls) if calls else 0

    def _module_profile(self) -> _Profile:
        if self._profile is None:
            x = self._input(torch.arange(min(4, len(self.data))))
            k = max(inputs.count(x), 1)
            order: dict[str, int] = {}
            calls: list[tuple[int, float]] = []
            started: dict[str, int] = {}
            sizes = [v.numel() * v.element_size() / k for v in inputs.leaves(x)]
            counter = 0

            def pre(name):
                def hook(module, args):
                    nonlocal counter
                    order.setdefault(name, counter)
                    started[name] = counter
                    counter += 1
                return hook

            def post(name):
                def hook(module, args, out):
                    if not isinstance(out, Tensor):
                        return
                    sizes.append(out.numel() * out.element_size() / k)
                    if next(module.children(), None) is None:
                        calls.append((started[name], _call_cost(module, out) / k))
                return hook

            handles = []
            for name, m in self.model.named_modules():
                handles.append(m.register_forward_pre_hook(pre(name)))
                handles.append(m.register_forward_hook(post(name)))
            version = inputs.version(x)
            try:
                inputs.call(self.model, x)
            finally:
                for h in handles:
                    h.remove()
            self._profile = _Profile(order, calls, max(sizes), inputs.version(x) != version)
        return self._profile

    # -- planning ----------------------------------------------------------------

    def _check(self, e: Edit) -> None:
        if e.size is not None and e.size < 1:
            raise ConfigError(f"Edit.size must be None or >= 1, got {e.size}")
        if isinstance(e.params, PathParams) and e.params.size != e.size:
            raise StateError(f"edit of PathParams with {e.params.size} variants needs size="
                             f"{e.params.size}, got {e.size}")
        for k in e.params:
            if k not in self.base:
                hint = f" (an alias of {self.alias[k]!r})" if k in self.alias else ""
                raise StateError(f"edit of unknown state key {k!r}{hint}; use the model's canonical "
                                 "state keys (genprobe.params.state_keys)")
            want = tuple(self.base[k].shape) if e.size is None else (e.size, *self.base[k].shape)
            have = _stack_shape(e.params, k)
            if have != want:
                raise StateError(f"edit of {k!r} has shape {have}, expected {want}")
        for m in e.activations:
            if m not in self.module_names and not is_functional(m):
                raise ModuleSelectionError(f"activation edit of unknown module {m!r}; modules: "
                                           f"{', '.join(sorted(n for n in self.module_names if n))}")
        for k, v in e.args.items():
            if e.size is not None and (v.dim() == 0 or v.shape[0] != e.size):
                raise ConfigError(f"Edit.args[{k!r}] must have leading dim size={e.size}")

    def _nodes(self, e: Edit, program: Program | None) -> tuple[list[fx.Node] | None, set]:
        """(fx nodes the edit recomputes, conv nodes run with their BatchNorm folded in);
        (None, ∅) for a full forward."""
        if program is None or not all(program.has_call_site(m) for m in e.activations):
            return None, set()
        nodes = program.affected(set(e.params), set(e.activations))
        fused = program.fusable(nodes, set(e.params), set(e.activations)) if self.fast else set()
        return nodes, fused

    def _piece(self, e: Edit, activations: float, share: float) -> int:
        """Variants of `e` run at once: each holds its recomputed activations (`activations`
        bytes: at most the whole network's on a chunk) and its materialized parameters, within
        `share` bytes."""
        param_bytes = sum(math.prod(_stack_shape(e.params, k)[1 if e.size is not None else 0:])
                          * self.base[k].element_size() for k in e.params)
        return max(1, int(share // max(activations + param_bytes, 1.0)))

    def _distinct(self, e: Edit, piece: int) -> tuple[list[int], dict[int, int]]:
        """(variants to compute, variant → an identical one computed); variants bit-identical to
        the base are in neither (they take the base's result). Read `piece` variants at a time,
        matched by a bit-exact fingerprint and confirmed with ``torch.equal``."""
        everything = list(range(e.variants))
        if e.activations:
            return everything, {}
        if not e.params:
            return [], {}       # no edit at all: the base network
        keys = list(e.params)
        base = {k: self._base_print(k) for k in keys}
        twins_ok = e.size is not None and not e.args
        keep: list[int] = []
        same: dict[int, int] = {}
        seen: dict[tuple[int, ...], list[int]] = {}
        for lo in range(0, e.variants, piece):
            idx = everything[lo:lo + piece]
            values = _variants(e, idx)
            prints = {k: _fingerprint(v).tolist() for k, v in values.items()}
            for i, b in enumerate(idx):
                fp = tuple(prints[k][i] for k in keys)
                if all(fp[j] == base[k] for j, k in enumerate(keys)) and all(
                        values[k].dtype == self.base[k].dtype
                        and torch.equal(values[k][i].to(self.base[k].device), self.base[k])
                        for k in keys):
                    continue
                twin = None
                for a in seen.get(fp, ()) if twins_ok else ():
                    other = {k: v[a - lo] for k, v in values.items()} if a >= lo else \
                        {k: v[0] for k, v in _variants(e, [a]).items()}
                    if all(torch.equal(values[k][i], other[k]) for k in keys):
                        twin = a
                        break
                if twin is None:
                    keep.append(b)
                    seen.setdefault(fp, []).append(b)
                else:
                    same[b] = twin
        return keep, same

    def _base_print(self, key: str) -> int:
        if key not in self._base_prints:
            self._base_prints[key] = int(_fingerprint(self.base[key].unsqueeze(0))[0])
        return self._base_prints[key]

    def _chunking(self, program: Program | None, acts: frozenset[str] = frozenset()
                  ) -> tuple[int, float]:
        """(examples per chunk, bytes left for the variants run at once): the cached node values
        of one chunk take at most half the memory budget."""
        total, largest = self._estimate_bytes(program, acts)
        n = min(self.batch_size, max(len(self.data), 1),
                max(1, int(self.memory_budget // (2 * total))))
        if self.device.type == "cpu":
            n = cpu_chunk(largest, limit=n)
        return n, max(self.memory_budget - n * total, 0.0)

    def _estimate_bytes(self, program: Program | None, acts: frozenset[str] = frozenset()
                        ) -> tuple[float, float]:
        """Bytes per example of every cached node value together (with `program`; without, of
        the largest activation a full forward holds), and of the largest one."""
        key = acts if program is not None else None
        if key not in self._bytes:
            if program is not None:
                k = max(min(4, len(self.data)), 1)
                x = self._input(torch.arange(min(4, len(self.data))))
                values = [v for v in program.run_base(x).values() if isinstance(v, Tensor)]
                sizes = [v.numel() * v.element_size() / k for v in values]
                total, largest = sum(sizes), max(sizes, default=1.0)
            else:
                total = largest = self._module_profile().largest
            self._bytes[key] = (max(total, 1.0), max(largest, 1.0))
        return self._bytes[key]

    def _program(self, acts: frozenset[str]) -> Program | None:
        if acts in self._programs:
            return self._programs[acts]
        program = None
        if self.use_fx:
            try:
                program = Program(self.model, acts, self.alias)
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
    def _verify(self, program: Program) -> None:
        x = self._input(torch.arange(min(4, len(self.data))))
        ours = program.run_base(x)[program.output]
        theirs = inputs.call(self.model, x)
        if not (isinstance(ours, Tensor) and ours.shape == theirs.shape
                and torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)):
            raise RuntimeError("the traced graph's output differs from the model's forward")

    # -- running -----------------------------------------------------------------

    def _run_plan(self, plan: _Plan, program, env, x, index, base_out) -> Tensor:
        """Logits of every variant of the plan's edit on this chunk: (n, K) or (B, n, K)."""
        e = plan.edit
        if e.size is None:
            if not plan.keep:
                return base_out
            return self._run_one(plan, program, env, x, index, e.params, e.args)
        # variants equal to the base take its result (base_out is None only when there are none)
        out = None if base_out is None else \
            base_out.unsqueeze(0).repeat(e.size, *([1] * base_out.dim()))
        for lo in range(0, len(plan.keep), plan.piece):
            idx = plan.keep[lo:lo + plan.piece]
            sel = torch.tensor(idx, dtype=torch.long)
            params = {k: v.to(self.device) for k, v in _variants(e, idx).items()}
            args = {k: v[sel.to(v.device)] for k, v in e.args.items()}
            res = self._run_stack(plan, program, env, x, index, params, args, len(idx))
            if out is None:
                out = res.new_empty((e.size, *res.shape[1:]))
            out[sel.to(out.device)] = res
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
        with hooked(self.model, {m: (lambda out, fn=fn: fn(out, ctx)) for m, fn in acts.items()}):
            return _check_logits(inputs.call(self.model, x, override or None))


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
    params, buffers = state_keys(model)
    return params + buffers


def _call_cost(module: nn.Module, out: Tensor) -> float:
    """Multiply-adds of one call of a leaf module (whole batch), estimated from its output:
    parameters × output positions (Linear: per row; ConvNd: per pixel; other parametrized
    modules: per token, the last dim being features; an embedding is a lookup), plus one per
    output element."""
    params = sum(p.numel() for p in module.parameters())
    if out.dim() == 0 or not params or isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return float(out.numel())
    channels = out.shape[1] if isinstance(module, nn.modules.conv._ConvNd) and out.dim() > 1 \
        else out.shape[-1]
    return float(out.numel()) * (1 + params / max(channels, 1))


def _stack_shape(params: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    """Shape of an edit's value for `key` (with the variant dim of a stack), without building it."""
    return params.shape(key) if isinstance(params, PathParams) else tuple(params[key].shape)


def _variants(e: Edit, index: list[int]) -> dict[str, Tensor]:
    """Variants `index` of the edit's parameters: key → (len(index), *shape). A consecutive run
    of an eager stack is a view; a :class:`PathParams` stack is built."""
    if e.size is None:
        return {k: v.unsqueeze(0) for k, v in e.params.items()}
    if isinstance(e.params, PathParams):
        return e.params.take(index)
    if index == list(range(index[0], index[-1] + 1)):
        return {k: v[index[0]:index[-1] + 1] for k, v in e.params.items()}
    sel = torch.tensor(index, dtype=torch.long)
    return {k: v[sel.to(v.device)] for k, v in e.params.items()}


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fingerprint(v: Tensor) -> Tensor:
    """(B,) int64: the sum of each variant's bit patterns in the stack `v` (B, ...). Exact and
    independent of summation order and device, so bit-identical variants always match."""
    if v.is_complex():
        v = torch.view_as_real(v)
    bits = v.contiguous().view(_BITS[v.element_size()])
    return bits.reshape(v.shape[0], math.prod(v.shape[1:])).sum(1, dtype=torch.int64).cpu()


def _check_logits(out: Any) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() < 2:
        raise StateError(f"the model must return logits (N, K); got {type(out).__name__}"
                         + (f" of shape {tuple(out.shape)}" if isinstance(out, Tensor) else ""))
    return out
