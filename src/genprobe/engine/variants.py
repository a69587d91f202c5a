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
  keep the base state's values (bit-identical). Buffers may be edited too. For a stack, the
  values may also be a :class:`PathParams` (θ = lerp(start, end, α) + σ·s·z per variant, built
  piece by piece as the engine runs them, so a stack far larger than memory can be handed over
  whole).
- ``activations``: module name → ``fn(h, ctx) -> h'`` applied to that module's output ``h``
  (shape (n, ...), a data chunk of n examples). ``ctx`` is an :class:`ActivationContext` with
  ``ctx.index`` (n,) the chunk's example indices into the data (for fixed per-example draws) and
  ``ctx.args`` this variant's slice of ``Edit.args``.
- ``size``: ``None`` for one variant; an int B for a *stack* of B variants: every ``params`` value
  then has shape (B, *param_shape) and every ``args`` value a leading dim B. Stacks are run
  through ``torch.func.vmap`` over the variant dim (falling back to a loop over variants, with a
  logged warning, when a module has no batching rule). Results then have a leading dim B.

Helpers build the common edits from :class:`genprobe.params.Unit`\\ s and states:
:func:`replace_edit`, :func:`interpolate_edit`, :func:`noise_edit`, :func:`path_edit` (points
(α, σ) on the noisy path from θ⁰ to θ^F with given draws: module criticality), :func:`mask_edit`,
:func:`activation_noise_edit`; :func:`stack_edits` concatenates edits of the same keys into one
stack; :func:`noise_std` is the one formula of a noise level ("absolute"/"relative"). The
engine skips variants whose parameters equal the base bit for bit (re-init to θ^F, a
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
``Edit(params={}, activations={}, args={}, size=None, label=None)``;
``ActivationContext(index, args)``;
``replace_edit(unit, source, *, buffers="keep", label=None)``;
``interpolate_edit(unit, start, end, alphas, *, buffers="keep", label=None)`` (stack);
``noise_edit(unit, center, sigma, draws, *, seed=None, generator=None, scale="absolute",
label=None)`` (stack);
``path_edit(unit, start, end, points, z=None, *, scale="absolute", label=None) -> (Edit, sizes)``
(lazy stack); ``PathParams(keys, start, end, alphas, sigmas=None, draws=None, z=None,
scale="absolute")``; ``noise_std(center, sigma, scale="absolute")``;
``mask_edit(module, mask, value=0.0, *, dim=None, label=None)`` (stack when mask is (B, C));
``masks_edit({module: (mask, value)}, *, dim=None, label=None)`` (several modules at once);
``activation_noise_edit(module, std, *, seed=0, draws=1, dim=None, label=None)`` (stack of
S scales × draws); ``standard_normal_draws(seed, draw, index, shape)``;
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

import numpy as np
import torch
from torch import Tensor, fx, nn
from torch.func import functional_call, vmap

from ..device import resolve_device
from ..errors import ConfigError, ModuleSelectionError, StateError, check_choice
from ..evaluate import DEFAULT_BATCH_SIZE, cpu_chunk
from ..evaluate import per_example as loss_and_error
from ..memory import resolve_memory_budget
from ..params import BufferPolicy, Unit
from ..values import Data
from .activations import unit_dim

logger = logging.getLogger(__name__)

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


def noise_std(center: Tensor, sigma: float, scale: str = "absolute") -> float:
    """Standard deviation of the Gaussian noise added to one parameter tensor at noise level σ.

    ``"absolute"``: σ. ``"relative"``: σ · ‖center‖_F / √numel, so that E‖u‖² = σ² ‖center‖²
    (noise proportional to the tensor's norm, as in sharpness measures). The one noise formula
    of the package: :func:`noise_edit`, :func:`path_edit` and the probes use it.
    """
    if scale == "absolute":
        return float(sigma)
    if scale == "relative":
        return float(sigma) * (float(center.double().norm()) / math.sqrt(max(center.numel(), 1)))
    raise ConfigError(f"unknown scale={scale!r}; choose one of {NOISE_SCALES}")


class PathParams(Mapping[str, Tensor]):
    """Stacked parameter values on the path from `start` to `end`, with fixed noise, built lazily.

    Variant b of key k is ``center + noise_std(center, σ_b, scale) · z[k][d_b]`` with
    ``center = lerp(start[k], end[k], α_b)`` (no noise term where σ_b = 0). :meth:`take` builds a few variants; the
    engine calls it piece by piece, so a stack of any size costs memory only for the variants
    run at once. As a Mapping, ``params[k]`` builds key k of every variant, (B, *shape). Values
    are read from `start`, `end` and `z` when built: do not change them in between.
    """

    def __init__(self, keys: Sequence[str], start: Mapping[str, Tensor], end: Mapping[str, Tensor],
                 alphas: Sequence[float], sigmas: Sequence[float] | None = None,
                 draws: Sequence[int] | None = None, z: Mapping[str, Tensor] | None = None,
                 scale: str = "absolute"):
        self._keys = list(keys)
        self.alphas = [float(a) for a in alphas]
        self.sigmas = [0.0] * len(self.alphas) if sigmas is None else [float(s) for s in sigmas]
        self.draws = [0] * len(self.alphas) if draws is None else [int(d) for d in draws]
        if not (len(self.alphas) == len(self.sigmas) == len(self.draws)) or not self.alphas:
            raise ConfigError("PathParams needs one alpha, sigma and draw index per variant "
                              "(and at least one variant)")
        if any(s != 0.0 for s in self.sigmas) and z is None:
            raise ConfigError("PathParams with sigma > 0 needs the draws z")
        if scale not in NOISE_SCALES:
            raise ConfigError(f"unknown scale={scale!r}; choose one of {NOISE_SCALES}")
        self.start, self.end, self.z, self.scale = start, end, z or {}, scale

    @property
    def size(self) -> int:
        return len(self.alphas)

    def shape(self, key: str) -> tuple[int, ...]:
        """(B, *param_shape) of `key`."""
        return (self.size, *self.start[key].shape)

    @torch.no_grad()
    def take(self, index: Sequence[int]) -> dict[str, Tensor]:
        """Variants `index` of every key: key → (len(index), *shape)."""
        index = [int(b) for b in index]
        out = {}
        for k in self._keys:
            start, end = self.start[k], self.end[k]
            buf = torch.empty((len(index), *start.shape), dtype=start.dtype, device=start.device)
            point, center, std = None, start, 0.0
            for i, b in enumerate(index):
                alpha, sigma = self.alphas[b], self.sigmas[b]
                if point is None or point[0] != alpha:
                    center = torch.lerp(start, end, alpha)
                if point != (alpha, sigma):   # the draws of a point are consecutive
                    point, std = (alpha, sigma), noise_std(center, sigma, self.scale)
                if sigma == 0.0:
                    buf[i].copy_(center)
                else:  # center + std · z, written into place (the same floats)
                    torch.mul(self.z[k][self.draws[b]].to(buf.device), std, out=buf[i])
                    buf[i].add_(center)
            out[k] = buf
        return out

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        full = PathParams([key], self.start, self.end, self.alphas, self.sigmas, self.draws,
                          self.z, self.scale)
        return full.take(range(self.size))[key]

    def __contains__(self, key: object) -> bool:   # without building (Mapping's would)
        return key in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def interpolate_edit(unit: Unit, start: Mapping[str, Tensor], end: Mapping[str, Tensor],
                     alphas: Sequence[float] | Tensor, *, buffers: BufferPolicy = "keep",
                     label: Any = None) -> Edit:
    """A stack of len(alphas) variants, θ_unit ← (1 − α) start + α end (integer keys skipped)."""
    alphas = [float(a) for a in torch.as_tensor(alphas, dtype=torch.float64).flatten()]
    if not alphas:
        raise ConfigError("interpolate_edit needs at least one alpha")
    keys = [k for k in unit.keys(buffers) if start[k].is_floating_point()]
    path = PathParams(keys, start, end, alphas)
    return Edit(params=path.take(range(len(alphas))), size=len(alphas), label=label)


def path_edit(unit: Unit, start: Mapping[str, Tensor], end: Mapping[str, Tensor],
              points: Sequence[tuple[float, float]], z: Mapping[str, Tensor] | None = None, *,
              scale: str = "absolute", label: Any = None) -> tuple[Edit, list[int]]:
    """One stack of every point (α, σ) of the noisy path θ_unit = lerp(start, end, α) + σ·s_k·z.

    Per point: σ = 0 gives one variant (the point on the path); σ > 0 gives one variant per
    draw of `z` (key → (D, *shape) standard-normal draws, the same at every point: common random
    numbers), with s_k the scale of :func:`noise_std`. Over the unit's parameters (buffers keep
    the base's values). The parameters are a lazy :class:`PathParams`, built as the engine runs
    them. Returns the edit and each point's number of variants (the result's slices, in order).
    """
    if not points:
        raise ConfigError("path_edit needs at least one (alpha, sigma) point")
    alphas, sigmas, draws, sizes = [], [], [], []
    n_draws = len(next(iter(z.values()))) if z else 0
    for alpha, sigma in points:
        count = 1 if sigma == 0.0 else n_draws
        if count < 1:
            raise ConfigError("path_edit: a point with sigma > 0 needs draws z")
        alphas += [float(alpha)] * count
        sigmas += [float(sigma)] * count
        draws += list(range(count))
        sizes.append(count)
    params = PathParams(unit.params, start, end, alphas, sigmas, draws, z, scale)
    return Edit(params=params, size=params.size, label=label), sizes


def noise_edit(unit: Unit, center: Mapping[str, Tensor], sigma: float, draws: int, *,
               seed: int | None = None, generator: torch.Generator | None = None,
               scale: str = "absolute", label: Any = None) -> Edit:
    """A stack of `draws` variants θ_unit ← center + u, u ~ N(0, σ² I), over the unit's parameters.

    ``scale="relative"``: each parameter tensor's noise has standard deviation
    σ · ‖center_k‖_F / √numel_k (see :func:`noise_std`). Draws come from `generator`, else a
    CPU generator seeded with `seed` (default 0), in the unit's key order: reproducible.
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
        params[k] = c.unsqueeze(0) + noise_std(c, sigma, scale) * u.to(c.device)
    return Edit(params=params, size=draws, label=label)


def _unit_view(x: Tensor, ndim: int, dim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim % ndim] = -1
    return x.reshape(shape)


def mask_edit(module: str, mask: Tensor, value: float | Tensor = 0.0, *, dim: int | None = None,
              label: Any = None) -> Edit:
    """Set the units of `module`'s output where `mask` is True to `value` (0, or per-unit means).

    `mask`: (C,) bool, one entry per unit along `dim` of the output (``None``, the default:
    :func:`~genprobe.engine.activations.unit_dim`, i.e. the channels of a conv output
    (n, C, H, W), the features of a linear output (n, C), the last dim of (n, T, C)); or (B, C)
    for a stack of B masks. `value`: a scalar or a (C,) tensor (e.g. each unit's mean
    activation, ``UnitStats.element_mean``), the same for every mask of a stack. A module
    called at several call sites is masked at each.
    """
    return masks_edit({module: (mask, value)}, dim=dim, label=label)


def masks_edit(masks: Mapping[str, tuple[Tensor, float | Tensor]], *, dim: int | None = None,
               label: Any = None) -> Edit:
    """:func:`mask_edit` at several modules at once: ``{module: (mask, value)}``, each as in
    :func:`mask_edit`; stacked masks must all have the same number of rows B (variant b masks
    row b of every module)."""
    acts, args = {}, {}
    sizes = set()
    for i, (module, (mask, value)) in enumerate(masks.items()):
        mask = torch.as_tensor(mask, dtype=torch.bool)
        value = torch.as_tensor(value)
        if mask.dim() not in (1, 2):
            raise ConfigError(f"mask must be (C,) or (B, C), got shape {tuple(mask.shape)}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != mask.shape[-1]):
            raise ConfigError(f"value must be a scalar or ({mask.shape[-1]},), got shape "
                              f"{tuple(value.shape)}")
        sizes.add(None if mask.dim() == 1 else mask.shape[0])
        acts[module] = _mask_fn(module, f"mask{i}", f"value{i}", dim)
        args[f"mask{i}"] = mask
        args[f"value{i}"] = value if mask.dim() == 1 else value.expand(mask.shape[0], *value.shape)
    if len(sizes) != 1:
        raise ConfigError(f"masks_edit: every module needs masks of the same stack size, got {sizes}")
    return Edit(activations=acts, args=args, size=sizes.pop(), label=label)


def _mask_fn(module: str, mask_key: str, value_key: str, dim: int | None) -> ActivationFn:
    def fn(h: Tensor, ctx: ActivationContext) -> Tensor:
        d = unit_dim(h) if dim is None else dim
        _check_units(module, h, d, ctx.args[mask_key].shape[0])
        m = _unit_view(ctx.args[mask_key].to(h.device), h.dim(), d)
        v = ctx.args[value_key].to(h.device, h.dtype)
        v = v if v.dim() == 0 else _unit_view(v, h.dim(), d)
        return torch.where(m, v, h)

    return fn


def _check_units(module: str, h: Tensor, dim: int, c: int) -> None:
    have = h.shape[dim]
    if c not in (1, have):
        raise ConfigError(f"activation edit of {module!r}: {c} per-unit values for an output "
                          f"with {have} units along dim {dim} (shape {tuple(h.shape)})")


def _noise_scales(std: float | Tensor | Sequence) -> tuple[Tensor, bool]:
    """(S, C) or (S, 1) float64 noise scales, and whether `std` asks for a stack of scales."""
    if isinstance(std, (list, tuple)):
        items = [torch.as_tensor(s, dtype=torch.float64) for s in std]
        if not items or any(t.dim() > 1 for t in items) or len({t.shape for t in items}) != 1:
            raise ConfigError("activation noise std: a list must hold S numbers or S (C,) tensors")
        scales = torch.stack(items)
        scales, stacked = (scales.unsqueeze(1) if scales.dim() == 1 else scales), True
    else:
        t = torch.as_tensor(std, dtype=torch.float64)
        if t.dim() > 2:
            raise ConfigError(f"activation noise std must be a scalar, (C,) or (S, C), got shape "
                              f"{tuple(t.shape)}")
        scales, stacked = t.reshape(1, -1) if t.dim() < 2 else t, t.dim() == 2
    if scales.numel() == 0 or not torch.isfinite(scales).all() or (scales < 0).any():
        raise ConfigError("activation noise std must be finite and >= 0")
    return scales, stacked


def standard_normal_draws(seed: int, draw: int, index: Tensor, shape: Sequence[int]) -> Tensor:
    """(n, *shape) float64 standard-normal draws, row i depending on (seed, draw, index[i]) only:
    ``numpy.random.default_rng(SeedSequence([seed, draw, index[i]])).standard_normal(shape)``.
    The draws of :func:`activation_noise_edit`: the same whatever the data chunking."""
    size = math.prod(shape)
    out = np.empty((len(index), size), dtype=np.float64)
    for i, ex in enumerate(index.tolist()):
        out[i] = np.random.default_rng(np.random.SeedSequence([seed, draw, ex])).standard_normal(size)
    return torch.from_numpy(out).reshape(len(index), *shape)


def activation_noise_edit(module: str, std: float | Tensor | Sequence, *, seed: int = 0,
                          draws: int = 1, dim: int | None = None, label: Any = None) -> Edit:
    """Add Gaussian noise to `module`'s output: h + s · z, z ~ N(0, I) fixed per example.

    `std` s: a scalar, or (C,) per-unit standard deviations along `dim` (e.g. factor × each
    unit's empirical std, ``factor * UnitStats.var.sqrt()``), for one noise scale; or S scales:
    a list of S numbers or of S (C,) tensors, or an (S, C) tensor. A 1-D tensor is always (C,)
    per-unit stds; give S scalar scales as a list, or as an (S, 1) tensor. `dim` ``None``: the
    :func:`~genprobe.engine.activations.unit_dim` of the output.

    The draw z of example i in draw d is :func:`standard_normal_draws` of (`seed`, d, i): the
    same for any batch size or chunking, whatever else is evaluated. One scalar or (C,) scale
    and ``draws=1`` give one variant; otherwise a stack of S × `draws` variants in scale-major
    order (variant v: scale v // draws, draw v % draws), every scale using the same draws z
    (common random numbers). A module called at several call sites gets the same z added at
    each. The z of the current data chunk (`draws` of them) are kept while the chunk is
    evaluated.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"activation noise seed must be an int >= 0, got {seed!r}")
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 1:
        raise ConfigError(f"draws must be an int >= 1, got {draws!r}")
    scales, stacked = _noise_scales(std)
    seed, draws = int(seed), int(draws)
    cache: dict[str, Any] = {"key": None, "z": {}}

    def z_of(d: int, index: Tensor, h: Tensor) -> Tensor:
        key = (tuple(index.tolist()), tuple(h.shape[1:]), h.dtype, h.device)
        if cache["key"] != key:
            cache["key"], cache["z"] = key, {}
        if d not in cache["z"]:
            cache["z"][d] = standard_normal_draws(seed, d, index, h.shape[1:]).to(h.device, h.dtype)
        return cache["z"][d]

    def fn(h: Tensor, ctx: ActivationContext) -> Tensor:
        d = unit_dim(h) if dim is None else dim
        s = ctx.args["std"]
        _check_units(module, h, d, s.shape[0])
        draw = ctx.args["draw"]
        try:
            z = z_of(int(draw), ctx.index, h)
        except RuntimeError:  # under vmap the draw index is batched: select from every draw
            z = torch.stack([z_of(b, ctx.index, h) for b in range(draws)])[draw]
        return h + _unit_view(s.to(h.device, h.dtype), h.dim(), d) * z

    if not stacked and draws == 1:
        return Edit(activations={module: fn}, args={"std": scales[0], "draw": torch.tensor(0)},
                    label=label)
    size = scales.shape[0] * draws
    args = {"std": scales.repeat_interleave(draws, dim=0),
            "draw": torch.arange(draws).repeat(scales.shape[0])}
    return Edit(activations={module: fn}, args=args, size=size, label=label)


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
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
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
        self._programs: dict[frozenset[str], _Program | None] = {}
        self._bytes: dict[frozenset[str] | None, tuple[float, float]] = {}
        self.route: str | None = None
        self.stack = stack if stack != "auto" else ("loop" if self.device.type == "cpu" else "vmap")
        self._vmap_ok = self.stack == "vmap"

    def _try_channels_last(self) -> bool:
        """Switch the private model to channels-last when it is a conv net on images and its
        forward gives the same outputs that way (a ``.view`` on a conv output would not)."""
        if self.data.x.dim() != 4 or not any(isinstance(m, nn.Conv2d) for m in self.model.modules()):
            return False
        x = self._input(torch.arange(min(4, len(self.data))))
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

    def _input(self, index: Tensor | slice) -> Tensor:
        """The inputs `index` on the device, floating ones in the model's dtype, integer ones
        (token ids) unchanged. A slice may be a view of the caller's data: never written to."""
        x = self.data.x[index]
        if isinstance(index, slice) and (self._profile is None or self._profile.writes_input):
            x = x.clone()  # the model writes its input in place: never the caller's data
        if x.is_floating_point() and self.input_dtype is not None:
            x = x.to(self.device, self.input_dtype)
        else:
            x = x.to(self.device)
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
                base_out = _check_logits(self.model(x))
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
        if not self.use_fx:
            return "full"
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
            k = max(len(x), 1)
            order: dict[str, int] = {}
            calls: list[tuple[int, float]] = []
            started: dict[str, int] = {}
            sizes = [x.numel() * x.element_size() / k]
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
            version = x._version
            try:
                self.model(x)
            finally:
                for h in handles:
                    h.remove()
            self._profile = _Profile(order, calls, max(sizes), x._version != version)
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
            if m not in self.module_names:
                raise ModuleSelectionError(f"activation edit of unknown module {m!r}; modules: "
                                           f"{', '.join(sorted(n for n in self.module_names if n))}")
        for k, v in e.args.items():
            if e.size is not None and (v.dim() == 0 or v.shape[0] != e.size):
                raise ConfigError(f"Edit.args[{k!r}] must have leading dim size={e.size}")

    def _nodes(self, e: Edit, program: _Program | None) -> tuple[list[fx.Node] | None, set]:
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

    def _chunking(self, program: _Program | None, acts: frozenset[str] = frozenset()
                  ) -> tuple[int, float]:
        """(examples per chunk, bytes left for the variants run at once): the cached node values
        of one chunk take at most half the memory budget."""
        total, largest = self._estimate_bytes(program, acts)
        n = min(self.batch_size, max(len(self.data), 1),
                max(1, int(self.memory_budget // (2 * total))))
        if self.device.type == "cpu":
            n = cpu_chunk(largest, limit=n)
        return n, max(self.memory_budget - n * total, 0.0)

    def _estimate_bytes(self, program: _Program | None, acts: frozenset[str] = frozenset()
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
