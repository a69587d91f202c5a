"""The edits of a network that :class:`genprobe.engine.variants.VariantEvaluator` evaluates.

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

API summary
-----------
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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..options import check_int
from ..params import BufferPolicy, Unit
from ..seeds import generator as seeded_generator
from ..seeds import seed_sequence
from .activations import unit_dim

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
    CPU generator derived from `seed` (default 0; :func:`genprobe.seeds.generator` of
    (seed, "noise")), in the unit's key order: reproducible.
    """
    if scale not in NOISE_SCALES:
        raise ConfigError(f"unknown scale={scale!r}; choose one of {NOISE_SCALES}")
    draws = check_int("draws", draws, 1)
    g = generator or seeded_generator(0 if seed is None else seed, "noise")
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


def masks_edit(masks: Mapping[str, tuple[Tensor, float | Tensor]], *,
               dim: int | Mapping[str, int] | None = None, label: Any = None) -> Edit:
    """:func:`mask_edit` at several modules at once: ``{module: (mask, value)}``, each as in
    :func:`mask_edit`, with `dim` one for all or ``{module: dim}``; stacked masks must all have
    the same number of rows B (variant b masks row b of every module)."""
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
        acts[module] = _mask_fn(module, f"mask{i}", f"value{i}",
                                dim.get(module) if isinstance(dim, Mapping) else dim)
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
    ``numpy.random.default_rng(seed_sequence(seed, draw, index[i])).standard_normal(shape)``
    (:func:`genprobe.seeds.seed_sequence`).
    The draws of :func:`activation_noise_edit`: the same whatever the data chunking."""
    size = math.prod(shape)
    out = np.empty((len(index), size), dtype=np.float64)
    for i, ex in enumerate(index.tolist()):
        out[i] = np.random.default_rng(seed_sequence(seed, draw, ex)).standard_normal(size)
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
    seed, draws = check_int("seed", seed, 0), check_int("draws", draws, 1)
    scales, stacked = _noise_scales(std)
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
